"""Shamir policy of a cluster: threshold t over n share slots (pure).

A slot belongs to a named custodian (released when that custodian approves) or to the escrow's
``auto`` policy (released when the requesting node's identity checks pass):
docs/threat-model.md, "Trust boundaries and checks".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from escrow.core.errors import PolicyError
from escrow.core.shares import MAX_SHARES

AUTO = "auto"
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
NAME_RULE = "lower-case letters, digits, '_', '.', '-', starting with a letter, at most 64"


# A cluster's deny window (ClusterRecord.approve_after_seconds): shorter leaves custodians no
# time to read the notification, longer outlives the night it is meant for.
APPROVE_AFTER_MIN = 60
APPROVE_AFTER_MAX = 24 * 3600


def check_approve_after(seconds: int) -> int:
    """A deny window's delay: 0 (off) or between a minute and a day."""
    if seconds != 0 and not APPROVE_AFTER_MIN <= seconds <= APPROVE_AFTER_MAX:
        raise PolicyError(f"a deny window of {seconds} s is outside 1 min..24 h",
                          "give --approve-after between 1m and 24h, or off")
    return seconds


def validate_custodian_name(name: str) -> str:
    if name == AUTO:
        raise PolicyError("'auto' is reserved for the escrow's automatic slots",
                          "pick another custodian name")
    if not _NAME.fullmatch(name):
        raise PolicyError(f"custodian name {name!r} is not valid", f"use {NAME_RULE}")
    return name


@dataclass(frozen=True)
class Policy:
    threshold: int
    slots: tuple[str, ...]

    @property
    def custodians(self) -> tuple[str, ...]:
        return tuple(s for s in self.slots if s != AUTO)

    @property
    def paper_recoverable(self) -> bool:
        """Whether custodians alone hold enough shares to rebuild the key without the escrow."""
        return len(self.custodians) >= self.threshold

    def describe(self) -> str:
        return f"{self.threshold} of {len(self.slots)}: {','.join(self.slots)}"


def parse_slots(text: str) -> tuple[str, ...]:
    slots = tuple(s.strip() for s in text.split(","))
    if any(not s for s in slots):
        raise PolicyError(
            f"the slot list {text!r} has an empty entry",
            "give a comma-separated list such as auto,auto,alice,bob",
        )
    return slots


def make_policy(threshold: int, slots: Iterable[str], known_custodians: Iterable[str]) -> Policy:
    """Validate a policy. Every message says how to fix it."""
    slots = tuple(slots)
    n = len(slots)
    if not 1 <= n <= MAX_SHARES:
        raise PolicyError(
            f"a policy needs between 1 and {MAX_SHARES} slots, this one has {n}",
            "list the slots as --slots auto,auto,alice,bob",
        )
    if not 1 <= threshold <= n:
        raise PolicyError(
            f"threshold {threshold} is outside 1..{n} (the number of slots)",
            f"choose --threshold between 1 and {n}, or add slots",
        )
    for slot in slots:
        if slot != AUTO and not _NAME.fullmatch(slot):
            raise PolicyError(f"slot {slot!r} is neither 'auto' nor a valid custodian name",
                              f"custodian names use {NAME_RULE}")
    seen: set[str] = set()
    for slot in slots:
        if slot != AUTO and slot in seen:
            raise PolicyError(
                f"custodian {slot!r} holds more than one slot",
                "give each custodian one slot; a person holding two shares defeats the quorum",
            )
        seen.add(slot)
    known = set(known_custodians)
    unknown = sorted(s for s in seen if s != AUTO and s not in known)
    if unknown:
        raise PolicyError(
            f"unknown custodian(s): {', '.join(unknown)}",
            "register each one first with `escrow custodian add NAME --public-key FILE`",
        )
    return Policy(threshold, slots)
