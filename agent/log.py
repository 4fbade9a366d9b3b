"""Where the agent's log lines go: the journal with structured fields (NODE_ID, CLUSTER_ID,
REQUEST_ID, KEY_VERSION) when systemd connected stderr to journald, plain stderr otherwise.

Log calls pass the fields as `extra`; no call ever passes key material, and messages name
versions and fingerprints only.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, IntEnum, auto
from typing import Any

import systemd.journal

LOGGER = "unseal-agent"
FIELDS = ("NODE_ID", "CLUSTER_ID", "REQUEST_ID", "KEY_VERSION")


def under_journald() -> bool:
    """True if stderr is the journal stream systemd set up ($JOURNAL_STREAM is dev:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (device, inode) == (str(stat.st_dev), str(stat.st_ino))


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{name.lower()}={getattr(record, name)}" for name in FIELDS
                          if getattr(record, name, ""))
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"{when} {record.levelname.lower()}: {record.getMessage()}"
                + (f" [{fields}]" if fields else ""))


def setup(*, journal_too: bool = False) -> logging.Logger:
    """Configure the agent's logger once. `journal_too` also sends every record to the
    journal when stderr is a terminal (for `rotate`, whose failure must reach the journal)."""
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if under_journald():
        logger.addHandler(systemd.journal.JournalHandler(SYSLOG_IDENTIFIER=LOGGER))
        return logger
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(StderrFormatter())
    logger.addHandler(stderr)
    if journal_too:
        logger.addHandler(systemd.journal.JournalHandler(SYSLOG_IDENTIFIER=LOGGER))
    return logger


class Level(IntEnum):
    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR
    CRITICAL = logging.CRITICAL


class Topic(Enum):
    """A lasting problem, or a long wait, that is logged when it starts, not on every retry."""

    IDENTITY = auto()
    HOSTNAME = auto()
    AGENT_KEY = auto()
    STATE = auto()
    NOT_ENROLLED = auto()
    DEPOSIT = auto()
    DEPOSIT_KEY = auto()
    LOCKED = auto()
    ESCROW_DOWN = auto()
    REFUSED = auto()
    WAITING = auto()  # for approvals, once per request
    HEARTBEAT = auto()


@dataclass(frozen=True)
class Line:
    """A log line still to be written, for code that decides what to say but writes nothing
    (agent/decision.py)."""

    level: Level
    message: str
    args: tuple[object, ...] = ()
    once: Topic | None = None
    request_id: str = ""  # the REQUEST_ID field, and what a topic is once per


class NodeLog:
    """The agent's logger: every line carries the node's NODE_ID and CLUSTER_ID once they are
    known, and a line under a topic is written only until the topic is cleared."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._fields: dict[str, str] = {}
        self._quiet: set[tuple[Topic, str]] = set()

    def about(self, node_id: str, cluster_id: str) -> None:
        self._fields = {"NODE_ID": node_id, "CLUSTER_ID": cluster_id}

    def write(self, line: Line) -> None:
        if line.once is not None:
            if (line.once, line.request_id) in self._quiet:
                return
            self._quiet.add((line.once, line.request_id))
        fields = {"REQUEST_ID": line.request_id} if line.request_id else {}
        self.logger.log(line.level, line.message, *line.args, extra={**self._fields, **fields})

    def once(self, topic: Topic, level: Level, message: str, *args: object) -> None:
        self.write(Line(level, message, args, once=topic))

    def clear(self, topic: Topic, request_id: str = "") -> None:
        self._quiet.discard((topic, request_id))

    def info(self, message: str, *args: Any, **fields: str) -> None:
        self.logger.info(message, *args, extra={**self._fields, **fields})

    def warning(self, message: str, *args: Any, **fields: str) -> None:
        self.logger.warning(message, *args, extra={**self._fields, **fields})
