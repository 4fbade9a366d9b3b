"""What the server tells people without being asked: audited events worth a page (logged, and
posted to server.webhook_url) and unseal requests waiting for custodians (posted). A post runs
in the background and never delays or fails the request that caused it (escrow.webhook)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from escrow import webhook
from escrow.audit import AuditEvent
from escrow.core.protocol import RequestStatus

log = logging.getLogger("escrow.server")


class Alerts:
    def __init__(self, webhook_url: str) -> None:
        self.webhook_url = webhook_url
        self._loop: asyncio.AbstractEventLoop | None = None
        # The event loop holds tasks only weakly: a post held nowhere else may vanish mid-way.
        self._posts: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        """Post from now on (on the event loop, which runs the posts)."""
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        for task in list(self._posts):
            task.cancel()

    def alert(self, event: AuditEvent) -> None:
        """An audited event worth a page (called on the vault thread)."""
        details = json.dumps(dict(event.details), sort_keys=True)
        log.warning("alert: %s in cluster %s: %s", event.event, event.cluster_id or "-", details)
        url, loop = self.webhook_url, self._loop
        if not url or loop is None:
            return
        body = {"text": f"Escrow alert {webhook.chat_code(event.event)} in cluster "
                        f"{webhook.chat_code(event.cluster_id or '-')}: "
                        f"{webhook.chat_code(details)}",
                "event": event.event, "cluster_id": event.cluster_id,
                "details": dict(event.details)}
        loop.call_soon_threadsafe(self._post, webhook.post(url, body, about=event.event))

    def unseal_requested(self, status: RequestStatus, hostname: str) -> None:
        """Custodians hear of a request that waits for them (called on the event loop)."""
        if status.needed > 0 and self.webhook_url:
            self._post(webhook.notify(self.webhook_url, webhook.PendingApproval(
                status.request_id, status.cluster_id, status.node_id, hostname, status.needed,
                status.expires_at)))

    def _post(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(work)
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)
