"""Where the agent's log lines go: the journal with structured fields (NODE_ID, CLUSTER_ID,
REQUEST_ID, KEY_VERSION) when systemd connected stderr to journald, plain stderr otherwise.

Log calls pass the fields as `extra`; no call ever passes key material, and messages name
versions and fingerprints only.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

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
