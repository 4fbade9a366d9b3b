"""What every user of a PKCS#11 token is configured with: the module, the token, and a PIN
found without ever passing through a command line. Pure: reading a config file does not load
the PKCS#11 C extension (that is :mod:`escrow.core.pkcs11`)."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from escrow.core.errors import ConfigError


@dataclass(frozen=True)
class HsmSettings:
    module: str
    token: str
    key_label: str = "escrow-wrap"
    pin_file: Path | None = None
    softhsm_conf: Path | None = None
    # Where the user sets the module and the token, for error hints (the escrow's by default).
    module_set_in: str = "[hsm] module / --hsm-module"
    label_set_in: str = "[hsm] token in escrow.toml"


@dataclass(frozen=True)
class Pin:
    value: str
    source: str  # where it came from, for error messages; never the PIN itself

    def __repr__(self) -> str:
        return f"Pin(<redacted>, source={self.source!r})"


def read_pin_file(path: Path, source: str, setting: str = "--hsm-pin-file",
                  what: str = "HSM PIN") -> Pin:
    """A secret from a file of its own (mode 0600, or at least not world-readable): the
    token's PIN, or another secret named by ``what``."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"the {what} file {path} does not exist",
                          f"create it (mode 0600) or point {setting} at the right file"
                          ) from None
    except PermissionError:
        raise ConfigError(f"the {what} file {path} is not readable by this user",
                          "run as the escrow's user, or fix the file's owner") from None
    except UnicodeDecodeError:  # its message would quote a byte of the PIN
        raise ConfigError(f"the {what} file {path} is not UTF-8 text",
                          f"write the {what} as text, followed by a newline") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}",
                          f"point {setting} at a regular file") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"the {what} file {path} is readable or writable by every user",
                          f"run `chmod 600 {path}`")
    pin = text.rstrip("\r\n")
    if not pin:
        raise ConfigError(f"the {what} file {path} is empty", f"write the {what} in it")
    return Pin(pin, source)


def credential_pin(env: Mapping[str, str], name: str, setting: str,
                   what: str = "HSM PIN") -> Pin | None:
    """The secret passed as the systemd credential ``name`` (LoadCredential=), if there is
    one."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).exists():
        return read_pin_file(Path(directory) / name, f"systemd credential {name}", setting,
                             what)
    return None
