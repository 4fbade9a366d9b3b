"""The one spelling of a moment that the escrow stores, sends and the agent reads (pure).

ISO 8601 in UTC with milliseconds; no import beyond the standard library, so the agent and
every part of the escrow can share it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text)
