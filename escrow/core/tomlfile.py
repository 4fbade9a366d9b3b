"""Reading a TOML settings file: the escrow's escrow.toml and the agent's config.toml, each
way a file can be unusable reported as an error that names the file and what to do."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from escrow.core.errors import ConfigError, EscrowError


def read(path: Path, what: str, hint: str,
         error: type[EscrowError] = ConfigError) -> dict[str, Any] | None:
    """The document in ``path``, or None if there is no such file (each caller says in its
    own words what a missing file means). ``what`` names the file in messages ("the config
    file"), ``hint`` says how to make an unreadable one readable; every problem is raised as
    ``error``, so the agent reports its own family."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text", "save it as UTF-8 (TOML requires it)"
                    ) from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}", hint) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}", "fix the file") from None
    except (ValueError, RecursionError):  # tomllib: an integer too long, or too deep nesting
        raise error(f"{path} is not usable TOML: a number is too long or values nest too "
                    "deeply", "fix the file") from None
