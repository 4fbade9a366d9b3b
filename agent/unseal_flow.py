"""A locked manager: request an unseal, then perform the steps agent/decision.py gives, one at a
time (try keys, poll, wait, or stop), until a key unlocks the manager or the request is over.

A combined key exists from `candidate_keys` combining it to the unlock call and is dropped
right after; it is never logged, written, or passed on a command line. Older versions are
combined only if the newer one does not unlock.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.backoff import Backoff
from agent.decision import Answer, Kind, Step, Tried, decide
from agent.docker_state import DockerUnavailable
from agent.errors import AgentError, EscrowRejected, EscrowUnavailable, SharesUnusable
from agent.host import BadHostname, boot_id, hostname
from agent.log import Level, Topic
from agent.node_watch import NodeWatch
from agent.parts import Parts
from agent.release import candidate_keys
from agent.state import LastUnlock
from agent.swarm_identity import NodeIdentity, read_identity
from escrow.core.protocol import RequestStatus
from escrow.core.states import Outcome


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class _Request:
    """One unseal request this agent made."""

    request_id: str
    identity: NodeIdentity
    agent_key: ec.EllipticCurvePrivateKey
    ephemeral: X25519PrivateKey  # opens the shares released to this request
    seen_locked: float


class UnsealFlow:
    def __init__(self, parts: Parts, node: NodeWatch,
                 on_unlock: Callable[[NodeIdentity, LastUnlock], None]) -> None:
        self.parts = parts
        self.config = parts.config
        self.log = parts.log
        self.node = node
        self.on_unlock = on_unlock
        # Refusals of this node, apart from the escrow's failures (parts.backoff): a node that
        # an admin re-admits is unlocked within seconds, and a node that stays refused asks
        # less and less often, up to refused_retry_seconds.
        self.refusals = Backoff(first=2.0, cap=self.config.refused_retry_seconds)

    async def attempt(self) -> float:
        """One unseal request, followed to its end; the monotonic time to ask again at."""
        seen_locked = time.monotonic()
        show = self.parts.runtime.notifier.status
        try:
            identity = read_identity(self.config.docker_root)
        except AgentError as exc:
            self.log.once(Topic.IDENTITY, Level.ERROR, "locked, but %s", exc.message)
            show(f"locked; cannot read the swarm certificates: {exc.message}")
            return seen_locked + self.config.refused_retry_seconds
        self.log.clear(Topic.IDENTITY)
        self.log.about(identity.node_id, identity.cluster_id)
        agent_key = self.parts.key.get()
        if agent_key is None:
            show("locked; no usable agent key (not enrolled?): unlock by hand, then run "
                 "`unseal-agent enroll`")
            return seen_locked + self.config.refused_retry_seconds
        try:
            name = hostname()
        except BadHostname as exc:
            self.log.once(Topic.HOSTNAME, Level.ERROR, "locked, but %s (%s)", exc.message,
                          exc.hint)
            show(f"locked; {exc.message}")
            return seen_locked + self.config.refused_retry_seconds
        self.log.clear(Topic.HOSTNAME)
        show("locked; asking the escrow to unseal")
        self.log.once(Topic.LOCKED, Level.INFO, "the manager is locked; asking the escrow to "
                      "unseal (key generation %s)", identity.kek_version or "unknown")
        try:
            answer, ephemeral = await self.parts.client.unseal(
                identity.cluster_id, identity.node_id, identity.cert_pem, agent_key, name,
                boot_id(), identity.kek_version)
        except (EscrowUnavailable, EscrowRejected) as exc:
            return self._next(exc, set(), "").until
        self.parts.backoff.reset()
        self.refusals.reset()
        self.log.clear(Topic.ESCROW_DOWN)
        self.log.clear(Topic.REFUSED)
        newest = max((r.version for r in answer.releases), default=0)
        self.log.info("unseal request %s: %d of %d shares released", answer.request_id,
                      len({r.slot for r in answer.releases if r.version == newest}),
                      answer.threshold, REQUEST_ID=answer.request_id)
        request = _Request(answer.request_id, identity, agent_key, ephemeral, seen_locked)
        return await self._follow(request, answer)

    def _next(self, answer: Answer, refused: set[int], request_id: str) -> Step:
        """The decided step, its lines written and its status shown."""
        step = decide(answer, refused, time.monotonic(), backoff=self.parts.backoff,
                      refusals=self.refusals, refused_retry=self.config.refused_retry_seconds,
                      request_id=request_id)
        for line in step.lines:
            self.log.write(line)
        if step.status:
            self.parts.runtime.notifier.status(step.status)
        if step.drop_key:
            self.parts.key.drop()
        return step

    async def _follow(self, request: _Request, status: RequestStatus) -> float:
        """Perform the steps of one request until it yields a key, ends, or the node is no
        longer locked; the monotonic time to ask again at."""
        refused: set[int] = set()
        answer: Answer = status
        while True:
            step = self._next(answer, refused, request.request_id)
            if step.kind is Kind.TRY_KEYS:
                tried = await self._try_keys(request, status, step.versions)
                if tried is None:
                    return time.monotonic()
                if isinstance(tried, Tried):
                    refused |= tried.refused
                answer = tried
            elif step.kind is Kind.POLL:
                answer = await self._poll(request.request_id)
                if isinstance(answer, RequestStatus):
                    status = answer
                    if not await self._still_locked(request.request_id):
                        return time.monotonic()
            elif step.kind is Kind.WAIT:
                await self.parts.runtime.sleep(step.until - time.monotonic())
                if not await self._still_locked(request.request_id):
                    return time.monotonic()
                answer = Tried(status)
            else:
                return step.until

    async def _poll(self, request_id: str) -> Answer:
        self.parts.runtime.beat()
        try:
            status = await self.parts.client.poll(request_id, self.config.approval_wait_seconds)
        except (EscrowUnavailable, EscrowRejected) as exc:
            return exc
        self.parts.backoff.reset()
        self.log.clear(Topic.ESCROW_DOWN)
        return status

    async def _still_locked(self, request_id: str) -> bool:
        if await self.node.state() == "locked":
            return True
        self.log.info("the manager is no longer locked; dropping request %s", request_id,
                      REQUEST_ID=request_id)
        return False

    async def _try_keys(self, request: _Request, status: RequestStatus,
                        versions: tuple[int, ...]) -> Tried | SharesUnusable | None:
        """Try the keys of `versions` in turn: what dockerd refused, or why no key could be
        tried; None once one unlocked the manager, or dockerd went away meanwhile."""
        request_id = request.request_id
        skip = frozenset(r.version for r in status.releases).difference(versions)
        try:
            candidates = candidate_keys(status, request.ephemeral, skip)
            candidate = next(candidates, None)
        except SharesUnusable as exc:
            return exc
        refused: set[int] = set()
        try:
            while candidate is not None:
                version, key = candidate
                del candidate
                unlocked = await self.parts.runtime.call(
                    functools.partial(self.parts.docker.unlock, key))
                del key
                if unlocked:
                    break
                refused.add(version)
                self.log.warning("key version %d does not unlock this manager", version,
                                 KEY_VERSION=str(version), REQUEST_ID=request_id)
                self._report(request, Outcome.INVALID_KEY, version)
                candidate = next(candidates, None)
            else:
                return Tried(status, frozenset(refused))
        except (DockerUnavailable, SharesUnusable) as exc:
            self.log.warning("unlock abandoned: %s", exc.message, REQUEST_ID=request_id)
            return None
        await self._unlocked(request, version)
        return None

    async def _unlocked(self, request: _Request, version: int) -> None:
        seconds = time.monotonic() - request.seen_locked
        request_id = request.request_id
        self._report(request, Outcome.UNLOCKED, version)
        self.log.info("unlocked the manager with key version %d (request %s) %.2f s after "
                      "seeing it locked", version, request_id, seconds,
                      KEY_VERSION=str(version), REQUEST_ID=request_id)
        self.log.clear(Topic.LOCKED)
        self.log.clear(Topic.WAITING, request_id)
        self.on_unlock(request.identity, LastUnlock(_now(), version, request_id,
                                                    round(seconds, 3)))
        self.parts.runtime.notifier.status(f"unlocked at {_now()} with key version {version}; "
                                           "waiting for the manager to become active")
        await self.node.wait_active()

    def _report(self, request: _Request, outcome: Outcome, version: int) -> None:
        """Report in the background: the audit record matters, but must not hold up the
        unlock. A few tries, then a warning."""
        request_id = request.request_id

        async def send() -> None:
            backoff = Backoff(first=1.0, cap=10.0)
            for _ in range(5):
                try:
                    await self.parts.client.report(request_id, request.identity.node_id,
                                                   request.agent_key, outcome.value, version)
                except EscrowRejected as exc:
                    self.log.warning("the escrow did not record the result of request %s: %s",
                                     request_id, exc.message, REQUEST_ID=request_id)
                    return
                except EscrowUnavailable:
                    await asyncio.sleep(backoff.next_delay())
                else:
                    return
            self.log.warning("could not report the result of request %s to the escrow",
                             request_id, REQUEST_ID=request_id)
        self.parts.runtime.in_background(send())
