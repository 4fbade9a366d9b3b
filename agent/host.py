"""What the agent tells the escrow about this machine besides its swarm identity: the host name
custodians see, and the boot id that tells one boot's requests from the next one's. Both are
checked here, before anything is signed or sent, against the rules the escrow enforces
(escrow.plaintext)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

from agent.errors import AgentError
from escrow.core import plaintext

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# The unit passes systemd's boot id (%b). In a container (systemd-nspawn, LXC) that is the
# container's own, while the unit's sandbox mounts a fresh /proc, where the file above is the
# host kernel's: the same for every container of the host and for every restart of one.
BOOT_ID_VARIABLE = "UNSEAL_AGENT_BOOT_ID"
UNKNOWN_BOOT = plaintext.UNKNOWN_BOOT_ID


class BadHostname(AgentError):
    """This machine's host name is not one the escrow accepts (and custodians could read)."""


def hostname() -> str:
    """This machine's host name; BadHostname unless it is a DNS name (RFC 1123)."""
    name = socket.gethostname()
    try:
        return plaintext.check_hostname(name)
    except ValueError:
        raise BadHostname(
            f"this machine's host name '{plaintext.plain(name)}' is not a DNS name, so the "
            f"escrow would refuse it: it must be {plaintext.HOSTNAME_RULE}",
            "give the machine a DNS host name, e.g. `hostnamectl set-hostname manager-1`",
        ) from None


def boot_id(path: Path = BOOT_ID, environ: Mapping[str, str] = os.environ) -> str:
    """This boot's id (a lower-case UUID): systemd's where the unit gives it, else the
    kernel's, or "unknown" where neither can be read or is one: custodians then see that it
    is unknown, and the request is sent all the same."""
    value = environ.get(BOOT_ID_VARIABLE)
    if value is None:
        try:
            value = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return UNKNOWN_BOOT
    try:
        # systemd writes it as 32 hex digits, the kernel with dashes.
        value = str(uuid.UUID(value.strip()))
    except ValueError:
        return UNKNOWN_BOOT
    return value if plaintext.is_uuid(value) else UNKNOWN_BOOT
