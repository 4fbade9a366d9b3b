from __future__ import annotations

from datetime import UTC, datetime, timedelta

from escrow.policy import Policy
from escrow.store import KeyVersionRecord
from escrow.vault import prunable, version_history

POLICY = Policy(2, ("auto", "auto"))


def version(number: int, created: str) -> KeyVersionRecord:
    return KeyVersionRecord("c" * 25, number, f"{number:064x}", POLICY, created)


HISTORY = [  # newest first, as the store lists them
    version(3, "2026-11-20T00:00:00+00:00"),
    version(2, "2026-11-10T00:00:00+00:00"),
    version(1, "2026-11-01T00:00:00+00:00"),
]


def test_each_version_is_superseded_when_the_next_one_arrives() -> None:
    history = version_history(HISTORY, timedelta(days=5))
    assert history[0].superseded_at is None
    assert history[1].superseded_at == datetime(2026, 11, 20, tzinfo=UTC)
    assert history[2].superseded_at == datetime(2026, 11, 10, tzinfo=UTC)
    assert history[2].destroy_after == datetime(2026, 11, 15, tzinfo=UTC)


def test_retention_counts_from_supersession_not_creation() -> None:
    history = version_history(HISTORY, timedelta(days=5))
    assert prunable(history, datetime(2026, 11, 14, tzinfo=UTC)) == []
    assert prunable(history, datetime(2026, 11, 15, tzinfo=UTC)) == [1]
    assert prunable(history, datetime(2026, 11, 26, tzinfo=UTC)) == [2, 1]


def test_the_newest_version_is_never_prunable() -> None:
    history = version_history(HISTORY, timedelta(0))
    assert 3 not in prunable(history, datetime(2030, 1, 1, tzinfo=UTC))
    assert prunable(version_history(HISTORY[:1], timedelta(0)),
                    datetime(2030, 1, 1, tzinfo=UTC)) == []
