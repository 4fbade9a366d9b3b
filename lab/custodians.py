from __future__ import annotations

from escrow import custodian_keys

PASSPHRASE = b"correct horse battery staple"


def public_key_pem() -> bytes:
    return custodian_keys.generate(PASSPHRASE, kdf_rounds=1)[1]
