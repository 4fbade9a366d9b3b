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
from shamir_mnemonic.recovery import RecoveryState
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


class ShareSet:
    """Shares collected so far for one key, and what is still missing.

    The bookkeeping is ``shamir_mnemonic``'s own :class:`RecoveryState`, so any valid SLIP-39
    set is accepted: the escrow's single t-of-n group, its n one-share groups for a threshold
    of one, or groups made by another SLIP-39 tool (a group threshold above one).
    """

    def __init__(self) -> None:
        self._state = RecoveryState()
        self._first: ParsedShare | None = None
        self._by_position: dict[tuple[int, int], ParsedShare] = {}

    @property
    def count(self) -> int:
        return len(self._by_position)

    def add(self, parsed: ParsedShare) -> None:
        """Add one share; the same share typed twice adds nothing. Raises
        :class:`RecoveryError` naming the share that does not belong with the others."""
        first = self._first
        if first is not None and parsed.key_id != first.key_id:
            raise RecoveryError(
                f"{parsed.source} belongs to a different key than {first.source}",
                "all shares must come from the same key version; shares of an older or newer "
                "key cannot be mixed",
            )
        same_place = self._by_position.get(parsed.position)
        if same_place is not None:
            if same_place.share == parsed.share:
                return
            raise RecoveryError(
                f"{parsed.source} and {same_place.source} are both share "
                f"{parsed.share.index + 1} of group {parsed.share.group_index + 1} but differ",
                "they come from two splits of one key version; use the shares of one split",
            )
        try:
            self._state.add_share(parsed.share)
        except MnemonicError:
            raise RecoveryError(
                f"{parsed.source} is of the same key as {first.source if first else 'the rest'} "
                "but its group threshold, group count or member threshold differ",
                "it comes from another split of that key; use the shares of one split",
            ) from None
        self._first = first or parsed
        self._by_position[parsed.position] = parsed

    @property
    def complete(self) -> bool:
        return self._state.is_complete()

    def missing(self) -> str:
        """What is still needed, in words ("2 more shares of group 1"); empty when complete."""
        parameters = self._state.parameters
        if parameters is None:
            return "the first share"
        if self.complete:
            return ""
        if parameters.group_count == 1:
            given, needed = self._state.group_status(0)
            return f"{_shares(needed - given)} ({given} of {needed} given)"
        groups_left = parameters.group_threshold - self._state.groups_complete()
        parts: list[str] = []
        untouched: list[str] = []
        for index in range(parameters.group_count):
            given, needed = self._state.group_status(index)
            if not given:
                untouched.append(str(index + 1))
            elif given < needed:
                parts.append(f"{_shares(needed - given)} of group {index + 1}")
        if untouched:
            parts.append(f"{'group' if len(untouched) == 1 else 'groups'} "
                         f"{', '.join(untouched)} not started")
        return (f"{groups_left} more complete group(s) of {parameters.group_count}, "
                f"{parameters.group_threshold} needed: {'; '.join(parts)}")

    def key(self) -> UnlockKey:
        """The unlock key these shares rebuild; raises :class:`RecoveryError` when there are
        too few or they do not combine."""
        if not self.count:
            raise RecoveryError("no shares were given", "give at least the threshold of shares")
        if not self.complete:
            raise RecoveryError(f"too few shares; still missing {self.missing()}",
                                "add the missing shares of the same key")
        try:
            secret = self._state.recover(b"")
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


def _shares(count: int) -> str:
    return f"{count} more share{'' if count == 1 else 's'}"


def combine(mnemonics: Sequence[str]) -> UnlockKey:
    """Rebuild the key from mnemonics of one version; extra shares beyond the threshold are
    ignored. Raises :class:`RecoveryError` naming what is wrong."""
    state = ShareSet()
    for number, text in enumerate(mnemonics, start=1):
        state.add(parse_share(text, f"share {number}"))
    return state.key()
