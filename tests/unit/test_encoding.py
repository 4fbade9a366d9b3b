from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from escrow.core.encoding import canonical_json, encode, share_aad

fields = st.lists(st.one_of(st.text(max_size=8), st.binary(max_size=8),
                            st.integers(min_value=-(2**63), max_value=2**63 - 1)), max_size=4)


@given(fields, fields)
def test_different_field_tuples_never_encode_alike(a: list[str | bytes | int],
                                                   b: list[str | bytes | int]) -> None:
    if a != b or [type(x) for x in a] != [type(x) for x in b]:
        assert encode("d", *a) != encode("d", *b)


def test_domain_separates_purposes() -> None:
    assert encode("one", "x") != encode("two", "x")


def test_share_aad_binds_cluster_version_and_slot() -> None:
    base = share_aad("c" * 25, 1, 0)
    assert base != share_aad("d" * 25, 1, 0)
    assert base != share_aad("c" * 25, 2, 0)
    assert base != share_aad("c" * 25, 1, 1)


def test_canonical_json_is_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
