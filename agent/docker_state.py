"""The local docker daemon, through its API (never its CLI, so no key ever sits in an argv)."""

from __future__ import annotations

from typing import Any

import docker
import docker.errors
import requests

from agent.errors import AgentError
from escrow import unlockkey
from escrow.unlockkey import UnlockKey


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

    def autolock(self) -> bool:
        spec = self._api().inspect_swarm()["Spec"]
        return bool(spec.get("EncryptionConfig", {}).get("AutoLockManagers"))

    def unlock_key(self) -> UnlockKey:
        return unlockkey.parse(self._api().get_unlock_key()["UnlockKey"])

    def unlock(self, key: UnlockKey) -> bool:
        """True if the key unlocked the manager, False if dockerd said it is the wrong key."""
        try:
            self._api().unlock_swarm(key.swmkey())
        except docker.errors.APIError as exc:
            if exc.status_code == 401 or "invalid key" in str(exc.explanation):
                return False
            raise DockerUnavailable(f"dockerd refused the unlock: {exc.status_code}",
                                    "see `journalctl -u docker`") from None
        return True
