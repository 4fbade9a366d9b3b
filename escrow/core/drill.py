"""The share drill's proof (pure): what a custodian's CLI computes from the paper share they
typed, and the escrow from its own copy, so the two can be compared without the share ever
leaving the custodian's machine.

The proof is ``HMAC-SHA256(K, encode(PROOF_DOMAIN, nonce, cluster, version, slot, custodian))``
with ``K = HKDF-SHA256(ikm=share_bytes(share), salt=None, info=encode(KEY_DOMAIN, cluster,
version, slot, custodian), length=32)``. ``nonce`` is a fresh single-use server nonce
(``POST /v1/nonce``), so a proof is good for one drill only; the key is bound to one slot of
one version held by one custodian, so a proof made for one slot says nothing of another.
``share_bytes`` is the share's SLIP-39 fields, not its words: a mnemonic typed in capitals or
with extra spaces is the same share.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from shamir_mnemonic import Share

from escrow.core.encoding import encode

KEY_DOMAIN = "swarm-unseal/v2/share-drill"
PROOF_DOMAIN = "swarm-unseal/v2/share-drill/proof"
SHARE_DOMAIN = "swarm-unseal/v2/share-drill/share"
PROOF_BYTES = 32


def share_bytes(share: Share) -> bytes:
    """The canonical bytes of a share: every field its mnemonic encodes (the checksum is
    derived from them)."""
    return encode(SHARE_DOMAIN, share.identifier, int(share.extendable),
                  share.iteration_exponent, share.group_index, share.group_threshold,
                  share.group_count, share.index, share.member_threshold, share.value)


def drill_key(share: Share, cluster_id: str, version: int, slot: int, custodian: str) -> bytes:
    info = encode(KEY_DOMAIN, cluster_id, version, slot, custodian)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=info).derive(share_bytes(share))


def proof(share: Share, nonce: bytes, cluster_id: str, version: int, slot: int,
          custodian: str) -> bytes:
    message = encode(PROOF_DOMAIN, nonce, cluster_id, version, slot, custodian)
    return hmac.new(drill_key(share, cluster_id, version, slot, custodian), message,
                    hashlib.sha256).digest()


def matches(share: Share, given: bytes, nonce: bytes, cluster_id: str, version: int,
            slot: int, custodian: str) -> bool:
    """Whether ``given`` is the proof ``share`` makes, compared in constant time."""
    return hmac.compare_digest(proof(share, nonce, cluster_id, version, slot, custodian), given)
