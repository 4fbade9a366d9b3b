"""`unseal-agent run`: watch the local manager; when it is locked, unlock it from escrowed
shares; while it is unlocked, make sure the escrow holds its current key.

One task does the work, in this order on every turn: ask dockerd for the node's state, then
- not answering: look again every `docker_poll_seconds` (a missing socket costs dockerd
  nothing), so a restarted daemon is seen well within a second of its API answering;
- `locked`: request an unseal, wait for the quorum, combine, unlock, report;
- `active`: check the unlock key for rotation, then wait on dockerd's event stream, which ends
  when dockerd stops (or after `key_check_seconds`), so an idle agent does not poll.
A second task pings systemd's watchdog while the first keeps making progress.

A combined key exists from `candidate_keys` combining it to the unlock call and is dropped
right after; it is never logged, written, or passed on a command line. Older versions are
combined only if the newer one does not unlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import keys
from agent import state as agent_state
from agent.backoff import Backoff
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.deposit import ensure_escrowed, pin_deposit_key
from agent.docker_state import Docker, DockerUnavailable
from agent.errors import (
    AgentError,
    DepositKeyMismatch,
    EscrowRejected,
    EscrowUnavailable,
    SharesUnusable,
)
from agent.host import BadHostname, boot_id, hostname
from agent.release import candidate_keys
from agent.state import AgentState, LastUnlock
from agent.swarm_identity import CERT_DIR, NodeIdentity, kek_version, read_identity
from agent.token_key import TokenKey
from escrow.core.errors import EscrowError
from escrow.core.notify import Notifier, watchdog_interval
from escrow.core.plaintext import plain
from escrow.core.protocol import RequestStatus
from escrow.core.states import Outcome, RequestState
from escrow.core.tls import client_context
from escrow.core.unlockkey import UnlockKey

T = TypeVar("T")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# dockerd can take seconds to answer /info right after an unlock (the manager rejoins).
ACTIVE_TIMEOUT = 60.0
# Every docker and escrow call is bounded well below this, so a turn that takes longer is a
# hang, and systemd's watchdog should see it.
STALL_LIMIT = 120.0


def _versions(versions: set[int]) -> str:
    return ", ".join(map(str, sorted(versions, reverse=True)))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Agent:
    def __init__(self, config: AgentConfig, docker: Docker, client: EscrowClient,
                 notifier: Notifier, log: logging.Logger) -> None:
        self.config = config
        self.docker = docker
        self.client = client
        self.notifier = notifier
        self.log = log
        self.fields: dict[str, str] = {}
        self._escrow_backoff = Backoff(cap=config.retry_max_seconds)
        self._docker_was_down = False
        self._last_beat = time.monotonic()
        self._idle = False
        self._next_key_check = 0.0
        self._quiet: set[str] = set()  # problems already logged once, until they clear
        self.background: set[asyncio.Task[None]] = set()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._last_unlock: LastUnlock | None = None
        self._not_escrowed = ""  # why the current key may not be escrowed, while it may not

    # -- plumbing ---------------------------------------------------------------------------

    def _info(self, message: str, *args: Any, **fields: str) -> None:
        self.log.info(message, *args, extra={**self.fields, **fields})

    def _warn(self, message: str, *args: Any, **fields: str) -> None:
        self.log.warning(message, *args, extra={**self.fields, **fields})

    def _error(self, message: str, *args: Any, **fields: str) -> None:
        self.log.error(message, *args, extra={**self.fields, **fields})

    def _critical(self, message: str, *args: Any, **fields: str) -> None:
        self.log.critical(message, *args, extra={**self.fields, **fields})

    def _once(self, topic: str, log: Callable[..., None], message: str, *args: Any,
              **fields: str) -> None:
        """Log a lasting problem when it starts, not on every retry."""
        if topic not in self._quiet:
            self._quiet.add(topic)
            log(message, *args, **fields)

    def _clear(self, topic: str) -> None:
        self._quiet.discard(topic)

    def _beat(self) -> None:
        self._last_beat = time.monotonic()

    async def _docker(self, fn: Callable[[], T]) -> T:
        self._beat()
        try:
            return await asyncio.to_thread(fn)
        finally:
            self._beat()

    async def _sleep(self, seconds: float) -> None:
        """A deliberate wait: the watchdog counts it as progress."""
        self._idle = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self._idle = False
            self._beat()

    def healthy(self) -> bool:
        return self._idle or time.monotonic() - self._last_beat < STALL_LIMIT

    async def watchdog(self, interval: float) -> None:
        while True:
            if self.healthy():
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _node_state(self) -> str | None:
        """The node's swarm state, or None while dockerd does not answer."""
        try:
            state = str((await self._docker(self.docker.swarm)).get("LocalNodeState", ""))
        except DockerUnavailable:
            if not self._docker_was_down:
                self._docker_was_down = True
                self._warn("dockerd is not answering at %s; watching for it",
                           self.config.docker_host)
                self._warm_escrow()
            return None
        if self._docker_was_down:
            self._docker_was_down = False
            self._info("dockerd answers again; the swarm is %s", state)
        return state

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _warm_escrow(self) -> None:
        """dockerd went away, so it will most likely come back locked: open the TLS
        connection to the escrow now, so the unseal request does not wait for a handshake."""
        async def touch() -> None:
            with contextlib.suppress(AgentError):
                await self.client.info()
        self._in_background(touch())

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.notifier.ready("watching docker")
        self._info("watching docker at %s; escrow %s", self.config.docker_host,
                   self.config.escrow_url)
        while True:
            self._beat()
            state = await self._node_state()
            if state is None:
                self.notifier.status("docker is not answering; watching for it")
                await self._sleep(self.config.docker_poll_seconds)
            elif state == "locked":
                retry_in = await self._unseal()
                if retry_in:
                    await self._wait_while_locked(retry_in)
            elif state == "active":
                await self._while_unlocked()
            else:
                self.notifier.status(f"swarm state {state!r}: nothing to unlock; watching")
                await self._watch_docker()

    async def _wait_while_locked(self, seconds: float) -> None:
        """Wait before asking again, but stop waiting as soon as the node is not locked any
        more (unlocked by hand, or dockerd restarted), looking every few seconds."""
        deadline = time.monotonic() + seconds
        while (rest := deadline - time.monotonic()) > 0:
            await self._sleep(min(rest, 5.0))
            if await self._node_state() != "locked":
                return

    async def _watch_docker(self) -> None:
        """Wait until dockerd stops or `key_check_seconds` pass, without polling it."""
        started = time.monotonic()
        try:
            stream = await self._docker(
                lambda: self.docker.events_until(self.config.key_check_seconds))
        except AgentError:
            stream = None
        if stream is not None:
            self._idle = True
            try:
                await asyncio.to_thread(lambda: [None for _ in stream])
            finally:
                self._idle = False
                stream.close()
        # An event stream that ends at once (dockerd shutting down) must not become a spin.
        rest = self.config.docker_poll_seconds - (time.monotonic() - started)
        if rest > 0:
            await self._sleep(rest)

    # -- unlocked: rotation watch -----------------------------------------------------------

    async def _while_unlocked(self) -> None:
        if time.monotonic() >= self._next_key_check:
            self._next_key_check = time.monotonic() + await self._check_key()
        last = self._last_unlock
        status = f"unlocked at {last.at} with key version {last.version}" if last else "unlocked"
        if self._not_escrowed:
            status += f"; the current unlock key is NOT escrowed yet ({self._not_escrowed})"
        self.notifier.status(status + "; watching")
        await self._watch_docker()

    def _load_state(self) -> AgentState:
        try:
            return agent_state.load(self.config.state_path)
        except AgentError as exc:
            self._once("state", self._warn, "%s; starting from an empty state", exc.message)
            return AgentState()

    def _agent_key(self) -> ec.EllipticCurvePrivateKey | None:
        """The agent key, loaded once (a token session stays open for the agent's life)."""
        if self._key is None:
            try:
                self._key = keys.load(self.config)
            except EscrowError as exc:
                self._once("agent-key", self._error, "%s (%s)", exc.message, exc.hint)
                return None
            self._clear("agent-key")
        return self._key

    async def _check_key(self) -> float:
        """Deposit the manager's current unlock key if the escrow may not hold it (someone
        rotated it by hand). Reading the `kek-version:` header is free; the key itself is only
        fetched when that header moved. Returns the seconds until the next check."""
        key_path = self.config.docker_root / CERT_DIR / "swarm-node.key"
        try:
            identity = read_identity(self.config.docker_root)
            kek = kek_version(key_path.read_bytes())
        except (AgentError, OSError):
            return self.config.key_check_seconds
        self.fields = {"NODE_ID": identity.node_id, "CLUSTER_ID": identity.cluster_id}
        # Read each time: `unseal-agent enroll` runs in another process and writes it.
        state = self._load_state()
        if self._last_unlock is None:
            self._last_unlock = state.last_unlock
        if not state.knows(identity.node_id, identity.cluster_id):
            self._once("not-enrolled", self._warn,
                       "this manager is not enrolled with the escrow (no record in %s): run "
                       "`unseal-agent enroll`, or it cannot be unlocked after a restart",
                       self.config.state_path)
            return self.config.key_check_seconds
        self._clear("not-enrolled")
        # A node enrolled before agents pinned the deposit key pins it now, not only at its
        # next deposit: the sooner, the likelier it is the escrow it enrolled with.
        with contextlib.suppress(AgentError):
            await self._pin_deposit_key(state)
        if kek == state.checked_kek_version:
            return self.config.key_check_seconds
        agent_key = self._agent_key()
        if agent_key is None:
            return self.config.key_check_seconds
        try:
            await self._pin_deposit_key(state)
            key = await self._docker(self.docker.unlock_key)
            version, deposited = await ensure_escrowed(self.client, state, agent_key, key)
            del key
        except AgentError as exc:  # escrow or dockerd unreachable, a refusal, a wrong key
            return self._not_deposited(exc)
        self._escrow_backoff.reset()
        self._clear("deposit")
        self._clear("deposit-key")
        self._not_escrowed = ""
        state.checked_kek_version = kek
        agent_state.save(self.config.state_path, state)
        if deposited:
            self._info("escrowed the manager's new unlock key as version %d", version,
                       KEY_VERSION=str(version))
        return self.config.key_check_seconds

    def _not_deposited(self, exc: AgentError) -> float:
        """Log why the current key may not be escrowed (once) and put it in the status;
        returns the seconds until the next try."""
        delay = self._escrow_backoff.next_delay()
        if isinstance(exc, DepositKeyMismatch):  # nothing was sent; the real escrow may return
            self._once("deposit-key", self._critical, "%s; checking again in %.0f s. Until "
                       "then a restart leaves this manager locked (%s)", exc.message, delay,
                       exc.hint)
            self._not_escrowed = (f"the escrow offers deposit key sha256 {exc.offered[:16]}..., "
                                  f"not the pinned {exc.pinned[:16]}...: an impersonator? "
                                  "nothing was sent")
        else:
            self._once("deposit", self._error, "the current unlock key may not be escrowed "
                       "(%s); retrying in %.0f s. Until it is, a restart leaves this manager "
                       "locked", exc.message, delay)
            self._not_escrowed = f"{type(exc).__name__}, retrying in {delay:.0f} s"
        return delay

    async def _pin_deposit_key(self, state: AgentState) -> None:
        if await pin_deposit_key(self.client, state, self.config.escrow_deposit_key_sha256):
            agent_state.save(self.config.state_path, state)
            self._warn("pinned the escrow's deposit key sha256 %s on first use: this node was "
                       "enrolled before agents pinned it; deposits go only to this key from now "
                       "on", state.deposit_key_sha256)

    # -- locked: unseal ---------------------------------------------------------------------

    async def _unseal(self) -> float:
        """One unseal attempt; the seconds to wait before the next (0: at once)."""
        seen_locked = time.monotonic()
        try:
            identity = read_identity(self.config.docker_root)
        except AgentError as exc:
            self._once("identity", self._error, "locked, but %s", exc.message)
            self.notifier.status(f"locked; cannot read the swarm certificates: {exc.message}")
            return self.config.refused_retry_seconds
        self._clear("identity")
        self.fields = {"NODE_ID": identity.node_id, "CLUSTER_ID": identity.cluster_id}
        agent_key = self._agent_key()
        if agent_key is None:
            self.notifier.status("locked; no usable agent key (not enrolled?): unlock by hand, "
                                 "then run `unseal-agent enroll`")
            return self.config.refused_retry_seconds
        try:
            name = hostname()
        except BadHostname as exc:
            self._once("hostname", self._error, "locked, but %s (%s)", exc.message, exc.hint)
            self.notifier.status(f"locked; {exc.message}")
            return self.config.refused_retry_seconds
        self._clear("hostname")
        self.notifier.status("locked; asking the escrow to unseal")
        self._once("locked", self._info, "the manager is locked; asking the escrow to unseal "
                   "(key generation %s)", identity.kek_version or "unknown")
        try:
            status, ephemeral = await self.client.unseal(
                identity.cluster_id, identity.node_id, identity.cert_pem, agent_key,
                name, _boot_id(), identity.kek_version)
        except EscrowUnavailable as exc:
            return self._escrow_down(exc, "")
        except EscrowRejected as exc:
            return self._refused(exc)
        self._escrow_backoff.reset()
        self._clear("escrow-down")
        self._clear("refused")
        newest = max((r.version for r in status.releases), default=0)
        self._info("unseal request %s: %d of %d shares released", status.request_id,
                   len({r.slot for r in status.releases if r.version == newest}),
                   status.threshold, REQUEST_ID=status.request_id)
        return await self._follow(identity, agent_key, status, ephemeral, seen_locked)

    def _escrow_down(self, exc: AgentError, request_id: str) -> float:
        delay = self._escrow_backoff.next_delay()
        self._once("escrow-down", self._warn, "%s; retrying with back-off",
                   exc.message)
        waiting = f" (request {request_id})" if request_id else ""
        self.notifier.status(f"locked; escrow unreachable{waiting}, retrying in {delay:.0f} s")
        return delay

    def _refused(self, exc: EscrowRejected) -> float:
        # The node may have been re-enrolled with a new agent key since it was loaded.
        if isinstance(self._key, TokenKey):
            self._key.close()
        self._key = None
        delay = self.config.refused_retry_seconds
        if exc.status == 429:
            delay = min(delay, self._escrow_backoff.next_delay())
        self._once("refused", self._error, "cannot unseal: %s%s",
                   exc.message, f" ({exc.hint})" if exc.hint else "")
        self.notifier.status(f"locked; the escrow refused this node ({exc.reason}); asking "
                             f"again in {delay:.0f} s")
        return delay

    async def _follow(self, identity: NodeIdentity, agent_key: ec.EllipticCurvePrivateKey,
                      status: RequestStatus, ephemeral: X25519PrivateKey,
                      seen_locked: float) -> float:
        """Wait on one request until it yields a key, ends, or the node is no longer locked."""
        request_id = status.request_id
        fields = {"REQUEST_ID": request_id}
        # Versions dockerd refused: an older version may be complete (auto shares) while the
        # newest still waits for custodians; keep waiting for those rather than giving up.
        refused: set[int] = set()
        while True:
            try:
                candidates = candidate_keys(status, ephemeral, frozenset(refused))
                first = next(candidates, None)
            except SharesUnusable as exc:
                self._error("%s (%s)", exc.message, exc.hint, **fields)
                self.notifier.status(f"locked; the escrow's shares were unusable (request "
                                     f"{request_id}), asking again later")
                return self._escrow_backoff.next_delay()
            if first is not None:
                delay = await self._unlock(identity, agent_key, request_id,
                                           itertools.chain([first], candidates), seen_locked,
                                           refused)
                if delay is not None:
                    return delay
                if status.needed > 0:
                    self._info("key version(s) %s do not unlock this manager; waiting for "
                               "approvals of the newest version", _versions(refused), **fields)
            if refused and status.needed == 0:
                return self._no_version_unlocks(request_id, refused)
            ended = self._ended(status)
            if ended is not None:
                return ended
            need = status.needed
            self.notifier.status(f"locked, waiting for {need} more approval"
                                 f"{'s' if need != 1 else ''} (request {request_id}, expires "
                                 f"{status.expires_at})")
            self._once(f"waiting-{request_id}", self._info, "waiting for %d more approval(s) "
                       "of request %s", need, request_id, **fields)
            try:
                self._beat()
                status = await self.client.poll(request_id, self.config.approval_wait_seconds)
                self._escrow_backoff.reset()
                self._clear("escrow-down")
            except EscrowUnavailable as exc:
                await self._sleep(self._escrow_down(exc, request_id))
            except EscrowRejected as exc:
                self._warn("the escrow no longer knows request %s (%s); asking again",
                           request_id, exc.message, **fields)
                return 0.0
            if await self._node_state() != "locked":
                self._info("the manager is no longer locked; dropping request %s", request_id,
                           **fields)
                return 0.0

    def _ended(self, status: RequestStatus) -> float | None:
        """Seconds before asking again if the request ended without a key, None while it is
        pending."""
        request_id, fields = status.request_id, {"REQUEST_ID": status.request_id}
        state = RequestState(status.state)
        if state == RequestState.DENIED:
            delay = self.config.refused_retry_seconds
            self._error("a custodian denied unseal request %s: %s; asking again in %.0f s",
                        request_id, plain(status.denial_reason or "no reason given"), delay,
                        **fields)
            self.notifier.status(f"locked; request {request_id} was denied, asking again in "
                                 f"{delay:.0f} s")
            return delay
        if state in (RequestState.EXPIRED, RequestState.SUPERSEDED, RequestState.COMPLETED):
            self._info("unseal request %s ended (%s) before a quorum; asking again",
                       request_id, status.state, **fields)
            return 0.0
        if state == RequestState.REVOKED:
            self._error("the escrow revoked this node while request %s was waiting; an admin "
                        "can re-admit it with `escrow node allow`", request_id, **fields)
            self.notifier.status("locked; this node is revoked at the escrow")
            return self.config.refused_retry_seconds
        return None

    async def _unlock(self, identity: NodeIdentity, agent_key: ec.EllipticCurvePrivateKey,
                      request_id: str, candidates: Iterator[tuple[int, UnlockKey]],
                      seen_locked: float, refused: set[int]) -> float | None:
        """Try the candidate keys in turn; None if dockerd refused every one (their versions
        are added to ``refused``), else the seconds to wait before the next turn."""
        fields = {"REQUEST_ID": request_id}
        try:
            for version, key in candidates:
                unlocked = await self._docker(functools.partial(self.docker.unlock, key))
                del key
                if unlocked:
                    break
                refused.add(version)
                self._warn("key version %d does not unlock this manager", version,
                           KEY_VERSION=str(version), **fields)
                self._report(request_id, identity.node_id, agent_key, Outcome.INVALID_KEY,
                             version)
            else:
                return None
        except (DockerUnavailable, SharesUnusable) as exc:
            self._warn("unlock abandoned: %s", exc.message, **fields)
            return 0.0
        seconds = time.monotonic() - seen_locked
        self._report(request_id, identity.node_id, agent_key, Outcome.UNLOCKED, version)
        self._info("unlocked the manager with key version %d (request %s) %.2f s after "
                   "seeing it locked", version, request_id, seconds,
                   KEY_VERSION=str(version), **fields)
        self._clear("locked")
        self._clear(f"waiting-{request_id}")
        self._last_unlock = LastUnlock(_now(), version, request_id, round(seconds, 3))
        state = self._load_state()
        if state.knows(identity.node_id, identity.cluster_id):
            state.last_unlock = self._last_unlock
            agent_state.save(self.config.state_path, state)
        self.notifier.status(f"unlocked at {_now()} with key version {version}; "
                             "waiting for the manager to become active")
        await self._wait_active()
        # Right after an unlock the node may already be on a newer key (it was down during a
        # rotation, and catches up once unlocked): check at once.
        self._next_key_check = 0.0
        return 0.0

    def _no_version_unlocks(self, request_id: str, refused: set[int]) -> float:
        self._error("none of the escrowed key versions (%s) unlocks this manager: the key in "
                    "use was never escrowed. Unlock by hand or from paper shares (`escrow "
                    "recover --unlock`), then run `unseal-agent enroll`", _versions(refused),
                    REQUEST_ID=request_id)
        self.notifier.status(f"locked; no escrowed key version unlocks this manager "
                             f"(request {request_id})")
        return self.config.refused_retry_seconds

    async def _wait_active(self) -> None:
        deadline = time.monotonic() + ACTIVE_TIMEOUT
        while time.monotonic() < deadline:
            if await self._node_state() in ("active", None):
                return
            await self._sleep(0.2)
        self._warn("the manager was unlocked but is not active after %.0f s",
                   ACTIVE_TIMEOUT)

    def _report(self, request_id: str, node_id: str, agent_key: ec.EllipticCurvePrivateKey,
                outcome: Outcome, version: int) -> None:
        """Report in the background: the audit record matters, but must not hold up the
        unlock. A few tries, then a warning."""
        async def send() -> None:
            backoff = Backoff(first=1.0, cap=10.0)
            for _ in range(5):
                try:
                    await self.client.report(request_id, node_id, agent_key, outcome.value,
                                             version)
                except EscrowRejected as exc:
                    self._warn("the escrow did not record the result of request %s: %s",
                               request_id, exc.message, REQUEST_ID=request_id)
                    return
                except EscrowUnavailable:
                    await asyncio.sleep(backoff.next_delay())
                else:
                    return
            self._warn("could not report the result of request %s to the escrow",
                       request_id, REQUEST_ID=request_id)
        self._in_background(send())


def _boot_id() -> str:
    return boot_id(BOOT_ID)


def check_startup(config: AgentConfig) -> None:
    """Fail at start on what no retry can fix: an unreadable escrow CA."""
    client_context(config.escrow_ca)


async def run(config: AgentConfig, log: logging.Logger) -> None:
    """Run until SIGTERM or SIGINT."""
    notifier = Notifier()
    docker = Docker(config.docker_host, timeout=30)
    # Connections kept a minute, so one warmed while dockerd restarts is still open when it
    # comes back locked.
    async with EscrowClient(config.escrow_url, config.escrow_ca, keepalive=60.0) as client:
        agent = Agent(config, docker, client, notifier, log)
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)  # type: ignore[union-attr]
        interval = watchdog_interval()
        watchdog = asyncio.create_task(agent.watchdog(interval)) if interval else None
        try:
            await agent.run()
        except asyncio.CancelledError:
            log.info("stopping")
        finally:
            notifier.stopping()
            for task in [watchdog, *agent.background]:
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*agent.background, return_exceptions=True)
