"""Reading a certificate's subject the same way on both sides: the escrow checking a node
certificate, the agent reading its own."""

from __future__ import annotations

from cryptography import x509


def name_value(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    """The value of ``oid`` in ``name``, or "" unless it occurs exactly once: a subject with
    two CNs (or OUs) names no node, rather than whichever comes first."""
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""
