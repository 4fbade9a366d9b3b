"""What the agent does next about an unseal request, decided from what it last heard (pure).

python-tuf's split: this module decides, as its TrustedMetadataSet does, and the unseal flow
(agent/unseal_flow.py) asks the escrow, tries keys on dockerd and writes the lines, as its Updater
does. `decide` opens no socket, awaits nothing and logs nothing; the lines and the status it
returns are for the flow to write. What it is given:

- the answer: the escrow's `RequestStatus`, or what came instead (`EscrowUnavailable`: not
  reached or 5xx; `EscrowRejected`: 4xx), or `SharesUnusable` (the released shares did not open),
  or `Tried`: the keys of a status were tried and dockerd refused these versions;
- the key versions dockerd refused so far on this request (a `Tried` answer's among them or
  not): an older version may be complete (auto shares) while the newest still waits for
  custodians, so those are not tried again and, once the newest is complete too, nothing is
  left to wait for;
- the monotonic clock, to say when to act, and two back-offs it draws the next delay from
  whenever a step waits on one: that of escrow failures, and that of refusals of this node
  (their jitter being the one random input).

Whether a request expired is the escrow's word (its state), never this host's clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set
from dataclasses import dataclass
from enum import Enum, auto

from agent.backoff import Backoff
from agent.errors import EscrowRejected, EscrowUnavailable, SharesUnusable
from agent.log import Level, Line, Topic
from escrow.core.plaintext import plain
from escrow.core.protocol import RequestStatus
from escrow.core.states import RequestState


@dataclass(frozen=True)
class Tried:
    """The keys `status` offered were tried: dockerd refused these versions (none combined if
    empty), and none unlocked the manager."""

    status: RequestStatus
    refused: frozenset[int] = frozenset()


Answer = RequestStatus | Tried | EscrowUnavailable | EscrowRejected | SharesUnusable


class Kind(Enum):
    TRY_KEYS = auto()     # combine the keys of `versions` and try them on dockerd, in that order
    POLL = auto()         # the custodians are deciding: ask about the same request again
    WAIT = auto()         # the escrow did not answer a poll: wait until `until`, then poll again
    NEW_REQUEST = auto()  # this request is over for now: ask for a new one at `until`
    GIVE_UP = auto()      # this request cannot unlock the manager: a new one at `until`


class Reason(Enum):
    """Why a request is waited on (WAIT), dropped (NEW_REQUEST) or given up (GIVE_UP)."""

    ESCROW_DOWN = auto()
    RATE_LIMITED = auto()
    SHARES_UNUSABLE = auto()
    ENDED = auto()  # expired, superseded or completed before a quorum
    FORGOTTEN = auto()  # the escrow no longer knows the request
    REFUSED = auto()
    DENIED = auto()
    REVOKED = auto()
    NO_VERSION_UNLOCKS = auto()


@dataclass(frozen=True)
class Step:
    """What to do next, and what to say meanwhile."""

    kind: Kind
    reason: Reason | None = None
    versions: tuple[int, ...] = ()  # TRY_KEYS: newest first
    until: float = 0.0  # WAIT, NEW_REQUEST, GIVE_UP: the monotonic time to go on at
    status: str = ""  # for systemd's status line meanwhile; empty: leave it as it is
    lines: tuple[Line, ...] = ()
    drop_key: bool = False  # a refusal: the node may have been re-enrolled with a new agent key


def decide(answer: Answer, refused: Set[int], now: float, *, backoff: Backoff,
           refusals: Backoff, refused_retry: float, request_id: str = "") -> Step:
    """The next step. `request_id` names the request being followed when the answer is an
    error ("" while asking for one); `refusals` is the back-off after the escrow refused or
    revoked this node, `refused_retry` the wait after a denial and the cap of any wait."""
    if isinstance(answer, EscrowUnavailable):
        return _escrow_down(answer, now, backoff, request_id)
    if isinstance(answer, EscrowRejected):
        if request_id:
            return _forgotten(answer, now, request_id)
        return _refused(answer, now, backoff if answer.status == 429 else refusals,
                        refused_retry)
    if isinstance(answer, SharesUnusable):
        return _unusable(answer, now, backoff, request_id)
    if isinstance(answer, RequestStatus):
        untried = sorted({r.version for r in answer.releases} - refused, reverse=True)
        if untried:
            return Step(Kind.TRY_KEYS, versions=tuple(untried))
        answer = Tried(answer)
    return _after_keys(answer, refused, now, refusals, refused_retry)


def _after_keys(tried: Tried, refused: Set[int], now: float, refusals: Backoff,
                refused_retry: float) -> Step:
    """No key of this status unlocks the manager: wait for the custodians, or stop waiting."""
    status = tried.status
    request_id = status.request_id
    refused = refused | tried.refused
    if refused and status.needed == 0:
        return Step(Kind.GIVE_UP, Reason.NO_VERSION_UNLOCKS, until=now + refused_retry,
                    status=f"locked; no escrowed key version unlocks this manager (request "
                           f"{request_id})",
                    lines=(Line(Level.ERROR, "none of the escrowed key versions (%s) unlocks "
                                "this manager: the key in use was never escrowed. Unlock by hand "
                                "or from paper shares (`escrow recover --unlock`), then run "
                                "`unseal-agent enroll`", (_versions(refused),),
                                request_id=request_id),))
    step = _ended(status, now, refusals, refused_retry) or _poll(status)
    if tried.refused:
        older = Line(Level.INFO, "key version(s) %s do not unlock this manager; waiting for "
                     "approvals of the newest version", (_versions(refused),),
                     request_id=request_id)
        step = dataclasses.replace(step, lines=(older, *step.lines))
    return step


def _ended(status: RequestStatus, now: float, refusals: Backoff,
           refused_retry: float) -> Step | None:
    """The step after a request that ended without a key; None while it is pending. A denial
    is a person's decision, asked about again only after the full wait; a revocation may be
    undone by an admin at any moment, so it is asked about again with the refusals' back-off."""
    request_id = status.request_id
    state = RequestState(status.state)
    if state == RequestState.DENIED:
        return Step(Kind.GIVE_UP, Reason.DENIED, until=now + refused_retry,
                    status=f"locked; request {request_id} was denied, asking again in "
                           f"{refused_retry:.0f} s",
                    lines=(Line(Level.ERROR, "a custodian denied unseal request %s: %s; asking "
                                "again in %.0f s", (request_id, plain(
                                    status.denial_reason or "no reason given"), refused_retry),
                                request_id=request_id),))
    if state in (RequestState.EXPIRED, RequestState.SUPERSEDED, RequestState.COMPLETED):
        return Step(Kind.NEW_REQUEST, Reason.ENDED, until=now, lines=(Line(
            Level.INFO, "unseal request %s ended (%s) before a quorum; asking again",
            (request_id, status.state), request_id=request_id),))
    if state == RequestState.REVOKED:
        return Step(Kind.GIVE_UP, Reason.REVOKED,
                    until=now + min(refused_retry, refusals.next_delay()),
                    status="locked; this node is revoked at the escrow",
                    lines=(Line(Level.ERROR, "the escrow ended request %s while it waited "
                                "(%s); an admin can re-admit this node with `escrow node "
                                "allow`", (request_id, plain(status.denial_reason or
                                                             "node revoked")),
                                request_id=request_id),))
    return None


