"""The systemd notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op. A NOTIFY_SOCKET that names a missing
or refusing socket must not kill the service: it is reported once and then ignored, because a
service that cannot tell systemd its status can still do its work.
"""

from __future__ import annotations

import logging
import os

import systemd.daemon

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.status_line = ""
        self._broken = False

    def _send(self, message: str) -> None:
        if self._broken or not os.environ.get("NOTIFY_SOCKET"):
            return
        try:
            systemd.daemon.notify(message)
        except OSError as exc:
            self._broken = True
            log.warning("cannot reach systemd's notify socket %s (%s); carrying on without it",
                        os.environ.get("NOTIFY_SOCKET"), exc.strerror or exc)

    def ready(self, status: str) -> None:
        self.status_line = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self.status_line:
            self.status_line = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's WatchdogSec), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
