"""The migrations and the current schema agree: sql/schema.sql is what migrating an empty
database produces (`make schema` rewrites it after a new migration)."""

from __future__ import annotations

import difflib

from tools import schema


def test_the_migrations_produce_schema_sql():
    produced = schema.migrated_dump()
    committed = schema.SCHEMA.read_text("utf-8")
    diff = "".join(
        difflib.unified_diff(committed.splitlines(True), produced.splitlines(True), "schema.sql", "migrated")
    )
    assert produced == committed, f"sql/schema.sql is out of date; run make schema\n{diff[:4000]}"
