"""Durations an operator types (``--for 2h``, ``--approve-after 15m``) and says back (pure)."""

from __future__ import annotations

import re

from escrow.core.errors import InputError
from escrow.core.plaintext import plain

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"([0-9]{1,6})([smhd])")
FORMAT_HINT = "write it as 90s, 15m, 2h or 1h30m"


def parse_duration(text: str, what: str) -> int:
    """Whole seconds of ``text``, a run of NUMBER+UNIT parts (s, m, h, d)."""
    spelled = text.strip().lower()
    parts = _PART.findall(spelled)
    if not parts or "".join(n + u for n, u in parts) != spelled:
        raise InputError(f"{what} {plain(text)} is not a duration", FORMAT_HINT)
    return sum(int(number) * _UNITS[unit] for number, unit in parts)


def describe(seconds: int) -> str:
    """``seconds`` as people say it: "15 min", "2 h", "1 h 30 min", "90 s"."""
    if seconds % 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    said = ([f"{hours} h"] if hours else []) + ([f"{minutes} min"] if minutes else [])
    return " ".join(said) or "0 s"
