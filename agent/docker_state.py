"""The local docker daemon, through its API (never its CLI, so no key ever sits in an argv).

Six calls, spoken with the standard library over dockerd's socket (or plain TCP where
docker_host says tcp://): docker-py and requests would cost an idle agent about 6 MiB and a
tenth of its start-up. Each call opens a connection of its own, so none is stale after
dockerd restarts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode, urlparse

from agent.errors import AgentError
from escrow.core import unlockkey
from escrow.core.unlockkey import UnlockKey

API = "/v1.41"


class DockerUnavailable(AgentError):
    """dockerd is not answering (stopped, restarting, or the socket path is wrong)."""


class _Refused(Exception):
    """dockerd answered with an error status."""

    def __init__(self, status: int, explanation: str) -> None:
        super().__init__(status, explanation)
        self.status = status
        self.explanation = explanation


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Events:
    """A stream of daemon events that dockerd itself ends at a given time, or at once when it
    stops. `wait` waits for either without polling; `close` cancels it from another thread."""

    def __init__(self, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._connection = connection
        self._response = response

    def wait(self) -> None:
        """Read the stream to its end. A dockerd killed mid-stream cuts it off half-way: that
        is an end like any other."""
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            while self._response.read(65536):
                pass

    def close(self) -> None:
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._connection.close()


def _explanation(body: bytes) -> str:
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()[:200]


class Docker:
    def __init__(self, host: str, timeout: int = 30) -> None:
        self.host = host
        self._timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        url = urlparse(self.host)
        if url.scheme in ("unix", "http+unix") and url.path:
            return _UnixConnection(url.path, timeout)
        if url.scheme in ("tcp", "http") and url.hostname:
            return http.client.HTTPConnection(url.hostname, url.port or 2375, timeout=timeout)
        raise DockerUnavailable(f"cannot reach dockerd at {self.host}: not a unix:// or tcp:// "
                                "address", "is docker_host right?")

    def _open(self, method: str, path: str, query: dict[str, str] | None, body: Any,
              timeout: float | None) -> tuple[http.client.HTTPConnection,
                                              http.client.HTTPResponse]:
        connection = self._connection(timeout)
        target = API + path + ("?" + urlencode(query) if query else "")
        try:
            if body is None:
                connection.request(method, target)
            else:
                connection.request(method, target, body=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException):
            connection.close()
            raise
        if response.status >= 400:
            try:
                explanation = _explanation(response.read())
            finally:
                connection.close()
            raise _Refused(response.status, explanation)
        return connection, response

    def _request(self, what: str, method: str, path: str, query: dict[str, str] | None = None,
                 body: Any = None) -> Any:
        """dockerd's JSON answer; DockerUnavailable if it cannot be reached."""
        try:
            connection, response = self._open(method, path, query, body, self._timeout)
            try:
                data = response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host} to {what}: "
                                    f"{type(exc).__name__}", "is docker running?") from None
        return json.loads(data) if data.strip() else None

    def _call(self, what: str, method: str, path: str, query: dict[str, str] | None = None,
              body: Any = None) -> Any:
        """As _request, and an AgentError naming dockerd's reason if it refused."""
        try:
            return self._request(what, method, path, query, body)
        except _Refused as exc:
            raise AgentError(f"dockerd refused to {what}: {exc.explanation}",
                             "see `journalctl -u docker`") from None

    def swarm(self) -> dict[str, Any]:
        try:
            return dict(self._request("read its state", "GET", "/info")["Swarm"])
        except (_Refused, TypeError, KeyError, ValueError) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host}: "
                                    f"{type(exc).__name__}", "is docker running?") from None

    def autolock(self) -> bool:
        spec = self._call("read the swarm settings", "GET", "/swarm")["Spec"]
        return bool(spec.get("EncryptionConfig", {}).get("AutoLockManagers"))

    def require_autolocked_manager(self) -> None:
        """Raise a clear error unless this node is an unlocked manager of a swarm with
        autolock on (what enrolling and rotating need)."""
        swarm = self.swarm()
        state = swarm.get("LocalNodeState")
        if state == "locked":
            raise AgentError("this manager is locked", "unlock it first (`docker swarm "
                             "unlock`, or `escrow recover` from paper shares), then try again")
        if state != "active":
            raise AgentError(f"this node is not in a swarm (state {state!r})",
                             "run this on managers of a swarm: `docker swarm init --autolock` "
                             "or join one")
        if not swarm.get("ControlAvailable"):
            raise AgentError("this node is a worker, not a manager",
                             "only managers are locked by autolock; run the agent on managers")
        if not self.autolock():
            raise AgentError("autolock is off for this swarm: there is nothing to escrow",
                             "turn it on with `docker swarm update --autolock=true`, then enroll")

    def unlock_key(self) -> UnlockKey:
        return unlockkey.parse(self._call("read the unlock key", "GET",
                                          "/swarm/unlockkey")["UnlockKey"])

    def rotate_unlock_key(self) -> UnlockKey:
        """Rotate and return the new key. The current spec goes along: without it dockerd
        resets the spec, turning autolock off and rewriting the node keys unencrypted."""
        swarm = self._call("read the swarm settings", "GET", "/swarm")
        self._call("rotate the unlock key", "POST", "/swarm/update",
                   {"version": str(swarm["Version"]["Index"]), "rotateWorkerToken": "false",
                    "rotateManagerToken": "false", "rotateManagerUnlockKey": "true"},
                   swarm["Spec"])
        if not self.autolock():
            raise AgentError("autolock is off after the rotation", "turn it back on with "
                             "`docker swarm update --autolock=true` and report this")
        return self.unlock_key()

    def events_until(self, until: int) -> Events:
        """Daemon events until the Unix time `until` (see Events)."""
        query = {"until": str(until), "filters": json.dumps({"type": ["daemon"]})}
        try:
            # No timeout: the stream is silent until it ends.
            return Events(*self._open("GET", "/events", query, None, None))
        except _Refused as exc:
            raise AgentError(f"dockerd refused to watch events: {exc.explanation}",
                             "see `journalctl -u docker`") from None
        except (OSError, http.client.HTTPException) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host} to watch events: "
                                    f"{type(exc).__name__}", "is docker running?") from None

    def unlock(self, key: UnlockKey) -> bool:
        """True if the key unlocked the manager, False if dockerd said it is the wrong key."""
        try:
            self._request("unlock", "POST", "/swarm/unlock", body={"UnlockKey": key.swmkey()})
        except _Refused as exc:
            if exc.status == 401 or "invalid key" in exc.explanation:
                return False
            raise DockerUnavailable(f"dockerd refused the unlock: {exc.status}",
                                    "see `journalctl -u docker`") from None
        return True