def _poll(status: RequestStatus) -> Step:
    need, request_id = status.needed, status.request_id
    if need == 0:  # nothing released, none missing: the escrow holds the request back
        return Step(Kind.POLL,
                    status=f"locked, the escrow holds request {request_id} back for up to one "
                           "heartbeat interval",
                    lines=(Line(Level.INFO, "the escrow holds request %s back: another boot "
                                "of this node beat recently (a crash, or a copy of this "
                                "machine); waiting", (request_id,), once=Topic.WAITING,
                                request_id=request_id),))
    return Step(Kind.POLL,
                status=f"locked, waiting for {need} more approval{'s' if need != 1 else ''} "
                       f"(request {request_id}, expires {status.expires_at})",
                lines=(Line(Level.INFO, "waiting for %d more approval(s) of request %s",
                            (need, request_id), once=Topic.WAITING, request_id=request_id),))


def _escrow_down(exc: EscrowUnavailable, now: float, backoff: Backoff, request_id: str) -> Step:
    delay = backoff.next_delay()
    waiting = f" (request {request_id})" if request_id else ""
    return Step(Kind.WAIT if request_id else Kind.NEW_REQUEST, Reason.ESCROW_DOWN,
                until=now + delay,
                status=f"locked; escrow unreachable{waiting}, retrying in {delay:.0f} s",
                lines=(Line(Level.WARNING, "%s; retrying with back-off", (exc.message,),
                            once=Topic.ESCROW_DOWN),))


def _refused(exc: EscrowRejected, now: float, backoff: Backoff, refused_retry: float) -> Step:
    """`backoff` is the escrow failures' for a rate limit, which lifts by itself, and the
    refusals' otherwise: an admin may re-admit the node (`escrow node allow`) at any moment,
    so it asks again within seconds at first, then less and less often."""
    limited = exc.status == 429
    delay = min(refused_retry, backoff.next_delay())
    return Step(Kind.NEW_REQUEST if limited else Kind.GIVE_UP,
                Reason.RATE_LIMITED if limited else Reason.REFUSED, until=now + delay,
                status=f"locked; the escrow refused this node ({exc.reason}); asking again in "
                       f"{delay:.0f} s",
                lines=(Line(Level.ERROR, "cannot unseal: %s%s",
                            (exc.message, f" ({exc.hint})" if exc.hint else ""),
                            once=Topic.REFUSED),),
                drop_key=True)


def _forgotten(exc: EscrowRejected, now: float, request_id: str) -> Step:
    return Step(Kind.NEW_REQUEST, Reason.FORGOTTEN, until=now, lines=(Line(
        Level.WARNING, "the escrow no longer knows request %s (%s); asking again",
        (request_id, exc.message), request_id=request_id),))


def _unusable(exc: SharesUnusable, now: float, backoff: Backoff, request_id: str) -> Step:
    return Step(Kind.NEW_REQUEST, Reason.SHARES_UNUSABLE, until=now + backoff.next_delay(),
                status=f"locked; the escrow's shares were unusable (request {request_id}), "
                       "asking again later",
                lines=(Line(Level.ERROR, "%s (%s)", (exc.message, exc.hint),
                            request_id=request_id),))


def _versions(versions: Set[int]) -> str:
    return ", ".join(map(str, sorted(versions, reverse=True)))
