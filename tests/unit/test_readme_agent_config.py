"""README's agent config block is TOML an operator can uncomment line by line."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields

from agent.config import AgentConfig
from lab.commands import REPO

KNOWN = {f.name for f in fields(AgentConfig)}
SETTING = re.compile(r"^# ([a-z0-9_]+) = ")


def agent_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The node agent"):]
    return section[section.index("```toml\n") + 8:section.index("\n```", section.index("```toml"))]


def test_each_commented_setting_in_readme_is_valid_toml_once_uncommented_and_known() -> None:
    lines = agent_block().splitlines()
    commented = [i for i, line in enumerate(lines) if SETTING.match(line)]
    assert len(commented) >= 10
    for index in commented:
        name = SETTING.match(lines[index]).group(1)  # type: ignore[union-attr]
        # Alone with the uncommented lines: escrow_url is shown twice, as one value and a list.
        chosen = [line for i, line in enumerate(lines) if i == index or not line.startswith("#")]
        if name == "escrow_url":
            chosen = [line for line in chosen if not line.startswith("escrow_url")]
        parsed = tomllib.loads("\n".join(chosen).replace(lines[index], lines[index][2:]))
        assert name in parsed
        assert name in KNOWN, f"README shows {name}, which the agent does not know"
