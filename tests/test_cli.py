"""The ops interface: `python -m chunksvc migrate` and `keys ...`, as subprocesses on a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import psycopg
import pytest
import webtest

from chunksvc import embedded, migrations
from chunksvc.app import create_app
from chunksvc.config import Config
from chunksvc.storage import open_storage
from tests.conftest import TEST_LIMITS
from tests.helpers import create, migrate_twice_at_once


def chunksvc(database_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DATABASE_URL=database_url, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "chunksvc", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def empty_database(pg_admin_url):
    name = f"chunksvc_empty_{uuid.uuid4().hex[:12]}"
    url = embedded.ensure_database(pg_admin_url, name)
    yield url
    embedded.drop_database(pg_admin_url, name)


def applied(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]


def test_migrate_applies_each_file_once(empty_database):
    first = chunksvc(empty_database, "migrate")
    assert first.returncode == 0, first.stderr
    names = [m.name for m in migrations.available()]
    assert first.stdout.strip() == "applied: " + ", ".join(names)
    assert applied(empty_database) == names
    again = chunksvc(empty_database, "migrate")
    assert (again.returncode, again.stdout.strip()) == (0, "database schema is up to date")


def test_two_hosts_migrating_at_once(empty_database):
    results = migrate_twice_at_once(empty_database)
    # Each file is applied under a transaction-level advisory lock by whichever host takes it
    # first; the other finds its row there and skips it. Together: each one once, in order.
    names = [m.name for m in migrations.available()]
    assert sorted(results[0] + results[1]) == names
    assert all(r == sorted(r) for r in results)
    assert applied(empty_database) == names
    with psycopg.connect(empty_database) as conn:  # and in order, whoever applied which
        assert [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY applied_at")] == names


def test_migrate_refuses_an_edited_migration(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = '0001'")
    result = chunksvc(database_url, "migrate")
    assert result.returncode == 2
    assert "0001_schema.sql changed after it was applied" in result.stderr


def test_keys_create_list_revoke(database_url, app):
    created = chunksvc(database_url, "keys", "create", "ingest-bot")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]  # the last line is the key alone
    assert key.startswith("csk_") and len(key) == 56
    prefix = key[:12]
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE prefix = %s", (prefix,)).fetchone()[0]
    assert key.encode() not in bytes(stored)  # only a hash is kept

    listed = chunksvc(database_url, "keys", "list").stdout.splitlines()
    row = next(line for line in listed if prefix in line)
    assert row.split()[0] == "ingest-bot" and row.split()[4:] == ["-", "-"]  # never used, not revoked

    auth = {"Authorization": f"Bearer {key}"}
    create(app, auth, size=1)
    row = next(line for line in chunksvc(database_url, "keys", "list").stdout.splitlines() if prefix in line)
    assert row.split()[4] != "-"  # last used is now set (the date column of LAST USED)

    revoked = chunksvc(database_url, "keys", "revoke", prefix)
    assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {prefix} (ingest-bot)")
    app.get("/uploads/sessions", headers=auth, status=401)
    again = chunksvc(database_url, "keys", "revoke", prefix)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_keys_create_refuses_a_bad_client_name(database_url):
    result = chunksvc(database_url, "keys", "create", "bad name!")
    assert result.returncode == 2 and "client name" in result.stderr


def test_a_command_that_creates_a_fresh_embedded_database_says_so_naming_its_directory(tmp_path):
    """No DATABASE_URL and a CHUNKSVC_VAR_DIR with no database yet: keys create warns on stderr
    that it is making a new one (a server elsewhere will not know this key); stdout keeps its
    contract, the key alone on the last line. Once the database exists, no warning."""
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    env["CHUNKSVC_VAR_DIR"] = str(tmp_path / "elsewhere")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "chunksvc", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    created = run("keys", "create", "me")
    assert created.returncode == 0, created.stderr
    data_dir = (tmp_path / "elsewhere" / "pgdata").resolve()
    assert f"WARNING: no DATABASE_URL, and no embedded database in {data_dir} yet" in created.stderr
    assert "another CHUNKSVC_VAR_DIR" in created.stderr and "401" in created.stderr
    key = created.stdout.splitlines()[-1]
    assert key.startswith("csk_") and len(key) == 56
    assert "XDG_RUNTIME_DIR" not in created.stderr

    listed = run("keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert key[:12] in listed.stdout
    assert "WARNING" not in listed.stderr  # the same database, found again


@pytest.fixture
def disk_app(database_url, db, file_spec):
    """The app on disk storage, so that a command run with the same storage URL sees its bytes."""
    storage = open_storage(file_spec)
    config = Config(database_url=database_url, storage=file_spec, limits=TEST_LIMITS, block_size=64 * 1024)
    yield webtest.TestApp(create_app(config, db=db, storage=storage))
    storage.close()


def test_sessions_list_show_and_abort(database_url, disk_app, auth, file_spec):
    """The operator's view of any client's uploads, on the same database and disk as the app."""
    app = disk_app
    session = create(app, auth, size=3000, part_size=1024).json
    app.put(f"/uploads/sessions/{session['id']}/parts/2", params=b"y" * 1024, headers=auth)
    env = {"CHUNKSVC_STORAGE_URL": f"file://{file_spec.root}"}

    listed = chunksvc(database_url, "sessions", "list", "--client", "alice", "--status", "IN_PROGRESS", env=env)
    assert listed.returncode == 0, listed.stderr
    assert session["id"] in listed.stdout and "1/3" in listed.stdout
    assert chunksvc(database_url, "sessions", "list", "--client", "nobody", env=env).stdout.count("\n") == 1

    shown = chunksvc(database_url, "sessions", "show", session["id"], env=env)
    assert shown.returncode == 0, shown.stderr
    assert "1 of 3 received (1024 bytes)" in shown.stdout and "missing:    1, 3" in shown.stdout

    assert "lease:" not in shown.stdout  # only a COMPLETING session has one to show

    owner = uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as admin:  # as an assembler takes it
        admin.execute(
            "UPDATE upload_sessions SET status = 'COMPLETING', completion_owner = %s,"
            " completion_lease_until = now() + interval '30 seconds' WHERE id = %s",
            (owner, session["id"]),
        )
    assembling = chunksvc(database_url, "sessions", "show", session["id"], env=env)
    assert f"lease:      {owner} until 20" in assembling.stdout, assembling.stdout
    with psycopg.connect(database_url, autocommit=True) as admin:  # as a failed assembly leaves it
        admin.execute(
            "UPDATE upload_sessions SET status = 'IN_PROGRESS', completion_owner = NULL,"
            " completion_lease_until = NULL WHERE id = %s",
            (session["id"],),
        )

    aborted = chunksvc(database_url, "sessions", "abort", session["id"], env=env)
    assert aborted.returncode == 0, aborted.stderr
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "ABORTED"
    assert [p for p in (file_spec.root / "parts").rglob("*") if p.is_file()] == []
    unknown = chunksvc(database_url, "sessions", "show", str(uuid.uuid4()), env=env)
    assert unknown.returncode == 1 and "no session" in unknown.stderr


@pytest.mark.skipif(shutil.which("psql") is None, reason="no psql on this machine (postgresql-client)")
def test_psql_runs_on_the_configured_database(database_url):
    answered = chunksvc(database_url, "psql", "-At", "-c", "SELECT count(*) FROM schema_migrations")
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() == str(len(migrations.available()))
    assert "psql on database" in answered.stderr and "password" not in answered.stderr


def _schema_of(url: str) -> list[tuple[str, str]]:
    """Every table and function in the public schema: what a command must leave as it found it."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT 'table', table_name::text FROM information_schema.tables WHERE table_schema = 'public'"
            " UNION ALL SELECT 'function', routine_name::text FROM information_schema.routines"
            " WHERE routine_schema = 'public' ORDER BY 1, 2"
        ).fetchall()


