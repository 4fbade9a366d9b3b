"""What the agent tells the escrow about this machine besides its swarm identity: the host name
custodians see, and the boot id that tells one boot's requests from the next one's. Both are
checked here, before anything is signed or sent, against the rules the escrow enforces
(escrow.plaintext)."""

from __future__ import annotations

import socket
from pathlib import Path

from agent.errors import AgentError
from escrow.core import plaintext

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
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


def boot_id(path: Path = BOOT_ID) -> str:
    """The kernel's boot id (a lower-case UUID), or "unknown" where it cannot be read or is not
    one: custodians then see that it is unknown, and the request is sent all the same."""
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_BOOT
    return value if plaintext.is_uuid(value) else UNKNOWN_BOOT
