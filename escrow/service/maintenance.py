"""Maintenance windows as custodians open, co-sign, list and close them, and the claim a new
unseal request makes on one (the decisions themselves are escrow.service.windows, pure)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from escrow import custodian_keys
from escrow.audit import AuditEvent
from escrow.core import protocol
from escrow.core.durations import describe
from escrow.core.errors import IdentityError, RequestError
from escrow.core.protocol import WindowOpenRequest, WindowView
from escrow.core.states import NodeStatus, WindowState
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.policy import AUTO
from escrow.service import windows
from escrow.service.authentication import CUSTODIAN_SKEW
from escrow.service.context import Context
from escrow.store import ClusterRecord, RequestRecord, WindowClaim, WindowRecord

MAX_LISTED = 200  # windows `escrow window list` shows, newest first
_WINDOW_ID = re.compile(protocol.WINDOW_ID_PATTERN)


def view(window: WindowRecord, now: datetime) -> WindowView:
    return WindowView(
        window_id=window.window_id, cluster_id=window.cluster_id, nodes=sorted(window.nodes),
        restarts=window.restarts, used=window.used, expires_at=window.expires_at,
        reason=window.reason, created_at=window.created_at, closed_at=window.closed_at,
        closed_by=window.closed_by, signers=list(window.signatures),
        state=windows.state(window, now).value)


def payload(window: WindowRecord) -> bytes:
    return protocol.window_payload(window.window_id, window.cluster_id, window.nodes,
                                   window.restarts, window.expires_at, window.reason)


class MaintenanceWindows:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.store = context.store
        self.settings = context.settings

    # -- who may -----------------------------------------------------------------------------

    @staticmethod
    def _holders(cluster: ClusterRecord) -> set[str]:
        """Who may open or co-sign a window of ``cluster``: slot holders of its policy now,
        so someone whose slot was taken away cannot pre-approve anything."""
        return set(cluster.policy.custodians)

    def _eligible(self, cluster_id: str) -> set[str]:
        """Whose approval a request of the cluster can use: holders of a slot of a version it
        may release."""
        versions = self.store.list_key_versions(cluster_id)[: self.settings.max_versions]
        return {holder for v in versions for holder in v.policy.slots if holder != AUTO}

    def _holding(self, custodian: str, cluster: ClusterRecord) -> None:
        if custodian not in self._holders(cluster):
            raise IdentityError("not_a_custodian", f"{custodian} holds no slot of the policy "
                                f"of {cluster.cluster_id}",
                                "only the custodians of the cluster's policy sign its windows")

    def _signed(self, custodian: str, window: WindowRecord, signature: str) -> None:
        key = custodian_keys.load_public(
            self.store.get_custodian(custodian).public_key_pem.encode("ascii"))
        if not protocol.verify(key, signature, payload(window)):
            raise IdentityError("bad_signature", f"the signature does not cover window "
                                f"{window.window_id} as the escrow holds it",
                                "sign the window as `escrow window list` shows it", 401)

    def _window(self, window_id: str, action: str, custodian: str) -> WindowRecord:
        """The window ``window_id``, or an audited 404 (a window id from the path is only
        repeated once it has the shape of one)."""
        window = self.store.get_window(window_id) if _WINDOW_ID.fullmatch(window_id) else None
        if window is None:
            with self.context.refusals.audited(action, "", custodian=custodian,
                                               window_id=window_id[:40]):
                shown = window_id if _WINDOW_ID.fullmatch(window_id) else "with that id"
                raise RequestError("unknown_window", f"there is no window {shown}",
                                   "see `escrow window list`", 404)
        return window

    # -- the custodians' calls -----------------------------------------------------------------

    def open(self, custodian: str, body: WindowOpenRequest) -> WindowView:
        now = self.context.now()
        window = WindowRecord(body.window_id, body.cluster_id, tuple(sorted(body.nodes)),
                              body.restarts, 0, body.expires_at, body.reason, timestamp(now),
                              signatures={custodian: body.signature})
        with self.context.refusals.audited("window.open", body.cluster_id, custodian=custodian,
                                           window_id=body.window_id):
            cluster = self.store.get_cluster(body.cluster_id)
            self._holding(custodian, cluster)
            self._expiry(body.expires_at, now)
            for node_id in window.nodes:
                self._node(cluster.cluster_id, node_id)
            self._signed(custodian, window, body.signature)
            if self.store.get_window(body.window_id) is not None:
                raise RequestError("window_exists", f"window {body.window_id} exists already",
                                   "open it under a new id (the CLI makes a random one)", 409)
        self.context.hooks.room()
        self.store.open_window(window, AuditEvent(
            "window.open", f"custodian:{custodian}", window.cluster_id,
            {"window_id": window.window_id, "nodes": list(window.nodes),
             "restarts": window.restarts, "expires_at": window.expires_at,
             "reason": window.reason, "signature": body.signature}))
        return view(window, now)

    def _expiry(self, expires_at: str, now: datetime) -> None:
        longest = self.settings.max_window_seconds
        if longest <= 0:
            raise RequestError("windows_off", "this escrow takes no maintenance windows "
                               "(requests.max_window_seconds is 0)",
                               "approve each request with `escrow approve`", 403)
        try:
            moment = parse_timestamp(expires_at)
        except ValueError:
            moment = None
        if moment is None or timestamp(moment) != expires_at:
            raise RequestError("bad_expiry", f"the window's expiry {expires_at} is not a "
                               "moment", "give it as the escrow writes times (UTC, ms)")
        if moment <= now:
            raise RequestError("bad_expiry", f"the window's expiry {expires_at} is past "
                               f"(the escrow's time is {timestamp(now)})",
                               "open the window with a later expiry; check your clock")
        # The expiry comes from the custodian's clock, which may be as far off as their
        # requests' dates may: `--for 24h` must not fail for a second of skew.
        if moment > now + timedelta(seconds=longest) + CUSTODIAN_SKEW:
            raise RequestError("window_too_long", f"the window would last more than "
                               f"{describe(int(longest))}",
                               "open a shorter one (the escrow's requests.max_window_seconds)")

    def _node(self, cluster_id: str, node_id: str) -> None:
        node = self.store.get_node(cluster_id, node_id)
        if node is None:
            raise RequestError("unknown_node", f"node {node_id} is not enrolled in cluster "
                               f"{cluster_id}", "name enrolled managers: see `escrow status` "
                               "or ask the escrow's admin (`escrow node list`)", 404)
        if node.status != NodeStatus.ACTIVE:
            raise RequestError("node_not_active", f"node {node_id} of cluster {cluster_id} is "
                               f"{node.status}", "a window cannot help it: an admin must "
                               "re-admit it first (`escrow node allow`)", 409)

    def sign(self, custodian: str, window_id: str, signature: str) -> WindowView:
        window = self._window(window_id, "window.sign", custodian)
        now = self.context.now()
        with self.context.refusals.audited("window.sign", window.cluster_id,
                                           custodian=custodian, window_id=window_id):
            self._holding(custodian, self.store.get_cluster(window.cluster_id))
            if custodian in window.signatures:
                raise RequestError("already_signed", f"{custodian} has signed window "
                                   f"{window_id} already", "each custodian signs once", 409)
            state = windows.state(window, now)
            if state != WindowState.OPEN:
                raise RequestError("window_not_open", f"window {window_id} is {state}",
                                   "open a new window", 409)
            self._signed(custodian, window, signature)
        self.context.hooks.room()
        self.store.sign_window(window_id, custodian, signature, timestamp(now), AuditEvent(
            "window.sign", f"custodian:{custodian}", window.cluster_id,
            {"window_id": window_id, "signature": signature,
             "signers": [*window.signatures, custodian]}))
        signed = self.store.get_window(window_id)
        return view(signed or window, now)

    def close(self, custodian: str, window_id: str) -> WindowView:
        window = self._window(window_id, "window.close", custodian)
        now = self.context.now()
        with self.context.refusals.audited("window.close", window.cluster_id,
                                           custodian=custodian, window_id=window_id):
            if (custodian not in window.signatures
                    and custodian not in self._holders(self.store.get_cluster(
                        window.cluster_id))):
                raise IdentityError("not_a_custodian", f"{custodian} neither signed window "
                                    f"{window_id} nor holds a slot of {window.cluster_id}",
                                    "a signer or a custodian of the cluster closes it")
            if window.closed_at:
                raise RequestError("already_closed", f"window {window_id} was closed by "
                                   f"{window.closed_by}", "a closed window approves nothing",
                                   409)
        self.store.close_window(window_id, custodian, timestamp(now), AuditEvent(
            "window.close", f"custodian:{custodian}", window.cluster_id,
            {"window_id": window_id, "used": window.used, "restarts": window.restarts,
             "state_before": windows.state(window, now).value}))
        closed = self.store.get_window(window_id)
        return view(closed or window, now)

    def list(self, custodian: str, cluster_id: str = "") -> list[WindowView]:
        """The windows of the clusters where ``custodian`` holds a slot, and those they
        signed, newest first."""
        now = self.context.now()
        if cluster_id:
            self.store.get_cluster(cluster_id)  # an unknown cluster is a 404, not an empty list
        holders = {c.cluster_id: self._holders(c) | self._eligible(c.cluster_id)
                   for c in self.store.list_clusters()}
        shown = [w for w in self.store.list_windows(cluster_id or None)
                 if custodian in holders.get(w.cluster_id, set()) or custodian in w.signatures]
        return [view(w, now) for w in shown[:MAX_LISTED]]

    # -- a request's claim -------------------------------------------------------------------

    def claim_for(self, request: RequestRecord, now: datetime) -> WindowClaim | None:
        """The restart a new request would take of a window that applies to it (written only
        with the request, if the window still has it then)."""
        open_now = self.store.list_windows(request.cluster_id, open_at=timestamp(now))
        if not open_now:
            return None
        eligible = self._eligible(request.cluster_id)
        window = windows.choose(open_now, request, now, eligible)
        return None if window is None else windows.claim(window, request, now, eligible)
