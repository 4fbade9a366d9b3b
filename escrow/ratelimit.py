"""Per-source token buckets for the endpoints anyone can reach before proving who they are.

Pure: the clock comes in with every call. Memory is bounded: at most ``max_sources`` buckets
exist however many addresses a flood comes from; the source seen least recently is forgotten
first (it comes back with a full bucket, the price of the bound). IPv6 sources count per /64,
the smallest block one host usually holds, so one host cannot rotate through its addresses.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


def source_key(address: str) -> str:
    """The unit a limit applies to: the address, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SourceLimiter:
    """``rate`` requests per second per source, with bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float, max_sources: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, source: str, now: float) -> float:
        """Spend one token of ``source``; 0.0 if allowed, else the seconds until a token is
        back (what Retry-After says)."""
        if not self.enabled:
            return 0.0
        key = source_key(source)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)
