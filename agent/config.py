"""The agent's settings: /etc/unseal-agent/config.toml, each key also a command-line flag
(--escrow-url) and an environment variable (UNSEAL_AGENT_ESCROW_URL); a flag wins over the
variable, the variable over the file.

    escrow_url              https://escrow.example:8443  (required); several replicas of the
                            escrow in order of preference: a list in the file
                            (["https://escrow-1:8443", "https://escrow-2:8443"]), or one
                            string with the URLs separated by commas (so on the command line)
    escrow_ca               the escrow's CA certificate   (required)
    docker_host             unix:///var/run/docker.sock
    docker_root             /var/lib/docker               (for swarm/certificates/)
    state_dir               /var/lib/unseal-agent         (agent key, 0600; state.json)
    agent_key_pkcs11_module  a PKCS#11 module: keep the agent key in a token instead (e.g.
                             a TPM through tpm2-pkcs11), with
    agent_key_pkcs11_token   the token's label,
    agent_key_pkcs11_label   the key pair's label (unseal-agent), and the token's user PIN
    agent_key_pkcs11_pin_file  in this file or the systemd credential agent-key-pin
    docker_poll_seconds     0.25   how often to look for dockerd while it does not answer, where
                                   it keeps no docker.pid beside its socket (else inotify)
    key_check_seconds       10     how often an unlocked manager's key is checked for rotation
    approval_wait_seconds   20     length of one long poll while custodians decide
    retry_max_seconds       60     cap of the back-off while the escrow is unreachable
    refused_retry_seconds   300    wait before asking again after a denial, and the cap of the
                                   back-off after a refusal (which starts at 2 s)
    heartbeat_seconds       30     how often the running agent tells the escrow it is up
    escrow_deposit_key_sha256  the escrow's deposit key fingerprint (64 hex digits): when set,
                             deposits go only to that key, and it wins over the key pinned at
                             enrollment (agent/deposit_key.py)

Whoever can change the config file or the CA file can send the agent to an escrow of their
choosing, so both must be owned by root (or the agent's own user) and writable by no one else,
and so must the directories they are in; a symlink is followed and its target checked. The
config holds no secret (a PIN file's path at most, never a PIN), so it may be world-readable.

Of several escrow URLs, the agent asks the one that answered last (the first, at start), and
the next ones only when it cannot take a request (escrow.core.failover says when): replicas
share one database and one deposit key, so one escrow_deposit_key_sha256 pins them all.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from escrow.core import failover, tomlfile

DEFAULT_CONFIG = Path("/etc/unseal-agent/config.toml")
ENV_PREFIX = "UNSEAL_AGENT_"
# Where an agent's user gives the escrow's CA, for the errors that name it.
CA_SETTING = "escrow_ca in the agent's config, or --escrow-ca"


@dataclass(frozen=True)
class AgentConfig:
    escrow_url: tuple[str, ...]  # in order of preference
    escrow_ca: Path
    docker_host: str = "unix:///var/run/docker.sock"
    docker_root: Path = Path("/var/lib/docker")
    state_dir: Path = Path("/var/lib/unseal-agent")
    agent_key_pkcs11_module: str = ""
    agent_key_pkcs11_token: str = ""
    agent_key_pkcs11_label: str = "unseal-agent"
    agent_key_pkcs11_pin_file: str = ""
    docker_poll_seconds: float = 0.25
    key_check_seconds: float = 10.0
    approval_wait_seconds: float = 20.0
    retry_max_seconds: float = 60.0
    refused_retry_seconds: float = 300.0
    heartbeat_seconds: float = 30.0
    escrow_deposit_key_sha256: str = ""

    @property
    def agent_key_path(self) -> Path:
        return self.state_dir / "agent-key.pem"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"


_KNOWN = {f.name: f for f in fields(AgentConfig)}
SETTINGS = tuple(_KNOWN)
SECONDS = frozenset(name for name in _KNOWN if name.endswith("_seconds"))


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()
# The server holds a long poll for at most 60 s; anything longer is a typo, not a choice. A
# heartbeat's interval is bounded by what the escrow accepts (HeartbeatRequest).
_LIMITS = {"docker_poll_seconds": (0.05, 10.0), "key_check_seconds": (1.0, 3600.0),
           "approval_wait_seconds": (1.0, 60.0), "retry_max_seconds": (1.0, 3600.0),
           "refused_retry_seconds": (1.0, 86400.0), "heartbeat_seconds": (5.0, 3600.0)}


def _shown(value: Any) -> str:
    """A short repr for messages (repr() of an integer of over 4300 digits even raises)."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 40 else text[:37] + "..."


