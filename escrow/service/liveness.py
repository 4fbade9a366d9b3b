"""What a node's heartbeats say (pure): whether it is up, and whether two machines carry its
identity at once.

A copy of a manager's disk has the manager's node certificate and file agent key, so only
liveness tells the copy from the original. Two signs:

- an unseal request from boot B while boot A of the same node beat recently, said
  ``unlocked`` and did not say goodbye: A may have crashed (then it stays silent) or be alive
  (then B is a copy). The request is held for one of A's intervals; a beat from A meanwhile
  convicts B;
- two boots beating alternately: a boot beat after another boot of the node began beating,
  and neither said goodbye.

A clean reboot says goodbye, so it is never held; an unclean one waits one interval at most. A
copy that asks while the original is off looks like a crash: that residual risk is in
docs/threat-model.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from escrow.core.states import Liveness, LockState
from escrow.core.timestamps import parse_timestamp
from escrow.store import HeartbeatRecord, RequestRecord

MISSED_BEATS = 3  # no beat for this many intervals: unreachable
HOLD_WITHIN = 2  # an unseal request waits on another boot that beat within this many intervals


def _age(beat: HeartbeatRecord, now: datetime) -> timedelta:
    return now - parse_timestamp(beat.last_at)


def _interval(beat: HeartbeatRecord) -> timedelta:
    return timedelta(seconds=beat.interval_seconds)


def silent_at(beat: HeartbeatRecord) -> datetime:
    """When the node is unreachable for want of a beat after ``beat`` (a goodbye makes it so
    at once)."""
    return parse_timestamp(beat.last_at) + MISSED_BEATS * _interval(beat)


def liveness(beat: HeartbeatRecord | None, now: datetime) -> Liveness:
    """What the node's latest beat makes of it now."""
    if beat is None or beat.goodbye or now > silent_at(beat):
        return Liveness.UNREACHABLE
    return Liveness(beat.lock_state.value)


def holder_of(beats: Sequence[HeartbeatRecord], boot_id: str,
              now: datetime) -> HeartbeatRecord | None:
    """The other boot an unseal request from ``boot_id`` must wait on, if any: the latest beat
    of any other boot of the node, if it was unlocked, recent and no goodbye. (Not the node's
    latest beat: an agent beats before it asks, so a copy's own "locked" beat comes first.)"""
    latest = next((beat for beat in beats if beat.boot_id != boot_id), None)
    if (latest is None or latest.goodbye or latest.lock_state != LockState.UNLOCKED
            or _age(latest, now) > HOLD_WITHIN * _interval(latest)):
        return None
    return latest


def alive_alongside(beats: Sequence[HeartbeatRecord], beat: HeartbeatRecord,
                    ) -> HeartbeatRecord | None:
    """Another boot of the node, still reachable, that beat after ``beat``'s boot began
    beating, without a goodbye: two machines alive with one identity. (A new boot's first beat
    is never alongside anything: the boot it replaced beat before it began.)"""
    began = parse_timestamp(beat.first_at)
    now = parse_timestamp(beat.last_at)
    for other in beats:
        if (other.boot_id != beat.boot_id and not other.goodbye
                and parse_timestamp(other.last_at) > began
                and liveness(other, now) != Liveness.UNREACHABLE):
            return other
    return None


def convicted(held: Sequence[RequestRecord], beat: HeartbeatRecord,
              now: datetime) -> list[RequestRecord]:
    """Held requests from other boots while ``beat``'s boot, which they waited on, beats:
    each requester is a copy."""
    return [r for r in held if r.held_until and r.boot_id != beat.boot_id
            and now <= parse_timestamp(r.held_until)]


def is_held(request: RequestRecord, now: datetime) -> bool:
    return bool(request.held_until) and now < parse_timestamp(request.held_until)
