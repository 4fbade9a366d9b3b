"""Refusals of callers who never proved who they are: counted and summarised, never audited.

An audit row is written for what an identified party did (a node whose signature checked out
over a fresh nonce, a custodian whose signed request did). Anything before that is free for
anyone to send, so writing a row for each would let a client fill the disk: instead each
refusal is counted (``escrow_unauthenticated_refusals_total``) and the log gets at most one
summary line per source per interval, with counts by reason (docs/threat-model.md).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from escrow.ratelimit import source_key

SUMMARY_INTERVAL = 60.0


@dataclass
class _Tally:
    since: float
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    source: str
    seconds: float
    reasons: tuple[tuple[str, int], ...]  # most frequent first

    @property
    def total(self) -> int:
        return sum(count for _, count in self.reasons)

    def line(self) -> str:
        counts = ", ".join(f"{reason} x{count}" for reason, count in self.reasons)
        return (f"refused {self.total} unauthenticated request(s) from {self.source} in "
                f"{self.seconds:.0f} s: {counts}")


class RefusalLog:
    """Per-source tallies; :meth:`note` returns a summary when one is due for its source.
    Bounded like :class:`escrow.ratelimit.SourceLimiter`: the quietest source is summarised
    and dropped when too many are tracked."""

    def __init__(self, interval: float = SUMMARY_INTERVAL, max_sources: int = 10_000) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()

    def note(self, source: str, action: str, reason: str, now: float) -> list[Summary]:
        key = source_key(source)
        tally = self._tallies.pop(key, None)
        first = tally is None
        if tally is None:
            tally = _Tally(now)
        tally.reasons[f"{action}.{reason}"] += 1
        self._tallies[key] = tally
        due: list[Summary] = []
        if first or now - tally.since >= self.interval:
            due.append(self._summary(key, tally, now))
            self._tallies[key] = _Tally(now)
        while len(self._tallies) > self.max_sources:
            old_key, old = self._tallies.popitem(last=False)
            if old.reasons:
                due.append(self._summary(old_key, old, now))
        return due

    def flush(self, now: float, *, everything: bool = False) -> list[Summary]:
        """Summaries of the tallies an interval old (all of them, at shutdown), so a burst
        that stops is reported too, not only when its source is refused again."""
        due = []
        for key, tally in list(self._tallies.items()):
            if tally.reasons and (everything or now - tally.since >= self.interval):
                due.append(self._summary(key, tally, now))
                del self._tallies[key]
        return due

    @staticmethod
    def _summary(source: str, tally: _Tally, now: float) -> Summary:
        return Summary(source, now - tally.since, tuple(tally.reasons.most_common()))
