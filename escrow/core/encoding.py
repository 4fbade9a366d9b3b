"""The one place where bytes that are hashed, signed or used as associated data are made.

Every such byte string starts with a domain tag and is a sequence of length-prefixed fields, so
two different tuples of values can never encode to the same bytes, and a value made for one
purpose (a share's associated data, say) can never be mistaken for another (an audit hash).
"""

from __future__ import annotations

import json
import struct
from typing import Any

FieldValue = str | bytes | int


def _field(value: FieldValue) -> bytes:
    if isinstance(value, bool):
        raise TypeError("booleans are not encodable fields; use an int")
    if isinstance(value, int):
        raw = value.to_bytes(8, "big", signed=True)
        kind = b"i"
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        kind = b"s"
    else:
        raw = bytes(value)
        kind = b"b"
    return kind + struct.pack(">I", len(raw)) + raw


def encode(domain: str, *fields: FieldValue) -> bytes:
    """Domain-separated, length-prefixed encoding of ``fields``."""
    return _field(domain) + b"".join(_field(f) for f in fields)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant white space: stable across runs and versions."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


SHARE_AAD_DOMAIN = "swarm-unseal/v1/share-aad"
FINGERPRINT_DOMAIN = "swarm-unseal/v1/key-fingerprint"
AUDIT_DOMAIN = "swarm-unseal/v1/audit-record"


def share_aad(cluster_id: str, version: int, slot: int) -> bytes:
    """Associated data that ties a wrapped share to its row: a copied row fails to decrypt."""
    return encode(SHARE_AAD_DOMAIN, cluster_id, version, slot)
