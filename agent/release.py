"""Opening released shares and combining them into candidate keys (pure).

Every share is decrypted (and so checked) at once; keys are combined one version at a time,
newest first, only as the caller asks for the next one. A manager that unlocks with the newest
version never has an older key combined, and each combined key exists only until the caller
moves on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.errors import SharesUnusable
from escrow.core import protocol, shares
from escrow.core.errors import RecoveryError
from escrow.core.protocol import HPKE, RequestStatus
from escrow.core.unlockkey import UnlockKey


def candidate_keys(status: RequestStatus, ephemeral: X25519PrivateKey,
                   skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, UnlockKey]]:
    """(version, key) for every version with enough shares, newest version first, leaving out
    the versions in ``skip``. Raises SharesUnusable at once if any share does not decrypt."""
    by_version: dict[int, list[str]] = defaultdict(list)
    fingerprints: dict[int, str] = {}
    for release in status.releases:
        info = protocol.share_info(status.request_id, status.cluster_id, release.version,
                                   release.slot)
        try:
            plain = HPKE.decrypt(protocol.b64d(release.sealed_share), ephemeral, info=info)
        except (InvalidTag, ValueError):
            raise SharesUnusable(f"a share of version {release.version} (slot {release.slot}) "
                                 "did not decrypt with this request's key",
                                 "the answer was altered or belongs to another request") from None
        try:
            by_version[release.version].append(plain.decode("ascii"))
        except UnicodeDecodeError:
            raise SharesUnusable(f"a share of version {release.version} (slot {release.slot}) "
                                 "is not a mnemonic (it holds bytes that are not ASCII)",
                                 "report this to the escrow admin") from None
        fingerprints[release.version] = release.fingerprint
    for version in skip:
        by_version.pop(version, None)
    return _combined(status.cluster_id, by_version, fingerprints)


def _combined(cluster_id: str, by_version: dict[int, list[str]], fingerprints: dict[int, str],
              ) -> Iterator[tuple[int, UnlockKey]]:
    for version in sorted(by_version, reverse=True):
        try:
            key = shares.combine(by_version[version])
        except RecoveryError:
            continue  # not enough shares of this version yet
        if key.fingerprint(cluster_id) != fingerprints[version]:
            raise SharesUnusable(f"the shares of version {version} combine to a key whose "
                                 "fingerprint does not match", "report this to the escrow admin")
        yield version, key
        del key
