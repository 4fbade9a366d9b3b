"""What a receiver is sent (pure): a JSON body with the event's fields for programs, and a
``text`` that Slack and Mattermost show as it is (their incoming webhooks read ``text`` and
ignore the rest).

A hostname, a boot id, a deny reason, an alert's details: what a node or a custodian chose is
never markup in ``text``. It goes through escrow.core.plaintext.plain, then ``&``, ``<`` and
``>`` are escaped as Slack asks (so no ``<!channel>``, ``<@U123>`` or
``<https://...|label>``), and it sits in a code span, in which neither Slack nor Mattermost
formats ``*``, ``_`` or ``~`` (a backtick, which would end the span, becomes ``'``; an ``@`` is
followed by a zero-width space, so ``@channel`` mentions no one). The JSON fields carry the
values themselves, only passed through plain().
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from escrow.core.plaintext import plain
from escrow.core.timestamps import timestamp
from escrow.notifications.events import Event, EventKind

ZERO_WIDTH_SPACE = "\u200b"


def chat_code(value: object) -> str:
    """``value`` as a chat code span that Slack and Mattermost show as the literal text."""
    text = plain(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("`", "'").replace("@", "@" + ZERO_WIDTH_SPACE)
    return f"`{text}`"


def plain_json(value: Any) -> Any:
    """``value`` with every string in it (keys too) passed through plain()."""
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, dict):
        return {plain(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    return value


def body(event: Event) -> dict[str, Any]:
    """The JSON object a receiver gets for ``event``."""
    fields = {"event": event.kind.value, "id": event.id, "time": timestamp(event.time),
              "cluster_id": event.cluster_id, "node_id": event.node_id,
              "hostname": event.hostname, "request_id": event.request_id,
              **event.details}
    return {**plain_json(fields), "text": text(event)}


def encoded(event: Event) -> bytes:
    """The bytes posted (and signed): :func:`body` as compact JSON, ASCII only."""
    return json.dumps(body(event), separators=(",", ":")).encode("ascii")


def text(event: Event) -> str:
    return _TEXTS[event.kind](event, chat_code(event.hostname or event.node_id))


def _requested(event: Event, manager: str) -> str:
    text = (f"Swarm manager {manager} is locked and waits for {event.details['needed']} "
            f"custodian approval(s): escrow approve {plain(event.request_id)}")
    by_default = event.details.get("approves_by_default_at")
    if by_default:
        text += (f"; it will be approved by default at {chat_code(by_default)} unless a "
                 f"custodian denies it: escrow deny {plain(event.request_id)} --reason ...")
    return text


def _approved(event: Event, manager: str) -> str:
    needed = event.details["needed"]
    left = f"{needed} more approval(s) needed" if needed else "no more approvals needed"
    return (f"{chat_code(event.details['custodian'])} approved the unseal of swarm manager "
            f"{manager} ({chat_code(event.request_id)}): {left}")


def _denied(event: Event, manager: str) -> str:
    return (f"{chat_code(event.details['custodian'])} denied the unseal of swarm manager "
            f"{manager} ({chat_code(event.request_id)}): {chat_code(event.details['reason'])}")


def _expired(event: Event, manager: str) -> str:
    needed = event.details["needed"]
    why = (f"waiting for {needed} custodian approval(s)" if needed
           else "without a reported unlock")
    return (f"The unseal request {chat_code(event.request_id)} of swarm manager {manager} "
            f"expired {why}")


def _unlocked(event: Event, manager: str) -> str:
    return (f"Swarm manager {manager} unlocked with key version {event.details['version']} "
            f"({chat_code(event.request_id)})")


def _refused(event: Event, manager: str) -> str:
    return (f"The escrow refused {chat_code(event.details['action'])} of swarm manager "
            f"{manager} in cluster {chat_code(event.cluster_id)}: "
            f"{chat_code(event.details['reason'])}")


def _clone_suspected(event: Event, manager: str) -> str:
    return (f"Swarm manager {manager} in cluster {chat_code(event.cluster_id)} looks cloned "
            "(two machines with its identity): quarantined, nothing is released to it until "
            "`escrow node allow` (docs/runbooks/clone-suspected.md)")


def _node_unreachable(event: Event, manager: str) -> str:
    goodbye = " (its agent had said goodbye)" if event.details["goodbye"] else ""
    return (f"Swarm manager {manager} in cluster {chat_code(event.cluster_id)} has sent no "
            f"heartbeat since {chat_code(event.details['last_seen'])}{goodbye}")


def _alert(event: Event, manager: str) -> str:
    return (f"Escrow alert {chat_code(event.details['alert'])} in cluster "
            f"{chat_code(event.cluster_id or '-')}: "
            f"{chat_code(json.dumps(event.details['details'], sort_keys=True))}")


_TEXTS: dict[EventKind, Callable[[Event, str], str]] = {
    EventKind.REQUESTED: _requested, EventKind.APPROVED: _approved,
    EventKind.DENIED: _denied, EventKind.EXPIRED: _expired, EventKind.UNLOCKED: _unlocked,
    EventKind.REFUSED: _refused, EventKind.CLONE_SUSPECTED: _clone_suspected,
    EventKind.NODE_UNREACHABLE: _node_unreachable, EventKind.ALERT: _alert,
}
