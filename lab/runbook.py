"""A runbook of docs/runbooks/ read as the on-call engineer reads it: the `sh` blocks of each
section as the commands they copy (continuation lines joined, each with the comment beside it
and the comment line above it), with the runbook's examples (`CLUSTER_ID`, a file name) replaced
by the site's own values, and what the runbook quotes as output, so that a test runs the text
itself and checks what it promises (docs/runbooks/README.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lab.commands import REPO

RUNBOOKS = REPO / "docs" / "runbooks"


@dataclass(frozen=True)
class Command:
    """One command as the operator copies it."""

    text: str  # continuation lines joined, the site's values in place
    said: str  # the comment beside it: what the runbook says it shows
    label: str  # the comment line above it, naming a variant ("A real HSM ...")


class Runbook:
    """One page, with the site's value for each of the page's examples; every example must be
    on the page, so a runbook that stops saying one fails the test that substituted it."""

    def __init__(self, name: str, site: Mapping[str, str] | None = None) -> None:
        self.path = RUNBOOKS / name
        self.text = self.path.read_text()
        self.site = dict(site or {})
        for example in self.site:
            assert example in self.text, f"{name} no longer says {example!r}"

    def section(self, heading: str) -> list[Command]:
        """The commands of the `sh` blocks under the heading (without its #s) up to the next
        heading of its level or above."""
        lines = self.text.splitlines(keepends=True)
        headings: list[tuple[int, int, str]] = []
        fenced = False  # a `#` inside a code block is a shell comment, not a heading
        for index, line in enumerate(lines):
            fenced ^= line.startswith("```")
            if line.startswith("#") and not fenced:
                headings.append((index, len(line) - len(line.lstrip("#")),
                                 line.lstrip("#").strip()))
        starts = [(index, level) for index, level, title in headings if title == heading]
        assert len(starts) == 1, f"{self.path.name} has {len(starts)} sections {heading!r}"
        start, level = starts[0]
        end = next((index for index, deeper, _ in headings if index > start and deeper <= level),
                   len(lines))
        body = "".join(lines[start + 1:end])
        commands: list[Command] = []
        for block in re.findall(r"```sh\n(.*?)```", body, re.DOTALL):
            commands += self._commands(block)
        assert commands, f"{self.path.name}, {heading!r}: no command"
        return commands

    def command(self, heading: str, containing: str, label: str = "") -> Command:
        """The one command of the section that holds `containing` (and whose label holds
        `label`)."""
        found = [c for c in self.section(heading) if containing in c.text and label in c.label]
        assert len(found) == 1, (f"{self.path.name}, {heading!r}: {len(found)} commands hold "
                                 f"{containing!r} {label!r}")
        return found[0]

    def says(self, quote: str) -> str:
        """`quote`, which the page must say word for word (line breaks aside): what a test then
        finds in a command's output is what the on-call engineer was told to expect."""
        assert " ".join(quote.split()) in " ".join(self.text.split()), \
            f"{self.path.name} no longer says {quote!r}"
        return quote

    def _commands(self, block: str) -> list[Command]:
        commands: list[Command] = []
        label = ""
        pending = ""
        for line in block.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if not pending and stripped.startswith("#"):
                label = stripped.lstrip("# ")
                continue
            code, said = split_comment(line)
            if code.rstrip().endswith("\\"):
                pending += code.strip()[:-1].rstrip() + " "
                continue
            text = pending + code.strip()
            pending = ""
            commands.append(Command(self._site_values(text), said, label))
            label = ""
        assert not pending, f"{self.path.name}: a block ends in a continuation line"
        return commands

    def _site_values(self, text: str) -> str:
        for example, ours in self.site.items():
            text = text.replace(example, ours)
        return text


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing comment (a `#` after a blank, outside quotes)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip(), line[index + 1:].strip()
    return line.rstrip(), ""


def every_runbook() -> list[str]:
    """The page names, README (the index) aside."""
    return sorted(p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