def _check(source: str, key: str, value: Any) -> Any:
    if key not in _KNOWN:
        raise AgentError(f"{source}: unknown setting {key!r}",
                         f"known settings: {', '.join(_KNOWN)}")
    if key in SECONDS:
        low, high = _LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                low <= value <= high):
            raise AgentError(f"{source}: {key} must be a number of seconds from {low:g} to "
                             f"{high:g}, not {_shown(value)}",
                             f"for example {key} = {low * 4:g}")
        return float(value)
    if key == "escrow_deposit_key_sha256":
        if not isinstance(value, str) or len(value) != 64 or not all(
                c in "0123456789abcdef" for c in value.lower()):
            raise AgentError(f"{source}: {key} must be a SHA-256 fingerprint (64 hexadecimal "
                             f"digits), not {_shown(value)}",
                             'read it on the escrow host (README, "The node agent")')
        return value.lower()
    if key == "escrow_url":
        return _urls(source, value)
    if not isinstance(value, str) or not value:
        raise AgentError(f"{source}: {key} must be a non-empty string",
                         f'for example {key} = "..."')
    return value


def _urls(source: str, value: Any) -> tuple[str, ...]:
    example = ('for example escrow_url = "https://escrow.example:8443", or for replicas '
               'escrow_url = ["https://escrow-1.example:8443", "https://escrow-2.example:8443"]')
    listed = isinstance(value, list) and all(isinstance(item, str) for item in value)
    if not (isinstance(value, str) or listed):
        raise AgentError(f"{source}: escrow_url must be a URL or a list of URLs, not "
                         f"{_shown(value)}", example)
    try:
        return failover.parse_urls(value)
    except ValueError as exc:
        raise AgentError(f"{source}: escrow_url {exc}",
                         "the agent talks to the escrow over TLS only, at https://HOST[:PORT]; "
                         + example) from None


def exposure(mode: int, owner: int, trusted: set[int]) -> str:
    """Pure: why a file or directory with this mode and owner may be changed by someone other
    than the trusted users ("" if it may not). A sticky directory (/tmp) is fine: nobody can
    replace what another user put in it."""
    problems = []
    if owner not in trusted:
        problems.append("is owned by another user")
    if mode & 0o022 and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        problems.append("is writable by " + ("group and others" if mode & 0o022 == 0o022
                                             else "others" if mode & 0o002 else "its group"))
    return " and ".join(problems)


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_file(path: Path, what: str, file_mode: str) -> None:
    """Refuse ``path`` unless only root or this process's user can change what it holds: the
    file (a symlink's target) and every directory above it, the link's and the target's."""
    trusted = {0, os.geteuid()}
    target = Path(os.path.realpath(path))
    shown = f"{what} {path}" + (f" (a link to {target})" if target != Path(
        os.path.abspath(path)) else "")
    places = [target, *target.parents, *Path(os.path.abspath(path)).parents]
    for place in dict.fromkeys(places):
        try:
            info = os.stat(place)
        except OSError as exc:
            raise AgentError(f"cannot check the owner and mode of {place} ({what}): "
                             f"{exc.strerror}", "run the agent as root") from None
        problem = exposure(info.st_mode, info.st_uid, trusted)
        if not problem:
            continue
        mode, owner = f"{stat.S_IMODE(info.st_mode):04o}", _owner(info.st_uid)
        if place == target:
            raise AgentError(f"{shown} {problem} (owner {owner}, mode {mode}): whoever can "
                             "change it can send this agent to an escrow of their choosing",
                             f"chown root:root {target}; chmod {file_mode} {target}")
        raise AgentError(f"{shown} is in the directory {place}, which {problem} (owner "
                         f"{owner}, mode {mode}): whoever can change it can replace the file",
                         f"chown root:root {place}; chmod go-w {place}")


def load(path: Path | None, overrides: Mapping[str, Any],
         from_environment: Collection[str] = ()) -> AgentConfig:
    """Read the file (if it exists, or fail if it was named explicitly) and apply flags (or
    environment variables: those named in ``from_environment``, for the errors)."""
    values: dict[str, Any] = {}
    source = path or DEFAULT_CONFIG
    document = tomlfile.read(source, "the config file", "it must be a regular file the agent "
                             "can read: run it as root or fix the file's permissions", AgentError)
    if document is None and path is not None:
        raise AgentError(f"the config file {source} does not exist",
                         "create it or drop --config")
    if document is not None:
        check_file(source, "the config file", "0600")
        values = {key: _check(str(source), key, value) for key, value in document.items()}
    values.update({key: _check(env_name(key) if key in from_environment else flag_name(key),
                               key, value)
                   for key, value in overrides.items() if value is not None})
    for required in ("escrow_url", "escrow_ca"):
        if required not in values:
            raise AgentError(f"{required} is not set",
                             f"set it in {source}, pass {flag_name(required)} or set "
                             f"{env_name(required)}")
    if values.get("agent_key_pkcs11_module") and not values.get("agent_key_pkcs11_token"):
        raise AgentError("agent_key_pkcs11_module is set but agent_key_pkcs11_token is not",
                         "name the token that holds (or will hold) the agent key")
    for key in ("escrow_ca", "docker_root", "state_dir"):
        if key in values:
            values[key] = Path(values[key])
    if os.path.exists(values["escrow_ca"]):  # a missing one is reported where it is loaded
        check_file(values["escrow_ca"], "the escrow CA (escrow_ca)", "0644")
    return AgentConfig(**values)
