"""The share drill's proof (escrow.core.drill) and what the CLI makes of it (escrow.cli.drills):
the exact derivation, what it binds, and that the share itself never goes into the request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re

import pytest
import shamir_mnemonic
from shamir_mnemonic import Share

from escrow.cli import drills as cli_drills
from escrow.core import drill, shares
from escrow.core.encoding import encode
from escrow.core.errors import DrillMismatch, InputError, RecoveryError
from escrow.core.protocol import (
    DrillResult,
    DrillSlot,
    ShareDrills,
    ShareVerifyResponse,
)
from escrow.core.unlockkey import UnlockKey
from escrow.server.openapi import openapi_document

CLUSTER = "c" * 25
NONCE = bytes(range(32))


def split(threshold: int = 2, count: int = 3) -> list[str]:
    return shares.split(UnlockKey(os.urandom(32)), threshold, count)


def share_of(mnemonic: str) -> Share:
    return shares.parse_share(mnemonic, "test").share


def _hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 written out (no salt: a zero key), to pin the derivation independently of
    the library the module uses."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_the_proof_is_hmac_sha256_over_the_nonce_keyed_by_hkdf_of_the_share_s_fields() -> None:
    share = share_of(split()[1])
    fields = encode("swarm-unseal/v2/share-drill/share", share.identifier,
                    int(share.extendable), share.iteration_exponent, share.group_index,
                    share.group_threshold, share.group_count, share.index,
                    share.member_threshold, share.value)
    key = _hkdf_sha256(fields, encode("swarm-unseal/v2/share-drill", CLUSTER, 3, 1, "alice"))
    expected = hmac.new(key, encode("swarm-unseal/v2/share-drill/proof", NONCE, CLUSTER, 3, 1,
                                    "alice"), hashlib.sha256).digest()
    assert drill.proof(share, NONCE, CLUSTER, 3, 1, "alice") == expected
    assert len(expected) == drill.PROOF_BYTES


def test_the_same_share_typed_in_capitals_or_with_extra_spaces_makes_the_same_proof() -> None:
    mnemonic = split()[0]
    sloppy = "  " + "   ".join(mnemonic.upper().split()) + "\n"
    assert (drill.proof(share_of(sloppy), NONCE, CLUSTER, 1, 0, "alice")
            == drill.proof(share_of(mnemonic), NONCE, CLUSTER, 1, 0, "alice"))


def test_another_slot_s_share_or_another_key_s_share_does_not_match() -> None:
    mine, other_slot, _ = (share_of(m) for m in split())
    other_key = share_of(split()[0])
    given = drill.proof(mine, NONCE, CLUSTER, 1, 0, "alice")
    assert drill.matches(mine, given, NONCE, CLUSTER, 1, 0, "alice")
    assert not drill.matches(other_slot, given, NONCE, CLUSTER, 1, 0, "alice")
    assert not drill.matches(other_key, given, NONCE, CLUSTER, 1, 0, "alice")


Bound = tuple[bytes, str, int, int, str]  # nonce, cluster, version, slot, custodian
BOUND: Bound = (NONCE, CLUSTER, 1, 0, "alice")


@pytest.mark.parametrize("other", [(bytes(32), CLUSTER, 1, 0, "alice"),
                                   (NONCE, "d" * 25, 1, 0, "alice"),
                                   (NONCE, CLUSTER, 2, 0, "alice"),
                                   (NONCE, CLUSTER, 1, 1, "alice"),
                                   (NONCE, CLUSTER, 1, 0, "bob")],
                         ids=["nonce", "cluster", "version", "slot", "custodian"])
def test_a_proof_is_bound_to_its_nonce_cluster_version_slot_and_custodian(other: Bound) -> None:
    share = share_of(split()[0])
    given = drill.proof(share, *BOUND)
    assert drill.matches(share, given, *BOUND)
    assert not drill.matches(share, given, *other)


def test_a_flipped_bit_of_the_proof_does_not_match() -> None:
    share = share_of(split()[0])
    given = bytearray(drill.proof(share, NONCE, CLUSTER, 1, 0, "alice"))
    given[-1] ^= 1
    assert not drill.matches(share, bytes(given), NONCE, CLUSTER, 1, 0, "alice")


def _listing(*slots: tuple[int, int, str], custodian: str = "alice") -> ShareDrills:
    return ShareDrills(cluster_id=CLUSTER, custodian=custodian,
                       newest=max(v for v, _, _ in slots),
                       slots=[DrillSlot(version=v, version_created_at="2026-12-01T00:00:00Z",
                                        slot=s, custodian=c, last_ok_at=None)
                              for v, s, c in slots])


def test_the_request_carries_one_proof_per_own_slot_and_nothing_of_the_share() -> None:
    mnemonic = split()[2]
    share = share_of(mnemonic)
    listing = _listing((2, 2, "alice"), (2, 1, "bob"), (1, 0, "alice"))
    body = cli_drills.verify_request(share, listing, NONCE, cli_drills.mine(listing, None))
    assert [(p.version, p.slot) for p in body.proofs] == [(2, 2), (1, 0)]
    sent = body.model_dump_json()
    words = mnemonic.split()
    # No run of three of its words, in any case, and not its value in any usual spelling.
    for start in range(len(words) - 2):
        run = " ".join(words[start:start + 3])
        assert run not in sent.lower()
    for spelling in (share.value.hex(), share.value.hex().upper()):
        assert spelling not in sent
    assert base64.b64encode(share.value).decode()[:16] not in sent
    only = cli_drills.verify_request(share, listing, NONCE, cli_drills.mine(listing, 1))
    assert [(p.version, p.slot) for p in only.proofs] == [(1, 0)]


def test_a_version_where_the_custodian_holds_no_slot_is_refused_before_sending() -> None:
    listing = _listing((2, 1, "bob"), (1, 0, "alice"))
    with pytest.raises(InputError, match="you hold no slot of version 2") as refused:
        cli_drills.mine(listing, 2)
    assert "where you hold one: 1" in refused.value.hint


def test_a_typo_names_the_word_and_a_bad_checksum_says_to_compare_every_word() -> None:
    words = split()[0].split()
    typo = " ".join([*words[:4], "zzzebra", *words[5:]])
    with pytest.raises(RecoveryError, match="word 5: 'zzzebra' is not a SLIP-39 word"):
        cli_drills.parse_paper(typo)
    swapped = " ".join([*words[:3], words[4], words[3], *words[5:]])
    if swapped != " ".join(words):
        with pytest.raises(RecoveryError, match="checksum") as bad:
            cli_drills.parse_paper(swapped)
        assert "compare each word" in bad.value.hint


def test_a_share_of_something_other_than_a_swarm_key_is_refused() -> None:
    (group,) = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], os.urandom(16))
    with pytest.raises(RecoveryError, match="16-byte secret"):
        cli_drills.parse_paper(group[0])


def _answer(*results: tuple[int, int, bool]) -> ShareVerifyResponse:
    return ShareVerifyResponse(cluster_id=CLUSTER, newest=max(v for v, _, _ in results),
                               results=[DrillResult(version=v, slot=s, match=m)
                                        for v, s, m in results])


def test_the_verdict_is_ok_on_the_newest_and_says_so() -> None:
    assert cli_drills.verdict(_answer((2, 1, True), (1, 0, True)), None) == (
        f"ok: your share matches version 2 slot 1 of {CLUSTER}")


def test_the_verdict_on_an_older_version_s_share_names_it_and_says_to_export_the_newest() -> None:
    with pytest.raises(DrillMismatch) as told:
        cli_drills.verdict(_answer((2, 1, False), (1, 0, True)), None)
    assert "does not match version 2 slot 1" in told.value.message
    assert "it matches version 1 slot 0, an older retained version" in told.value.message
    assert f"escrow share export --cluster {CLUSTER}" in told.value.hint


def test_the_verdict_on_a_wrong_share_names_every_slot_it_does_not_match() -> None:
    with pytest.raises(DrillMismatch, match="does not match version 2 slot 1, version 1 slot 0"):
        cli_drills.verdict(_answer((2, 1, False), (1, 0, False)), None)
    assert cli_drills.verdict(_answer((1, 0, True)), 1).startswith("ok: ")


def test_the_drill_routes_are_in_the_openapi_document_with_every_schema_they_name() -> None:
    document = openapi_document()
    assert document["paths"]["/v1/shares/verify"]["post"]["security"] == [{
        "custodianKeyId": [], "custodianDate": [], "custodianNonce": [], "custodianSignature": []}]
    drills = document["paths"]["/v1/shares/drills"]["get"]
    assert [p["name"] for p in drills["parameters"]] == ["cluster_id"]
    text = json.dumps(document)
    for name in re.findall(r'"#/components/schemas/([^"]+)"', text):
        assert name in document["components"]["schemas"], name
    for name in ("ShareVerifyRequest", "ShareVerifyResponse", "ShareDrills", "DrillSlot"):
        assert name in document["components"]["schemas"]
