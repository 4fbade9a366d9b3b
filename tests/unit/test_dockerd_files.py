"""How the agent tells from dockerd's socket directory that a dockerd may answer, without
knocking on the socket (agent/dockerd_files.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dockerd_files import PID_FILE, DockerdFiles, Look, look, socket_path

ME = os.getpid()


@pytest.mark.parametrize(("pid", "seen", "socket_exists", "lost", "expected"), [
    (ME, True, True, None, Look.ASK),  # a dockerd runs: ask it
    (ME, True, True, 1, Look.ASK),  # another one than the one that left
    (ME, True, True, ME, Look.WAIT),  # still the one that left (it is shutting down)
    (ME, True, False, None, Look.WAIT),  # it runs, but has not made its socket yet
    (None, True, True, None, Look.WAIT),  # stale or removed pid file: docker.socket would
    (None, True, True, ME, Look.WAIT),  # start docker if asked, and nobody serves anyway
    (None, False, True, None, Look.UNTOLD),  # no pid file here ever: nothing tells
], ids=["running", "another-than-lost", "the-lost-one", "no-socket-yet", "stale-pid-file",
        "stale-and-lost", "never-a-pid-file"])  # ids without the pid: the same in every worker
def test_only_a_running_dockerd_other_than_the_lost_one_is_asked(
        pid: int | None, seen: bool, socket_exists: bool, lost: int | None,
        expected: Look) -> None:
    assert look(pid, seen, socket_exists, lost) is expected


def test_socket_path_is_read_from_unix_docker_hosts_only() -> None:
    assert socket_path("unix:///var/run/docker.sock") == Path("/var/run/docker.sock")
    assert socket_path("tcp://127.0.0.1:2375") is None


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_waits_through_a_stale_pid_file_until_a_new_dockerd_writes_it_and_listens(
        tmp_path: Path) -> None:
    sock, pid_file = tmp_path / "docker.sock", tmp_path / PID_FILE
    pid_file.write_text(str(dead_pid()))  # dockerd was killed
    files = DockerdFiles(f"unix://{sock}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def dockerd_starts() -> None:
        await asyncio.sleep(0.2)
        pid_file.write_text(str(ME))
        await asyncio.sleep(0.2)
        server.bind(str(sock))

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        starts = asyncio.create_task(dockerd_starts())
        began = loop.time()
        await asyncio.wait_for(files.until_it_may_answer(lost=None), timeout=5)
        await starts
        return loop.time() - began

    try:
        waited = asyncio.run(scenario())
    finally:
        server.close()
    assert 0.35 < waited < 2
    assert files.running() == ME


def test_waits_while_the_dockerd_that_left_still_runs_and_after_its_clean_stop(
        tmp_path: Path) -> None:
    sock, pid_file = tmp_path / "docker.sock", tmp_path / PID_FILE
    sock.touch()  # docker.socket's, which outlives dockerd
    pid_file.write_text(str(ME))
    files = DockerdFiles(f"unix://{sock}")
    replacement = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

    async def restart() -> None:
        await asyncio.sleep(0.2)
        pid_file.unlink()  # the old dockerd stopped cleanly
        await asyncio.sleep(0.2)
        pid_file.write_text(str(replacement.pid))

    async def scenario() -> None:
        restarting = asyncio.create_task(restart())
        await asyncio.wait_for(files.until_it_may_answer(lost=ME), timeout=5)
        assert restarting.done()

    try:
        asyncio.run(scenario())
        assert files.running() == replacement.pid
    finally:
        replacement.kill()
        replacement.wait()


def test_returns_at_once_where_no_pid_file_tells_anything(tmp_path: Path) -> None:
    files = DockerdFiles(f"unix://{tmp_path / 'sock'}")
    asyncio.run(asyncio.wait_for(files.until_it_may_answer(lost=None), timeout=1))
    asyncio.run(asyncio.wait_for(DockerdFiles("tcp://127.0.0.1:2375").until_it_may_answer(
        lost=None), timeout=1))
