"""Exponential back-off with jitter (pure), so a thousand agents that lost the escrow at the
same instant do not all come back at the same instant."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.SystemRandom)
    failures: int = 0

    def next_delay(self) -> float:
        """The wait before the next attempt: half of the exponential step fixed, half random
        ("equal jitter"), so the wait grows for certain and never exceeds the cap."""
        step = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return step / 2 + self.rng.uniform(0, step / 2)

    def reset(self) -> None:
        self.failures = 0
