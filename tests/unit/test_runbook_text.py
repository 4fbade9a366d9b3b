"""How a runbook's text becomes the commands a test runs (lab/runbook.py), and the index that
names, for each runbook, the test that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.commands import REPO
from lab.runbook import RUNBOOKS, Runbook, every_runbook, split_comment

PAGE = """# A night

Prose with `a quote` in it,
split over lines.

## 1. First

```sh
systemctl stop escrow          # stops it
# Embedded token:
runuser -u escrow -- escrow rewrap \\
    --to-label new-CLUSTER_ID
# A real HSM:
systemd-run --pipe escrow rewrap --to-label x   # the other variant
echo '# not a comment' "#neither"
```

### 1.1 Inside the first

```sh
curl https://localhost:8443/healthz   # {"status":"ok"}
```

## 2. Second

```sh
# a comment line above a heading-like line in code:
# 3. Not a heading
escrow audit verify
```
"""


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runbook:
    (tmp_path / "night.md").write_text(PAGE)
    monkeypatch.setattr("lab.runbook.RUNBOOKS", tmp_path)
    return Runbook("night.md", {"CLUSTER_ID": "c-1"})


def test_a_section_holds_its_commands_joined_with_their_comments_and_labels(
        book: Runbook) -> None:
    first = book.section("1. First")
    assert [c.text for c in first] == [
        "systemctl stop escrow",
        "runuser -u escrow -- escrow rewrap --to-label new-c-1",
        "systemd-run --pipe escrow rewrap --to-label x",
        "echo '# not a comment' \"#neither\"",
        "curl https://localhost:8443/healthz"]
    assert first[0].said == "stops it"
    assert first[1].label == "Embedded token:"
    assert first[2].label == "A real HSM:"
    assert first[4].said == '{"status":"ok"}'
    assert book.command("1. First", "rewrap", label="Embedded").text.endswith("new-c-1")


def test_a_comment_in_a_code_block_does_not_end_a_section(book: Runbook) -> None:
    assert [c.text for c in book.section("2. Second")] == ["escrow audit verify"]


def test_a_page_that_stops_saying_an_example_or_a_quote_fails_the_test_that_relies_on_it(
        book: Runbook, tmp_path: Path) -> None:
    assert book.says("a quote` in it, split") == "a quote` in it, split"
    with pytest.raises(AssertionError, match="no longer says 'an output'"):
        book.says("an output")
    with pytest.raises(AssertionError, match="no longer says 'NODE_ID'"):
        Runbook("night.md", {"NODE_ID": "n-1"})
    with pytest.raises(AssertionError, match="0 sections"):
        book.section("3. Not a heading")
    with pytest.raises(AssertionError, match="2 commands"):
        book.command("1. First", "rewrap")


def test_split_comment_keeps_hashes_inside_quotes_and_words() -> None:
    assert split_comment("a#b 'c # d' # e") == ("a#b 'c # d'", "e")
    assert split_comment("no comment") == ("no comment", "")


def index_rows() -> dict[str, str]:
    """docs/runbooks/README.md's table: page -> the test file that runs it."""
    rows = re.findall(r"^\| [^|]+ \| \[([\w.-]+)\]\([\w.-]+\) \| (.+) \|$",
                      (RUNBOOKS / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


def test_every_runbook_is_in_the_index_with_the_test_that_runs_its_text() -> None:
    rows = index_rows()
    assert sorted(rows) == every_runbook()
    for page, run_by in rows.items():
        tests = re.findall(r"^`(tests/[\w/]+\.py)`", run_by)
        assert tests, (page, run_by)
        for test in tests:
            text = (REPO / test).read_text()
            assert f'"{page}"' in text, (page, test)
            assert "Runbook(" in text, (page, test)
