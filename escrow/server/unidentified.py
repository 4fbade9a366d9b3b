"""Refusals of callers who never proved who they are, as the server keeps them: each goes to
``escrow_unauthenticated_refusals_total``, and the log gets the summaries of
:mod:`escrow.server.refusal_log` as they fall due, also when the source goes quiet (a
background task looks now and then)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from prometheus_client import Counter

from escrow.server.refusal_log import RefusalLog, Summary

log = logging.getLogger("escrow.server")


class UnidentifiedRefusals:
    def __init__(self, counter: Counter, tallies: RefusalLog) -> None:
        self._counter = counter
        self._tallies = tallies
        # Refusals are noted on the vault thread and on the event loop.
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def note(self, action: str, reason: str, source: str) -> None:
        self._counter.labels(action, reason).inc()
        with self._lock:
            summaries = self._tallies.note(source, action, reason, time.monotonic())
        _write(summaries)

    def flush(self, *, everything: bool = False) -> None:
        """Log the summaries due now (every one, at shutdown)."""
        with self._lock:
            summaries = self._tallies.flush(time.monotonic(), everything=everything)
        _write(summaries)

    def start(self) -> None:
        """Look for due summaries from now on (on the event loop)."""
        self._task = asyncio.create_task(self._flush_now_and_then())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _flush_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(self._tallies.interval / 4)
            self.flush()


def _write(summaries: list[Summary]) -> None:
    for summary in summaries:
        log.warning("%s", summary.line())
