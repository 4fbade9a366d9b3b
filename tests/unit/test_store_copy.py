"""`escrow store copy` knows every table both schemas make: each is copied (DURABLE, parents
first), so a table added later cannot be forgotten."""

from __future__ import annotations

import contextlib
import re
import sqlite3

from escrow.store import postgres, sqlite
from escrow.store.copy import DURABLE


def sqlite_schema() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    for migration in sqlite.MIGRATIONS:
        for statement in migration:
            db.execute(statement)
    return db


def test_every_table_of_either_schema_is_copied() -> None:
    with contextlib.closing(sqlite_schema()) as db:
        in_sqlite = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    in_postgresql = {name for migration in postgres.MIGRATIONS for statement in migration
                     for name in re.findall(r"CREATE TABLE (\w+)", statement)}
    assert len(set(DURABLE)) == len(DURABLE)
    assert in_sqlite == set(DURABLE)
    assert in_postgresql - {"schema_version"} == set(DURABLE)


def test_tables_are_copied_after_the_tables_they_refer_to() -> None:
    with contextlib.closing(sqlite_schema()) as db:
        for position, table in enumerate(DURABLE):
            parents = {parent for (parent,) in db.execute(
                "SELECT \"table\" FROM pragma_foreign_key_list(?)", (table,))}
            assert parents <= set(DURABLE[:position]), table
