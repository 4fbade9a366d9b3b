"""The local docker daemon, through its API (never its CLI, so no key ever sits in an argv)."""

from __future__ import annotations

import time
from typing import Any

import docker
import docker.errors
import requests

from agent.errors import AgentError
from escrow.core import unlockkey
from escrow.core.unlockkey import UnlockKey


class DockerUnavailable(AgentError):
    """dockerd is not answering (stopped, restarting, or the socket path is wrong)."""


class Docker:
    def __init__(self, host: str, timeout: int = 30) -> None:
        self.host = host
        self._timeout = timeout
        self._client: Any = None

    def _api(self) -> Any:
        if self._client is None:
            try:
                self._client = docker.APIClient(base_url=self.host, version="1.41",
                                                timeout=self._timeout)
            except docker.errors.DockerException as exc:
                raise DockerUnavailable(f"cannot reach dockerd at {self.host}: {exc}",
                                        "is docker running? is docker_host right?") from None
        return self._client

    def swarm(self) -> dict[str, Any]:
        try:
            return dict(self._api().info()["Swarm"])
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host}: "
                                    f"{type(exc).__name__}", "is docker running?") from None

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._api(), method)(*args, **kwargs)
        except docker.errors.APIError as exc:
            raise AgentError(f"dockerd refused to {what}: {exc.explanation}",
                             "see `journalctl -u docker`") from None
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host} to {what}: "
                                    f"{type(exc).__name__}", "is docker running?") from None

    def autolock(self) -> bool:
        spec = self._call("read the swarm settings", "inspect_swarm")["Spec"]
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
        return unlockkey.parse(self._call("read the unlock key", "get_unlock_key")["UnlockKey"])

    def rotate_unlock_key(self) -> UnlockKey:
        """Rotate and return the new key. The current spec goes along: without it dockerd
        resets the spec, turning autolock off and rewriting the node keys unencrypted."""
        swarm = self._call("read the swarm settings", "inspect_swarm")
        self._call("rotate the unlock key", "update_swarm", version=swarm["Version"]["Index"],
                   swarm_spec=swarm["Spec"], rotate_manager_unlock_key=True)
        if not self.autolock():
            raise AgentError("autolock is off after the rotation", "turn it back on with "
                             "`docker swarm update --autolock=true` and report this")
        return self.unlock_key()

    def events_until(self, seconds: float) -> Any:
        """A stream of daemon events that dockerd itself ends after `seconds`, or at once when
        it stops: iterating it waits for either without polling. Close it to cancel."""
        return self._call("watch events", "events", until=int(time.time() + seconds) + 1,
                          filters={"type": ["daemon"]}, decode=True)

    def unlock(self, key: UnlockKey) -> bool:
        """True if the key unlocked the manager, False if dockerd said it is the wrong key."""
        try:
            self._api().unlock_swarm(key.swmkey())
        except docker.errors.APIError as exc:
            if exc.status_code == 401 or "invalid key" in str(exc.explanation):
                return False
            raise DockerUnavailable(f"dockerd refused the unlock: {exc.status_code}",
                                    "see `journalctl -u docker`") from None
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise DockerUnavailable(f"cannot reach dockerd at {self.host} to unlock: "
                                    f"{type(exc).__name__}", "is docker running?") from None
        return True
