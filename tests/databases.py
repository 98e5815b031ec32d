"""The tests' databases: one migrated template per pytest process, one database cloned from it
that the process's tests share (emptied before each test), and, for the few tests that need one,
a clone of their own.

Why shared: ``CREATE DATABASE ... TEMPLATE`` (and the ``DROP`` after) costs tens of milliseconds to
a second on a busy machine, and nearly every test asked for one; emptying a database of a few
kilobytes is a few milliseconds. A process here is a pytest session, or one pytest-xdist worker:
each worker has its own template and shared database, so workers never see each other's rows.

Emptying (``SharedDatabase.reset``, before each test):

- every other connection to the database is ended first, as ``DROP DATABASE ... WITH (FORCE)``
  did: a connection left open by the last test (a pool not closed, a held transaction or lock)
  would otherwise block the ``TRUNCATE``;
- every table but ``schema_migrations`` is truncated, ``RESTART IDENTITY`` so that the identity
  columns start at 1 again, ``CASCADE`` for the foreign keys (all of them at once in any case);
- ``schema_migrations`` holds the only rows the migrations seed (one per migration); it is kept,
  and put back from the template's rows if a test changed it;
- any sequence no table's identity owns is restarted too (none today; a migration may add one).

The schema check after a test leaves its connection open for the reset before the next one (and
only until then: a test never sees it): a new backend first loads its catalog caches, which cost
as much as the statements (reset 22 ms and check 16 ms on new connections, 10 ms on the check's).

A test that changes the schema itself (``ALTER TABLE``, a new function, a row in
``schema_migrations`` for a newer release...) must use ``own_database_url`` (tests/conftest.py):
after each test the shared database's schema is compared with the one it started with
(``fingerprint``), and if it differs the database is made anew from the template and that test
fails with an error saying so, so the next tests still start from the migrated schema.
"""

from __future__ import annotations

import os
import uuid

import psycopg
from psycopg import sql

from chunksvc import embedded

# What the schema of a database is, as one hash: its relations, columns, constraints, indexes,
# triggers and functions in the public schema, and the database's own settings. Cheap (a few
# milliseconds), taken after each test on the shared database.
_FINGERPRINT = """
SELECT md5(string_agg(item, E'\\n' ORDER BY item)) FROM (
    SELECT 'rel ' || c.relname || ' ' || c.relkind::text || ' ' || c.relpersistence::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'
  UNION ALL
    SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
        || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = 'public'::regnamespace
  UNION ALL
    SELECT 'idx ' || indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'public'::regnamespace
  UNION ALL
    SELECT 'trg ' || tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
  UNION ALL
    SELECT 'fn ' || p.oid::regprocedure::text || ' ' || md5(p.prosrc)
        || ' ' || coalesce(array_to_string(p.proconfig, ','), '')
    FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
  UNION ALL
    SELECT 'set ' || array_to_string(s.setconfig, ',')
    FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = current_database()
  UNION ALL
    SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
) AS schema(item)
"""

_TABLES = """
SELECT c.relname FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND c.relname <> 'schema_migrations'
ORDER BY c.relname
"""

# Sequences that RESTART IDENTITY on those tables does not reach (no identity or serial column owns them).
_LOOSE_SEQUENCES = """
SELECT c.relname FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
ORDER BY c.relname
"""

_MIGRATION_ROWS = "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"


def worker_tag() -> str:
    """``gw0``, ``gw1``... under pytest-xdist, ``main`` without it: part of each database's name."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def fingerprint(conn: psycopg.Connection) -> str:
    row = conn.execute(_FINGERPRINT).fetchone()
    assert row is not None
    return str(row[0])


class SharedDatabase:
    """One template clone that a pytest process's tests share, emptied before each test."""

    def __init__(self, admin_url: str, template: str) -> None:
        self.admin_url = admin_url
        self.template = template
        self.name = f"chunksvc_shared_{worker_tag()}_{uuid.uuid4().hex[:8]}"
        self.url = embedded.ensure_database(admin_url, self.name, template=template)
        with psycopg.connect(self.url, autocommit=True) as conn:
            self.schema = fingerprint(conn)
            self.migration_rows = conn.execute(_MIGRATION_ROWS).fetchall()
            tables = [row[0] for row in conn.execute(_TABLES)]
            loose = [row[0] for row in conn.execute(_LOOSE_SEQUENCES)]
        self._truncate = sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in tables)
        )
        self._restart = [sql.SQL("ALTER SEQUENCE {} RESTART").format(sql.Identifier(s)) for s in loose]
        self._warm: psycopg.Connection | None = None  # the last check's connection, for the next reset

    def reset(self) -> None:
        """Empty every table but the migrations' own, as a fresh clone of the template has them."""
        conn, self._warm = self._warm, None
        if conn is not None:
            try:
                with conn:
                    self._empty(conn)
                return
            except psycopg.OperationalError:  # ended since the check (a test's outage, say): anew
                pass
        with psycopg.connect(self.url, autocommit=True) as conn:
            self._empty(conn)

    def _empty(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with conn.transaction():
            conn.execute(self._truncate)
            for statement in self._restart:
                conn.execute(statement)
            if conn.execute(_MIGRATION_ROWS).fetchall() != self.migration_rows:
                conn.execute("DELETE FROM schema_migrations")
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (%s, %s, %s, %s)",
                        self.migration_rows,
                    )

    def schema_changed(self) -> bool:
        """Whether the last test changed the schema; if so the database is made anew from the
        template (same name and URL), so the tests after it start from the migrated schema."""
        conn = psycopg.connect(self.url, autocommit=True)
        try:
            unchanged = fingerprint(conn) == self.schema
        except BaseException:
            conn.close()
            raise
        if unchanged:
            self._close_warm()
            self._warm = conn  # for the next reset
            return False
        conn.close()
        embedded.drop_database(self.admin_url, self.name)
        embedded.ensure_database(self.admin_url, self.name, template=self.template)
        return True

    def _close_warm(self) -> None:
        conn, self._warm = self._warm, None
        if conn is not None:
            conn.close()

    def drop(self) -> None:
        self._close_warm()
        embedded.drop_database(self.admin_url, self.name)
