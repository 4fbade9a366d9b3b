"""Child process for the crash test: deposit fresh random keys for ever, acknowledging each.

An acknowledgement line (the key's fingerprint) is printed only after the deposit committed,
so every acknowledged fingerprint must survive a SIGKILL at any later instant.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from escrow import config
from escrow.core.timestamps import timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token, resolve_pin


def main() -> None:
    data_dir, cluster_id = Path(sys.argv[1]), sys.argv[2]
    settings = config.load(data_dir)
    store = SqliteStore.open(settings.db_path, lambda: timestamp(datetime.now(UTC)))
    token = Token(settings.hsm, resolve_pin(None, settings.hsm.pin_file, os.environ))
    vault = Vault(store, token, lambda: datetime.now(UTC), "crash-test")
    print("ready", flush=True)
    while True:
        result = vault.deposit(cluster_id, UnlockKey(os.urandom(32)))
        print(result.fingerprint, flush=True)


if __name__ == "__main__":
    main()
