"""SLIP-39 splitting and combining of unlock keys (pure, over ``shamir-mnemonic``).

``shamir-mnemonic`` is a reference implementation that is not hardened against side channels
(see docs/threat-model.md): the combined key exists only inside :func:`combine`, which callers
invoke as late as possible and whose result they drop as soon as it has been used.

SLIP-39 forbids a 1-of-n group with n > 1, so a threshold of 1 is expressed as n groups of one
share each with a group threshold of 1; every other threshold is a single t-of-n group.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import shamir_mnemonic
from shamir_mnemonic import MnemonicError, Share
from shamir_mnemonic.wordlist import WORD_INDEX_MAP, WORDLIST

from escrow.core.errors import RecoveryError
from escrow.core.unlockkey import KEK_BYTES, UnlockKey

MAX_SHARES = 16


def split(key: UnlockKey, threshold: int, count: int) -> list[str]:
    """Split ``key`` into ``count`` mnemonics of which any ``threshold`` rebuild it."""
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise ValueError(f"need 1 <= threshold <= count <= {MAX_SHARES}")
    if threshold == 1:
        groups = shamir_mnemonic.generate_mnemonics(1, [(1, 1)] * count, key.kek)
        return [group[0] for group in groups]
    (group,) = shamir_mnemonic.generate_mnemonics(1, [(threshold, count)], key.kek)
    return list(group)


@dataclass(frozen=True)
class ParsedShare:
    """One mnemonic that passed its checksum, with where it came from for error messages."""

    source: str
    share: Share

    @property
    def mnemonic(self) -> str:
        return str(self.share.mnemonic())

    @property
    def key_id(self) -> tuple[int, int]:
        return (self.share.identifier, self.share.iteration_exponent)

    @property
    def threshold(self) -> int:
        if self.share.group_count > 1:
            return int(self.share.group_threshold)
        return int(self.share.member_threshold)

    @property
    def position(self) -> tuple[int, int]:
        return (self.share.group_index, self.share.index)


def parse_share(text: str, source: str) -> ParsedShare:
    """Parse one mnemonic. ``source`` (e.g. "line 2") names it in errors; words of the share
    are never repeated in an error, except a word that is not in the word list."""
    words = text.lower().split()
    for position, word in enumerate(words, start=1):
        if word not in WORD_INDEX_MAP:
            close = difflib.get_close_matches(word, WORDLIST, n=1, cutoff=0.6)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecoveryError(
                f"{source}, word {position}: {word!r} is not a SLIP-39 word{suggestion}",
                "check that word against the paper share; every word is in the SLIP-39 list",
            )
    try:
        share = Share.from_mnemonic(" ".join(words))
    except MnemonicError:
        raise RecoveryError(
            f"{source}: the words do not form a valid share ({len(words)} words; the checksum "
            "or length is wrong)",
            "a share has 33 words for a Swarm key; compare each word with the paper, in order",
        ) from None
    return ParsedShare(source, share)


@dataclass(frozen=True)
class ShareSet:
    """Shares collected so far for one key, and what is still missing (pure)."""

    shares: tuple[ParsedShare, ...] = ()

    def add(self, parsed: ParsedShare) -> ShareSet:
        if self.shares and parsed.key_id != self.shares[0].key_id:
            raise RecoveryError(
                f"{parsed.source} belongs to a different key than {self.shares[0].source}",
                "all shares must come from the same key version; shares of an older or newer "
                "key cannot be mixed",
            )
        if any(s.position == parsed.position for s in self.shares):
            return self  # the same share typed twice adds nothing
        return ShareSet((*self.shares, parsed))

    @property
    def threshold(self) -> int:
        return self.shares[0].threshold if self.shares else 0

    @property
    def missing(self) -> int:
        if not self.shares:
            return 1
        return max(0, self.threshold - len(self.shares))


def combine(mnemonics: Sequence[str]) -> UnlockKey:
    """Rebuild the key from mnemonics of one version; extra shares beyond the threshold are
    ignored. Raises :class:`RecoveryError` naming what is wrong."""
    state = ShareSet()
    for number, text in enumerate(mnemonics, start=1):
        state = state.add(parse_share(text, f"share {number}"))
    return combine_set(state)


def combine_set(state: ShareSet) -> UnlockKey:
    if not state.shares:
        raise RecoveryError("no shares were given", "give at least the threshold of shares")
    if state.missing:
        raise RecoveryError(
            f"too few shares: {len(state.shares)} given, {state.threshold} needed",
            f"add {state.missing} more share(s) of the same key",
        )
    chosen = [s.mnemonic for s in state.shares[: state.threshold]]
    try:
        secret = shamir_mnemonic.combine_mnemonics(chosen)
    except MnemonicError:
        raise RecoveryError(
            "the shares passed their checksums but do not combine into a key",
            "they may come from different splits that happen to share an identifier; "
            "use shares from one key version only",
        ) from None
    if len(secret) != KEK_BYTES:
        raise RecoveryError(
            f"the shares hold a {len(secret)}-byte secret, not a {KEK_BYTES}-byte unlock key",
            "these are SLIP-39 shares of something else; the escrow's shares have 33 words",
        )
    return UnlockKey(secret)
