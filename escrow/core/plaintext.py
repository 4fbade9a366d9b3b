"""Text from outside the process is plain text, and is shown as plain text only.

Hostnames, boot ids, deny reasons, audit details and error messages come from nodes, custodians
or the escrow; a terminal, rich's markup, a chat's markdown or a log reader may otherwise take
part of them for instructions (``[/]`` is a rich markup error, ``\\x1b[2K\\r`` erases the line a
custodian reads before approving, U+202E reverses it). Two halves of one rule:

- the ``check_*`` functions refuse such text where it enters (escrow.core.protocol's request models,
  the CLI's options, the agent before it sends): they raise ValueError, which pydantic reports
  as a 400 naming the field;
- :func:`plain` is applied wherever text is shown (CLI tables and messages, the agent's output,
  log lines, the webhook), so what was stored before these rules, or comes from a peer that
  does not follow them, is still shown as text: each unsafe character as its escape.

Standard library only: the agent and every CLI command import it.
"""

from __future__ import annotations

import logging
import re

# C0 controls and DEL, C1 controls, the bidi marks, embeddings, overrides and isolates (U+061C,
# U+200E-U+200F, U+202A-U+202E, U+2066-U+2069), the line and paragraph separators, and lone
# surrogates (a JSON body may carry "\ud800"; printing one raises UnicodeEncodeError).
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                    "\u2066-\u2069\ud800-\udfff]")
TEXT_RULE = ("plain text: no control characters (C0, DEL, C1, so no newline or tab) and no "
             "bidirectional formatting characters")

# RFC 1123 host names: dot-separated labels of letters, digits and '-', 1-63 characters, not
# starting or ending with '-', 253 characters in all. No trailing dot (gethostname() never has
# one, and a name should have one spelling) and no '_' (not a host name character, and a
# markdown emphasis marker).
MAX_HOSTNAME = 253
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
HOSTNAME_RULE = ("a DNS host name (RFC 1123): dot-separated labels of letters, digits and '-', "
                 "1-63 characters each, not starting or ending with '-', at most 253 "
                 "characters, no trailing dot")

# The kernel's boot id (/proc/sys/kernel/random/boot_id) is a lower-case UUID, which is what
# the agent sends, or "unknown" when it cannot read it; nothing else is a boot id.
MAX_BOOT_ID = 36
UNKNOWN_BOOT_ID = "unknown"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BOOT_ID_RULE = ("the kernel's boot id, a lower-case UUID (/proc/sys/kernel/random/boot_id), "
                f"or {UNKNOWN_BOOT_ID!r}")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def plain(value: object) -> str:
    """``value`` as text that shows as itself on a terminal, in rich (as a ``Text``, never as
    markup), in a log line and in chat: every unsafe character as its escape (``\\x1b``,
    ``\\u202e``). Text without one comes back unchanged."""
    text = value if isinstance(value, str) else str(value)
    return UNSAFE.sub(_escape, text)


def check_plain_text(text: str) -> str:
    """``text`` if it is plain text; ValueError naming the first unsafe character otherwise."""
    found = UNSAFE.search(text)
    if found is not None:
        raise ValueError(f"must be {TEXT_RULE}; found {_escape(found)} at position "
                         f"{found.start()}")
    return text


def check_hostname(name: str) -> str:
    if len(name) > MAX_HOSTNAME or _HOSTNAME.fullmatch(name) is None:
        raise ValueError(f"must be {HOSTNAME_RULE}")
    return name


def check_boot_id(boot_id: str) -> str:
    if not (is_uuid(boot_id) or boot_id == UNKNOWN_BOOT_ID):
        raise ValueError(f"must be {BOOT_ID_RULE}")
    return boot_id


def is_uuid(text: str) -> bool:
    """True for a lower-case 8-4-4-4-12 UUID, the form of the kernel's boot id."""
    return _UUID.fullmatch(text) is not None


class PlainLogArgs(logging.Filter):
    """Passes every string argument of a log record through :func:`plain`, so a value quoted
    in a log line cannot start a forged line or carry terminal escapes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(plain(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: plain(v) if isinstance(v, str) else v
                           for k, v in record.args.items()}
        return True
