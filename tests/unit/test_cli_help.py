"""Every command's --help shows an example, and every example runs its command with options it
has and the arguments it takes, so an example cannot drift from the command. Shell completion is
click's, under the variables README gives (the real installed commands: test_conventions.py)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Iterator

import click
import pytest
from click.testing import CliRunner

from agent.cli import cli as agent_cli
from agent.cli import main as agent_main
from escrow.cli import cli as escrow_cli
from escrow.cli import main as escrow_main
from lab.commands import REPO

PROGRAMS: dict[str, click.Group] = {"escrow": escrow_cli, "unseal-agent": agent_cli}
MAINS: dict[str, Callable[[], None]] = {"escrow": escrow_main, "unseal-agent": agent_main}
HEADING = re.compile(r"^\s*Examples?:\s*$")
SEPARATORS = {"|", "||", "&&", ";"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SUBSTITUTION = re.compile(r"\$\([^()]*\)")  # $(date +%F): one word of the line
COMPLETION_SOURCE = re.compile(r"(_[A-Z_]+_COMPLETE)=(bash|zsh|fish)_source ([a-z-]+)")

CommandPath = tuple[str, ...]


def leaves(group: click.Group, path: CommandPath) -> Iterator[tuple[CommandPath, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaves(command, (*path, name))
        else:
            yield (*path, name), command


LEAVES = [leaf for program, group in PROGRAMS.items() for leaf in leaves(group, (program,))]


def help_of(path: CommandPath) -> str:
    program, *words = path
    result = CliRunner().invoke(PROGRAMS[program], [*words, "--help"], prog_name=program)
    assert result.exit_code == 0, result.output
    return result.output


def examples(help_text: str) -> list[str]:
    """The lines of the help's Example(s) paragraph, continuation lines (`\\`) joined."""
    lines = help_text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADING.match(line)), None)
    if start is None:
        return []
    joined: list[str] = []
    pending = ""
    for line in lines[start + 1:]:
        if not line.strip():
            break
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
        else:
            joined.append(pending + line.strip())
            pending = ""
    assert not pending, f"a continuation line ends the example: {pending!r}"
    return joined


def invocations(line: str) -> Iterator[tuple[str, list[str]]]:
    """Each simple command of a shell line that runs escrow or unseal-agent (after a pipe or
    variable assignments too): the program and the words after it, comments left out."""
    segment: list[str] = []
    for word in [*shlex.split(SUBSTITUTION.sub("X", line), comments=True), ";"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        while segment and ASSIGNMENT.match(segment[0]):
            segment.pop(0)
        if segment and segment[0] in PROGRAMS:
            yield segment[0], segment[1:]
        segment = []


def resolve(program: str, words: list[str]) -> tuple[CommandPath, click.Command, list[str]]:
    """The leaf command an invocation runs, and the words left for it."""
    command: click.Command = PROGRAMS[program]
    path: CommandPath = (program,)
    while isinstance(command, click.Group):
        if not words or words[0] not in command.commands:
            raise LookupError(f"`{' '.join(path)}` has no subcommand {words[:1]}")
        command = command.commands[words[0]]
        path = (*path, words[0])
        words = words[1:]
    return path, command, words


def problems_of(program: str, words: list[str]) -> tuple[CommandPath, list[str]]:
    """What is wrong with one invocation: options its command lacks, a wrong number of
    arguments, or a secret on the command line."""
    try:
        path, command, rest = resolve(program, words)
    except LookupError as exc:
        return (program,), [str(exc)]
    said = " ".join(path)
    options = {name: param for param in command.params if isinstance(param, click.Option)
               for name in (*param.opts, *param.secondary_opts)}
    known = {*options, *PROGRAMS[program].context_settings["help_option_names"]}
    problems: list[str] = []
    arguments: list[str] = []
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if not word.startswith("-") or word == "-":
            arguments.append(word)
            continue
        name, equals, _ = word.partition("=")
        if name not in known:
            problems.append(f"`{said}` has no option {name}")
            continue
        option = options.get(name)
        if option is not None and not (option.is_flag or option.count or equals):
            index += option.nargs
    declared = [p for p in command.params if isinstance(p, click.Argument)]
    least = sum(p.nargs if p.nargs > 0 else 0 for p in declared if p.required)
    most = (float("inf") if any(p.nargs < 0 for p in declared)
            else sum(p.nargs for p in declared))
    if not least <= len(arguments) <= most:
        problems.append(f"`{said}` takes {least} to {most} argument(s), the example gives "
                        f"{arguments}")
    if any("SWMKEY-1-" in word for word in words):
        problems.append(f"`{said}`: an unlock key on the command line")
    return path, problems


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_command_shows_an_example_that_it_would_run(path: CommandPath,
                                                          command: click.Command) -> None:
    shown = help_of(path)
    assert "Example" in shown, f"`{' '.join(path)} --help` has no Example section"
    lines = examples(shown)
    assert lines, f"`{' '.join(path)} --help`: its Example section is empty"
    runs_itself = False
    for line in lines:
        for program, words in invocations(line):
            ran, problems = problems_of(program, words)
            assert not problems, f"example {line!r}: {'; '.join(problems)}"
            runs_itself = runs_itself or ran == path
    assert runs_itself, f"no example of `{' '.join(path)} --help` runs it: {lines}"


def test_both_trees_have_their_commands() -> None:
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"escrow custodian keygen", "escrow deposit", "escrow share verify",
            "escrow window open", "unseal-agent enroll", "unseal-agent run",
            "unseal-agent rotate", "unseal-agent status"} <= names
    assert len(names) >= 44


