"""The release step: a request's planned shares, unwrapped once each and encrypted to the
request's key. Polls get the same ciphertexts back without touching the token."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from escrow.core import protocol
from escrow.core.protocol import HPKE, ReleasedShare
from escrow.service.plan import Plan
from escrow.store import RequestRecord, ShareRecord

# Requests whose released shares are kept encrypted, so polling never unwraps twice.
RELEASE_CACHE = 10_000


class Releases:
    def __init__(self, unwrap: Callable[[ShareRecord], str]) -> None:
        self._unwrap = unwrap
        self._encrypted: OrderedDict[str, dict[tuple[int, int], ReleasedShare]] = OrderedDict()

    def encrypt_to(self, request: RequestRecord, plan: Plan
                   ) -> tuple[list[ReleasedShare], list[ReleasedShare]]:
        """The planned shares encrypted to the request's key, and which of them are new."""
        done = self._encrypted.setdefault(request.request_id, {})
        self._encrypted.move_to_end(request.request_id)
        while len(self._encrypted) > RELEASE_CACHE:
            self._encrypted.popitem(last=False)
        peer = X25519PublicKey.from_public_bytes(request.ephemeral_key)
        fresh = []
        for release in plan.releases:
            for share in release.shares:
                if (share.version, share.slot) in done:
                    continue
                mnemonic = self._unwrap(share).encode("ascii")
                info = protocol.share_info(request.request_id, request.cluster_id,
                                           share.version, share.slot)
                done[(share.version, share.slot)] = ReleasedShare(
                    version=share.version, fingerprint=release.version.fingerprint,
                    slot=share.slot, holder=share.holder,
                    sealed_share=protocol.b64e(HPKE.encrypt(mnemonic, peer, info=info)))
                del mnemonic
                fresh.append(done[(share.version, share.slot)])
        return [done[(s.version, s.slot)] for r in plan.releases for s in r.shares], fresh

    def forget(self, request_id: str) -> None:
        """The request is over: its encrypted shares are dropped."""
        self._encrypted.pop(request_id, None)