def _one_release_behind(url: str) -> str:
    """Migrate ``url`` to all but this release's last migration; return that migration's name."""
    last = migrations.available()[-1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations.available()[:-1]:
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
    return last.name


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "list"),
        ("keys", "create", "newcomer"),
        ("sessions", "list"),
        ("webhooks", "list"),
        ("deliver", "--once"),
        ("reap", "--dry-run"),
        ("reap",),
    ],
    ids=" ".join,
)
def test_no_command_but_migrate_changes_an_unmigrated_schema(empty_database, command):
    """Contract v1.2: `migrate` is the only command that changes the schema. A command run from a
    newer checkout refuses, says to run `migrate`, and leaves the database as it was."""
    before = _schema_of(empty_database)
    result = chunksvc(empty_database, *command)
    assert result.returncode == 2, result
    assert "run `python -m chunksvc migrate`" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert _schema_of(empty_database) == before == []


def test_a_command_refuses_a_schema_one_migration_behind_and_names_it(empty_database):
    missing = _one_release_behind(empty_database)
    before = _schema_of(empty_database)
    result = chunksvc(empty_database, "sessions", "list")
    assert result.returncode == 2
    assert missing in result.stderr and "migrate" in result.stderr
    assert _schema_of(empty_database) == before
    assert missing not in applied(empty_database)
    # Then `migrate` applies it, and the same command runs.
    assert chunksvc(empty_database, "migrate").returncode == 0
    assert chunksvc(empty_database, "sessions", "list").returncode == 0


def test_commands_run_on_a_database_newer_than_this_release(database_url):
    """A rolling upgrade: the next release's migration applied while this one still serves."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ('9999', '9999_next.sql', 'x')")
    result = chunksvc(database_url, "keys", "list")
    assert result.returncode == 0, result.stderr


def test_gunicorn_refuses_to_serve_an_older_schema(empty_database, tmp_path):
    """The server too: gunicorn exits at start, before any worker, naming `migrate`."""
    missing = _one_release_behind(empty_database)
    env = dict(os.environ, DATABASE_URL=empty_database, CHUNKSVC_STORAGE_URL=f"file://{tmp_path}")
    executable = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    result = subprocess.run(
        [executable, "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:0", "chunksvc.wsgi:app"],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert missing in result.stderr and "chunksvc migrate" in result.stderr, result.stderr
    assert missing not in applied(empty_database)
