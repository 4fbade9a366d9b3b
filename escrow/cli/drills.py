"""``escrow share verify`` and ``escrow share drills``: a custodian proves that their paper
share still matches the escrow's copy without sending it (an HMAC over a fresh nonce, keyed
from the share: escrow.core.drill), and sees when each custodian slot of a cluster was last
proved so. The mnemonic is read from a prompt without echo, or from standard input; never from
the command line or the environment, which other users of the machine can read."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from shamir_mnemonic import Share

from escrow.cli.approvals import connection_options, custodian_client
from escrow.cli.context import age, json_option, print_json, seconds_since, table
from escrow.core import drill, protocol, shares
from escrow.core.errors import DrillMismatch, InputError, RecoveryError
from escrow.core.plaintext import plain
from escrow.core.protocol import (
    DrillSlot,
    NonceResponse,
    ShareDrills,
    ShareProof,
    ShareVerifyRequest,
    ShareVerifyResponse,
)
from escrow.core.unlockkey import KEK_BYTES

_CLUSTER_ID = re.compile(r"[a-z0-9]{25}")


def read_mnemonic() -> str:
    """The paper share: prompted for without echo on a terminal, else all of standard input
    (blank lines and # comments skipped, so `escrow share export`'s output can be piped)."""
    if sys.stdin.isatty():
        return str(click.prompt("Your share (its words separated by spaces)", hide_input=True,
                                prompt_suffix=": "))
    lines = [line for line in sys.stdin.read().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError("no share was given on standard input",
                         "type it at the prompt (run the command in a terminal), or pipe it in")
    return " ".join(lines)


def parse_paper(text: str) -> Share:
    """The typed share, or a RecoveryError naming what to check: nothing is sent before."""
    share = shares.parse_share(text, "your share").share
    if len(share.value) != KEK_BYTES:
        raise RecoveryError(f"your share holds a {len(share.value)}-byte secret, not a share "
                            "of a swarm unlock key",
                            "the escrow's shares have 33 words; check that this is the paper "
                            "share of a swarm's key")
    return share


def drills_path(cluster_id: str) -> str:
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise InputError(f"{plain(cluster_id)} is not a swarm cluster id",
                         "give the 25 lower-case letters and digits `docker info` shows as "
                         "the swarm's cluster id")
    return f"/v1/shares/drills?cluster_id={cluster_id}"


def mine(listing: ShareDrills, version: int | None) -> list[DrillSlot]:
    """The caller's slots the drill is about: of every retained version, or of ``version``."""
    held = [s for s in listing.slots if s.custodian == listing.custodian]
    chosen = [s for s in held if version is None or s.version == version]
    if not chosen:
        versions = ", ".join(str(s.version) for s in held) or "none"
        raise InputError(f"you hold no slot of version {version} of {listing.cluster_id}",
                         f"retained versions where you hold one: {versions}")
    return chosen


def verify_request(share: Share, listing: ShareDrills, nonce: bytes,
                   slots: list[DrillSlot]) -> ShareVerifyRequest:
    """What is sent: one proof per slot asked about, never the share (pure)."""
    return ShareVerifyRequest(
        cluster_id=listing.cluster_id, nonce=protocol.b64e(nonce),
        proofs=[ShareProof(version=s.version, slot=s.slot, proof=protocol.b64e(drill.proof(
            share, nonce, listing.cluster_id, s.version, s.slot, listing.custodian)))
                for s in slots])


def verdict(answer: ShareVerifyResponse, version: int | None) -> str:
    """What the drill says: the "ok" line when the share matches the asked version (or the
    newest the caller holds a slot of); else DrillMismatch naming what it does not match, and
    what it does."""
    if not answer.results:
        raise DrillMismatch("the escrow checked none of your slots",
                            "check that the CLI and the escrow versions match")
    target = next((r for r in answer.results if r.version == version),
                  max(answer.results, key=lambda r: r.version))
    cluster = answer.cluster_id
    if target.match:
        return f"ok: your share matches version {target.version} slot {target.slot} of {cluster}"
    matched = [r for r in answer.results if r.match]
    if matched:
        other = matched[0]
        raise DrillMismatch(
            f"your share does not match version {target.version} slot {target.slot} of "
            f"{cluster}: it matches version {other.version} slot {other.slot}, an older "
            "retained version",
            f"write down the newest: `escrow share export --cluster {cluster}`, then run "
            "`escrow share verify` with it; keep the older paper until that version is pruned")
    slots = ", ".join(f"version {r.version} slot {r.slot}" for r in answer.results)
    raise DrillMismatch(
        f"your share does not match {slots} of {cluster}",
        "compare every word with the paper, in order, and check that it is your share of this "
        f"cluster; if it is, the paper is wrong: `escrow share export --cluster {cluster}` "
        "and write it down anew")


@click.command()
@connection_options
@click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")
@click.option("--version", type=click.IntRange(min=1),
              help="Only this key version (default: every retained one where you hold a "
                   "slot; the newest decides).")
def verify(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str,
           version: int | None) -> None:
    """Prove that your paper share matches the escrow's copy, without sending it.

    Type the share at the prompt (no echo), or pipe it in.

    \b
    Example:
      escrow share verify --cluster CLUSTER_ID    # type the share at the prompt (no echo)
      escrow share verify --cluster CLUSTER_ID --version 3   # only that key version
    """
    path = drills_path(cluster_id)
    share = parse_paper(read_mnemonic())  # a typo is told before anything is sent
    client = custodian_client(url, ca, key, passphrase_file)
    listing = client.call("GET", path, ShareDrills)
    slots = mine(listing, version)

    def ask(about: list[DrillSlot]) -> ShareVerifyResponse:
        nonce = protocol.b64d(client.call("POST", "/v1/nonce", NonceResponse).nonce)
        return client.call("POST", "/v1/shares/verify", ShareVerifyResponse,
                           verify_request(share, listing, nonce, about))

    # The newest first: a share that matches it is the usual answer, and the older
    # versions are asked about (each an audited mismatch or match) only when it does not.
    newest = max(slots, key=lambda s: s.version)
    answer = ask(slots if version is not None else [newest])
    older = [s for s in slots if s is not newest]
    if version is None and older and not answer.results[0].match:
        answer = answer.model_copy(update={"results": answer.results
                                           + ask(older).results})
    click.echo(plain(verdict(answer, version)))


@click.command()
@connection_options
@click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")
@json_option
def drills(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str,
           as_json: bool) -> None:
    """Each custodian's last successful share drill, per retained key version.

    \b
    Example:
      escrow share drills --cluster CLUSTER_ID    # each custodian slot: its last drill, or never
    """
    path = drills_path(cluster_id)
    listing = custodian_client(url, ca, key, passphrase_file).call("GET", path, ShareDrills)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for slot in listing.slots:
        # A slot never drilled ages from its version's creation, as the metric counts it.
        elapsed = seconds_since(slot.last_ok_at or slot.version_created_at, now)
        rows.append({"version": slot.version, "slot": slot.slot, "custodian": slot.custodian,
                     "version_created_at": slot.version_created_at,
                     "last_ok_at": slot.last_ok_at,
                     "age_seconds": None if elapsed is None else int(elapsed),
                     "yours": slot.custodian == listing.custodian})
    if as_json:
        print_json(rows)
        return
    table(f"Share drills of {listing.cluster_id} (newest version {listing.newest})",
          ["version", "slot", "custodian", "last drill", "age", "yours"],
          [[r["version"], r["slot"], r["custodian"], r["last_ok_at"] or "never",
            "?" if r["age_seconds"] is None
            else age(r["age_seconds"]) + ("" if r["last_ok_at"] else " (since made)"),
            "yes" if r["yours"] else "no"] for r in rows])
