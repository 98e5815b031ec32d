"""Schema migrations: apply ``sql/migrations/NNNN_name.sql`` in order, once each.

Two hosts migrating at once is safe: each file is applied in its own transaction, together with
its row in ``schema_migrations``, under a transaction-level advisory lock
(``pg_advisory_xact_lock``) taken first in that transaction; whoever gets the lock second finds
the row there and skips the file. Each process walks the files in order, so they are applied in
order, each once, though two processes may share the work between them.

Why a transaction-level lock and not, as before, a session-level one held for the whole run:
every command migrates first (``serve``, ``reap`` from cron, ``keys``, ``sessions``...), with the
same ``DATABASE_URL`` the service uses, which behind a PgBouncer in transaction pooling mode is
PgBouncer's. There a session-level lock is taken on one server connection and "released" on
whichever runs the unlock (which does not hold it): the lock would stay on the first connection,
and the next migration anywhere would wait for it forever. A transaction-level lock lives and ends
with the transaction, which PgBouncer keeps on one server connection, so ``migrate`` needs no
direct connection to PostgreSQL. (A migration file still runs in one transaction: no
``CREATE INDEX CONCURRENTLY`` and the like, as before.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources

import psycopg

from chunksvc.db import translate_errors

# Any constant works; it only has to be the same for every migrating process.
_MIGRATION_LOCK_ID = 0x636B_7376_6D69_6772  # "cksvmigr"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


class SchemaOutdated(MigrationError):
    """The database lacks migrations this release needs: only ``migrate`` may apply them."""


def available() -> list[Migration]:
    folder = resources.files("chunksvc").joinpath("sql/migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(match.group(1), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; return the names of those applied by this call."""
    applied_now = []
    # prepare_threshold=None: no server-side prepared statements (see db.Database), which a
    # transaction-pooling PgBouncer cannot keep; the lock statement runs once per file.
    with translate_errors(), psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done: dict[str, str] = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in available():
            if migration.version not in done:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
                    # Under the lock: another process may have applied it since we looked.
                    row = conn.execute(
                        "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
                    ).fetchone()
                    if row is None:
                        conn.execute(migration.sql)
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                        applied_now.append(migration.name)
                        continue
                done[migration.version] = row[0]
            if done[migration.version] != migration.checksum:
                raise MigrationError(f"{migration.name} changed after it was applied; add a new migration instead")
    return applied_now


def pending(database_url: str) -> list[Migration]:
    """The migrations this release ships that the database has not applied; reads only.

    Versions the database has and this release does not know are fine: they are a newer
    release's, applied while this one still serves (a rolling upgrade).
    """
    with translate_errors(), psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as conn:
        # to_regclass: no error (and nothing created) on a database never migrated.
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,):
            applied: set[str] = set()
        else:
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    return [migration for migration in available() if migration.version not in applied]


def require_current(database_url: str) -> None:
    """Raise ``SchemaOutdated`` unless every migration of this release is applied.

    Every command but ``migrate``, and the server, call this instead of migrating: a command run
    from a newer checkout must not change the schema under the workers of the release in service
    (the upgrade notes' order is: migrate, then roll the workers).
    """
    missing = pending(database_url)
    if missing:
        names = ", ".join(m.name for m in missing)
        raise SchemaOutdated(
            f"the database schema is older than this release needs (not applied: {names});"
            " run `python -m chunksvc migrate` (make migrate) first"
        )
