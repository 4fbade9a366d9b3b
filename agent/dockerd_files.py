"""dockerd's comings and goings, read from its socket's directory, never from the socket.

Debian's and Docker's packages start dockerd through systemd's docker.socket: the socket stays
while dockerd stops, restarts or crashes, and a connection made while dockerd is down *starts*
docker (socket activation). Knocking on the socket is therefore no way to look: it would undo
`systemctl stop docker`. What does change is dockerd's pid file next to its socket
(/run/docker.pid for /run/docker.sock, $XDG_RUNTIME_DIR/docker.pid for rootless docker):
written as dockerd starts, before its API listens; removed when it stops; left naming a dead
process when it is killed. A dockerd started without socket activation also makes its socket
itself, after the pid file. So while dockerd is away the agent waits on inotify events in that
directory, and asks the API only once a dockerd other than the one that left runs and its
socket exists; the socket then holds the question until dockerd serves, so the first answer
comes the moment the API does, without a timer.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from urllib.parse import urlparse

PID_FILE = "docker.pid"


class Look(Enum):
    ASK = "ask"  # a dockerd other than the one that left runs, its socket exists: ask it now
    WAIT = "wait"  # dockerd is away, or still the one that left: wait for the next change
    UNTOLD = "untold"  # no pid file next to the socket says anything: ask, at the caller's pace


def look(pid: int | None, pid_file_seen: bool, socket_exists: bool, lost: int | None) -> Look:
    """Pure: what to do, given the live pid the pid file names (None: none, stale, or no
    file), whether this agent ever saw that file, whether the socket exists, and the pid of
    the dockerd that went away (None if unknown)."""
    if pid is not None:
        return Look.ASK if pid != lost and socket_exists else Look.WAIT
    return Look.WAIT if pid_file_seen else Look.UNTOLD


def socket_path(docker_host: str) -> Path | None:
    """The socket file of a unix:// docker_host; None for tcp:// and the like."""
    url = urlparse(docker_host)
    return Path(url.path) if url.scheme in ("unix", "http+unix") and url.path else None


def _live_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):  # no file, an empty one being written, a dead process
        return None
    return pid


class DockerdFiles:
    def __init__(self, docker_host: str) -> None:
        self.socket = socket_path(docker_host)
        self._pid_file_seen = False

    def running(self) -> int | None:
        """The pid of the running dockerd its pid file names, if any."""
        return _live_pid(self.socket.parent / PID_FILE) if self.socket else None

    def _look(self, lost: int | None) -> Look:
        if self.socket is None:
            return Look.UNTOLD
        pid_file = self.socket.parent / PID_FILE
        self._pid_file_seen |= pid_file.exists()
        return look(_live_pid(pid_file), self._pid_file_seen, self.socket.exists(), lost)

    async def until_it_may_answer(self, lost: int | None) -> None:
        """Return once a dockerd other than `lost` runs and its socket exists, waiting on the
        socket's directory for it; at once where nothing there tells (no pid file, not a unix
        socket), leaving the pace to the caller."""
        if self.socket is None:
            return
        # Imported once dockerd first goes away: an agent whose dockerd never does needs none
        # of it (it loads ctypes, and runs ldconfig to find libc).
        from asyncinotify import Inotify, Mask  # noqa: PLC0415

        names = {Path(self.socket.name), Path(PID_FILE)}
        with Inotify() as inotify:
            try:
                # Watched before looking, so a change between the two is not missed; an
                # overflow means events were lost, so it is a change too.
                inotify.add_watch(self.socket.parent, Mask.CREATE | Mask.CLOSE_WRITE
                                  | Mask.DELETE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.ONLYDIR)
            except OSError:  # no such directory yet: nothing to wait on
                return
            while self._look(lost) is Look.WAIT:
                event = await inotify.get()
                while event.name not in names and Mask.Q_OVERFLOW not in event.mask:
                    if Mask.IGNORED in event.mask:  # the directory itself went away
                        return
                    event = await inotify.get()

