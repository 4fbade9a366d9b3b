"""The agent stops on SIGTERM even when a cancellation is lost on the way, as Python 3.11's
asyncio.wait_for loses one that meets a result (seen once in CI: an agent that ran on for
60 s after SIGTERM)."""

from __future__ import annotations

import asyncio

from agent.daemon import cancel_until_done


def test_work_that_swallows_one_cancellation_is_cancelled_again_until_it_ends() -> None:
    swallowed: list[int] = []

    async def work() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(1)  # as a library losing the cancellation would

    async def stop() -> bool:
        task = asyncio.create_task(work())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_until_done(task), timeout=10)
        return task.cancelled()

    assert asyncio.run(stop())
    assert swallowed == [1]


def test_work_that_failed_as_it_was_cancelled_says_why() -> None:
    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("dockerd went away") from None

    async def stop() -> str:
        task = asyncio.create_task(work())
        await asyncio.sleep(0)
        try:
            await cancel_until_done(task)
        except RuntimeError as exc:
            return str(exc)
        return ""

    assert asyncio.run(stop()) == "dockerd went away"