def test_a_drifted_example_is_caught() -> None:
    # A renamed option, a missing argument, an unknown subcommand and a key on argv.
    assert problems_of("escrow", ["cluster", "show", "--cluster-id", "C"])[1] == [
        "`escrow cluster show` has no option --cluster-id"]
    assert problems_of("escrow", ["cluster", "show"])[1] == [
        "`escrow cluster show` takes 1 to 1 argument(s), the example gives []"]
    assert problems_of("escrow", ["clusters", "show", "C"])[1] == [
        "`escrow` has no subcommand ['clusters']"]
    assert problems_of("escrow", ["deposit", "--cluster", "C", "SWMKEY-1-abc"])[1] == [
        "`escrow deposit` takes 0 to 0 argument(s), the example gives ['SWMKEY-1-abc']",
        "`escrow deposit`: an unlock key on the command line"]
    # What the examples rely on: a pipe, a comment, an option's value, a continuation.
    assert list(invocations("docker swarm unlock-key -q | escrow deposit --cluster C  # x")) == [
        ("escrow", ["deposit", "--cluster", "C"])]
    assert problems_of("escrow", ["approve", "--cluster", "C", "--all"]) == (
        ("escrow", "approve"), [])
    assert list(invocations("escrow audit archive --out a-$(date +%F).jsonl")) == [
        ("escrow", ["audit", "archive", "--out", "a-X.jsonl"])]
    assert examples("Example:\n  escrow a \\\n      --b c\n\nOptions:\n") == ["escrow a --b c"]


def completion(program: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               **env: str) -> str:
    """What the console script's main() prints under click's completion variables."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [program])
    with pytest.raises(SystemExit) as exited:
        MAINS[program]()
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("program", "variable", "typed", "offered"), [
    ("escrow", "_ESCROW_COMPLETE", "escrow clu", "plain,cluster"),
    ("escrow", "_ESCROW_COMPLETE", "escrow cluster sh", "plain,show"),
    ("unseal-agent", "_UNSEAL_AGENT_COMPLETE", "unseal-agent st", "plain,status"),
])
def test_main_completes_under_the_variable_named_after_its_program(
        program: str, variable: str, typed: str, offered: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    said = completion(program, monkeypatch, capsys, **{
        variable: "bash_complete", "COMP_WORDS": typed,
        "COMP_CWORD": str(len(typed.split()) - 1)})
    assert said.splitlines() == [offered]


def test_every_completion_script_readme_gives_is_one_the_command_makes(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO / "README.md").read_text()
    given = set(COMPLETION_SOURCE.findall(readme))
    assert {("_ESCROW_COMPLETE", "bash", "escrow"),
            ("_UNSEAL_AGENT_COMPLETE", "bash", "unseal-agent"),
            ("_ESCROW_COMPLETE", "fish", "escrow"),
            ("_UNSEAL_AGENT_COMPLETE", "fish", "unseal-agent")} <= given
    assert "zsh_source" in readme
    for variable, shell, program in sorted(given | {(v, "zsh", p) for v, _, p in given}):
        script = completion(program, monkeypatch, capsys, **{variable: f"{shell}_source"})
        # The script calls the command back under the same variable, for the shell's words.
        assert f"{variable}={shell}_complete" in script, (variable, shell)
        assert f"_{program.replace('-', '_')}_completion" in script
        monkeypatch.delenv(variable)
