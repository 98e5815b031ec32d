"""chunksvc behind PgBouncer in transaction pooling mode, the distribution's PgBouncer
(tools/pgbouncer.py) in front of the test PostgreSQL, with small pools so that clients share
server connections: the whole upload flow and ``migrate`` through it, completes and aborts racing
on two servers, a worker killed mid-assembly taken over once its completion lease has run out, and
reaper phases that never run twice at once across two servers. First, that the harness is what it
claims: session-level state (the advisory locks chunksvc used before, server-side prepared
statements) leaks between its clients."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chunksvc import dao, embedded, migrations
from chunksvc.config import StorageSpec
from chunksvc.db import Database
from chunksvc.services import layout
from chunksvc.services.auth import KeyManager
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import PeriodicReaper, Reaper, ReaperSettings, ReapResult
from chunksvc.storage import ListedKey, open_storage
from chunksvc.storage.local import LocalStorage
from chunksvc_client import Client
from tests.conftest import TEST_LIMITS
from tests.faults import FaultProxy
from tests.helpers import (
    completion_lease_ran_out,
    hold_completion_lease,
    migrate_twice_at_once,
    payload,
    query,
    sha,
    split,
    wait_for,
)
from tests.test_reaper import BlockingReaper
from tools import harness
from tools import pgbouncer as bouncer_tool

ROOT = Path(__file__).resolve().parents[1]
POOL = 3  # server connections per database: fewer than the clients, so they share them
LEASE = 3  # seconds (CHUNKSVC_LEASE for the servers here)
SERVER_ENV = {
    "CHUNKSVC_MIN_PART_SIZE": "1",
    "CHUNKSVC_ACCESS_LOG": "/dev/null",
    "CHUNKSVC_LEASE": str(LEASE),
    "CHUNKSVC_DB_POOL_MAX": "4",
}

if bouncer_tool.pgbouncer_binary() is None:
    if os.environ.get("CI"):
        raise RuntimeError("pgbouncer is not installed: .ci/run installs it (apt-get install pgbouncer)")
    pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)", allow_module_level=True)


@pytest.fixture(scope="module")
def bouncer(pg_admin_url) -> Iterator[bouncer_tool.PgBouncer]:
    with bouncer_tool.pgbouncer(pg_admin_url, default_pool_size=POOL) as running:
        yield running


@pytest.fixture
def pooled_url(bouncer, database_url) -> str:
    """The test's database through PgBouncer."""
    return bouncer.url(database_url)


@pytest.fixture(scope="module")
def single(pg_admin_url) -> Iterator[bouncer_tool.PgBouncer]:
    """PgBouncer with one server connection per database: every client's transactions run on it,
    so anything held by "the session" (the advisory locks the reaper used) would be every client's."""
    with bouncer_tool.pgbouncer(pg_admin_url, default_pool_size=1) as running:
        yield running


def dbname(url: str) -> str:
    return str(conninfo_to_dict(url)["dbname"])


def server_backends(database_url: str) -> int:
    """Connections PostgreSQL has to the database now (this one left out)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def serving(
    url: str, spec: StorageSpec, tmp_path: Path, expected_errors: tuple[str, ...] = (), **env: str
) -> Iterator[harness.Server]:
    """gunicorn on ``url``; afterwards, its log shows nothing the pooler broke: no error (but
    those whose message has one of ``expected_errors``), no traceback."""
    log = tmp_path / f"gunicorn-{uuid.uuid4().hex[:6]}.log"
    with harness.gunicorn(url, spec, env={**SERVER_ENV, **env}, cwd=ROOT, stderr_path=log) as server:
        yield server
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                assert any(expected in str(entry.get("msg")) for expected in expected_errors), line
        assert "prepared statement" not in line and "Traceback" not in line, line


# --- the harness ----------------------------------------------------------------------------------


def test_the_harness_pools_transactions_so_session_state_leaks_between_clients(single, database_url):
    """What chunksvc must not rely on: through one server connection, two clients both "take" the
    same session-level advisory lock (the old completion lock would have let two assemblers run),
    and psycopg's server-side prepared statements collide; chunksvc's pool prepares none."""
    assert {row["key"]: row["value"] for row in single.show("CONFIG")}["pool_mode"] == "transaction"
    url = single.url(database_url)
    with psycopg.connect(url, autocommit=True) as first, psycopg.connect(url, autocommit=True) as second:
        assert first.execute("SELECT pg_try_advisory_lock(13)").fetchone() == (True,)
        assert second.execute("SELECT pg_try_advisory_lock(13)").fetchone() == (True,)  # "both hold it"
        first.execute("SELECT pg_advisory_unlock_all()")
    with (
        psycopg.connect(url, autocommit=True, prepare_threshold=0) as first,
        psycopg.connect(url, autocommit=True, prepare_threshold=0) as second,
        pytest.raises(psycopg.errors.DuplicatePreparedStatement),
    ):
        for n in range(3):
            first.execute("SELECT %s::int", (n,))
            second.execute("SELECT %s::int + 1", (n,))
    db = Database(url, max_size=2)  # as the service makes its pool
    try:
        for _ in range(20):  # well past psycopg's default threshold (5 executions)
            with db.connection() as a, db.connection() as b:
                assert dao.ping(a) and dao.ping(b)
    finally:
        db.close()


# --- the whole flow -------------------------------------------------------------------------------


def test_the_whole_upload_flow_through_pgbouncer(bouncer, pooled_url, database_url, tmp_path):
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    files = {name: payload(size, seed) for name, size, seed in (("small", 5000, 1), ("big", 3 * 1024 * 1024 + 7, 2))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    key = harness.create_api_key(pooled_url, "flow")
    with (
        # The big one completes in the background; reaper turns every second.
        serving(
            pooled_url,
            spec,
            tmp_path,
            CHUNKSVC_WORKERS="2",
            CHUNKSVC_SYNC_COMPLETE_MAX="1000000",
            CHUNKSVC_ASSEMBLY_POLL="1",
            CHUNKSVC_REAP_INTERVAL="1",
        ) as server,
        Client(server.url, key) as client,
    ):
        for name, data in files.items():
            done = client.upload_file(tmp_path / name, part_size=64 * 1024, parallel=4)
            assert (done["status"], done["object"]["sha256"]) == ("COMPLETED", sha(data))
            assert (spec.root / done["object"]["key"]).read_bytes() == data
        again = client.upload_file(tmp_path / "small", part_size=64 * 1024)  # found again, nothing sent
        assert again["status"] == "COMPLETED"
        dropped = client.create_session("dropped.bin", 10, part_size=5)
        client.put_part(dropped["id"], 1, b"hello")
        client.abort(dropped["id"])
        assert client.get_session(dropped["id"])["status"] == "ABORTED"
        listed = list(client.iter_sessions())
        assert sorted(s["status"] for s in listed) == ["ABORTED", "COMPLETED", "COMPLETED"]
        overdue = client.create_session("late.bin", 10)
        query(database_url, "UPDATE upload_sessions SET expires_at = now() WHERE id = %s", (overdue["id"],))
        wait_for(lambda: client.get_session(overdue["id"])["status"] == "EXPIRED", "the reaper's expiry")
        wait_for(
            lambda: (
                query(database_url, "SELECT purged_at IS NOT NULL FROM upload_sessions WHERE id = %s", (overdue["id"],))
                == [(True,)]
            ),
            "the server's own reaper, through PgBouncer",
        )
        # PostgreSQL never saw more connections to this database than the pooler's pool.
        assert server_backends(database_url) <= POOL
    assert [p for p in (spec.root / layout.PARTS).rglob("*") if p.is_file()] == []
    served = next(row for row in bouncer.show("STATS") if row["database"] == dbname(pooled_url))
    assert served["total_xact_count"] > 100, served  # it all went through PgBouncer


def test_migrate_through_pgbouncer_applies_each_file_once(bouncer, pg_admin_url):
    """Two hosts migrating at once through the pooler (every command migrates first, with the
    service's DATABASE_URL): the transaction-level lock still orders them."""
    name = f"chunksvc_mig_{uuid.uuid4().hex[:12]}"
    url = bouncer.url(embedded.ensure_database(pg_admin_url, name))
    try:
        results = migrate_twice_at_once(url)
        names = [m.name for m in migrations.available()]
        assert sorted(results[0] + results[1]) == names
        assert migrations.migrate(url) == []
    finally:
        embedded.drop_database(pg_admin_url, name)


# --- completes and aborts racing ------------------------------------------------------------------


def call(
    barrier: threading.Barrier, server: harness.Server, method: str, path: str, headers: dict[str, str], delay: float
) -> tuple[int, str | None]:
    """One request ``delay`` seconds after all the racers are ready: its status and its problem's
    code (or its session's status)."""
    barrier.wait()
    time.sleep(delay)
    status, _, body = server.request(method, path, None, headers, timeout=60)
    found = json.loads(body) if body else {}
    return status, found.get("code") or found.get("status")


def test_completes_and_aborts_race_correctly_on_two_servers(bouncer, pooled_url, database_url, tmp_path):
    """Per session, four completes and two aborts at the same moment, split over two servers
    whose connections PgBouncer multiplexes over three: each session ends COMPLETED or ABORTED,
    never both sides winning, no abort while an assembly holds the lease, and nothing left over."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    key = harness.create_api_key(pooled_url, "race")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    part = 256 * 1024
    outcomes: dict[str, int] = {"COMPLETED": 0, "ABORTED": 0}
    answers: Counter[tuple[int, str | None]] = Counter()
    with (
        serving(pooled_url, spec, tmp_path, CHUNKSVC_WORKERS="2") as one,
        serving(pooled_url, spec, tmp_path, CHUNKSVC_WORKERS="2") as other,
        Client(one.url, key) as client,
        ThreadPoolExecutor(max_workers=6) as pool,
    ):
        for index in range(12):
            data = payload(12 * part - index, seed=100 + index)
            session_id = client.create_session("r.bin", len(data), part_size=part, sha256=sha(data))["id"]
            for number, chunk in enumerate(split(data, part), start=1):
                client.put_part(session_id, number, chunk)
            barrier = threading.Barrier(6)
            # An abort is one short transaction, a completion two and an assembly: aborts sent a
            # little later land before, during or after the assembly.
            lag = (index % 4) * 0.015
            complete = f"/uploads/sessions/{session_id}/complete"
            session_path = f"/uploads/sessions/{session_id}"
            futures = [
                pool.submit(call, barrier, server, "POST", complete, headers, 0) for server in (one, other, one, other)
            ]
            aborts = [
                pool.submit(call, barrier, server, "DELETE", session_path, headers, lag) for server in (one, other)
            ]
            completes = [future.result() for future in futures]
            aborted = [future.result() for future in aborts]

            assert set(completes) <= {
                (200, "COMPLETED"),
                (202, "COMPLETING"),  # another request was assembling it
                (202, "COMPLETED"),  # ... and had finished by the time this one read the session
                (409, "session_not_active"),
            }, completes
            assert set(aborted) <= {(204, None), (409, "completion_in_progress"), (409, "session_completed")}, aborted
            [(final, owner, object_sha)] = query(
                database_url,
                "SELECT status, completion_owner, object_sha256 FROM upload_sessions WHERE id = %s",
                (session_id,),
            )
            assert owner is None  # every lease ended with its outcome
            stored = [p for p in spec.root.rglob("*") if p.is_file() and session_id in str(p)]
            if final == "COMPLETED":
                assert (204, None) not in aborted and (200, "COMPLETED") in completes
                assert object_sha == sha(data)
                assert [p.relative_to(spec.root).as_posix() for p in stored] == [layout.object_key(session_id)]
            else:
                assert final == "ABORTED", final
                assert (204, None) in aborted and (200, "COMPLETED") not in completes
                assert stored == []
            outcomes[final] += 1
            answers.update(completes + aborted)
    assert sum(outcomes.values()) == 12, outcomes
    print(f"race outcomes: {outcomes}, answers: {dict(answers)}")


def test_abort_is_refused_during_a_live_lease_and_accepted_once_it_ran_out(pooled_url, database_url, tmp_path):
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    key = harness.create_api_key(pooled_url, "lease")
    with serving(pooled_url, spec, tmp_path, CHUNKSVC_WORKERS="1") as server, Client(server.url, key) as client:
        session = client.create_session("l.bin", 4, part_size=4)
        client.put_part(session["id"], 1, b"abcd")
        hold_completion_lease(database_url, session["id"], LEASE, status="COMPLETING")  # a live assembler
        headers = {"Authorization": f"Bearer {key}"}
        status, _, body = server.request("DELETE", f"/uploads/sessions/{session['id']}", None, headers)
        assert (status, json.loads(body)["code"]) == (409, "completion_in_progress")
        assert not completion_lease_ran_out(database_url, session["id"])
        wait_for(lambda: completion_lease_ran_out(database_url, session["id"]), "the lease to run out")
        client.abort(session["id"])
        assert client.get_session(session["id"])["status"] == "ABORTED"


# --- kill -9 mid-assembly -------------------------------------------------------------------------


def test_a_worker_killed_mid_assembly_is_taken_over_once_its_lease_ran_out(bouncer, pooled_url, database_url, tmp_path):
    """gunicorn -> fault proxy -> PgBouncer -> PostgreSQL. The assembling worker is killed as it
    records its outcome (that statement is held at the proxy); the new worker's poller takes the
    assembly over, but only once the dead one's lease has run out, and completes it."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    data = payload(3 * 1024 * 1024 + 17, seed=9)
    env = {
        "CHUNKSVC_WORKERS": "1",
        "CHUNKSVC_SYNC_COMPLETE_MAX": "1000000",
        "CHUNKSVC_ASSEMBLY_POLL": "1",
    }
    key = harness.create_api_key(pooled_url, "killed")
    with (
        FaultProxy(("127.0.0.1", bouncer.port)) as proxy,
        serving(
            make_conninfo(pooled_url, port=str(proxy.port)), spec, tmp_path, ("SIGKILL", "Worker (pid"), **env
        ) as server,
        Client(server.url, key) as client,
    ):
        session = client.create_session("big.bin", len(data), part_size=1024 * 1024)
        for number, chunk in enumerate(split(data, 1024 * 1024), start=1):
            client.put_part(session["id"], number, chunk)
        proxy.hold_after(b"SET status = 'COMPLETED'")
        assert client.complete(session["id"], sha(data), wait=False)["status"] == "COMPLETING"
        wait_for(lambda: proxy.requests_held, "the assembler to record its outcome")
        [(owner, lease_until)] = query(
            database_url,
            "SELECT completion_owner, completion_lease_until FROM upload_sessions WHERE id = %s",
            (session["id"],),
        )
        assert owner is not None
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        # Within the lease, completing again answers 202: the dead assembler still holds it.
        if not completion_lease_ran_out(database_url, session["id"]):
            assert client.complete(session["id"], wait=False)["status"] == "COMPLETING"
        done = wait_for(
            lambda: (s := client.get_session(session["id"]))["status"] == "COMPLETED" and s,
            "the new worker to take the assembly over",
        )
    assert done["object"]["sha256"] == sha(data)
    assert (spec.root / done["object"]["key"]).read_bytes() == data
    [(completed_at, new_owner)] = query(
        database_url, "SELECT updated_at, completion_owner FROM upload_sessions WHERE id = %s", (session["id"],)
    )
    assert completed_at >= lease_until, "taken over before the dead assembler's lease ran out"
    assert new_owner is None


# --- the reaper on two servers --------------------------------------------------------------------


class SlowListing(LocalStorage):
    """Local storage whose listings wait until ``release`` is set (a long sweep)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listing = threading.Event()
        self.release = threading.Event()

    def list_keys(self, prefix: str) -> Iterator[ListedKey]:
        self.listing.set()
        assert self.release.wait(60)
        yield from super().list_keys(prefix)


def two_servers(url: str) -> list[Database]:
    """Two servers' pools, through PgBouncer (whose one server connection they share)."""
    return [Database(url, max_size=3) for _ in range(2)]


def test_a_reaper_sweep_runs_once_at_a_time_across_two_servers(single, database_url, tmp_path):
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    plain = open_storage(spec)
    ghosts = [layout.part_key(uuid.uuid4()) for _ in range(6)]
    for key in ghosts:
        plain.write(key, io.BytesIO(b"stray"), 5, 4096)
    slow = SlowListing(spec.root)
    hosts = two_servers(single.url(database_url))
    settings = ReaperSettings(orphan_grace=0, lease=LEASE)
    reapers = [
        Reaper(db, storage, CompletionService(db, storage, TEST_LIMITS, 4096), settings)
        for db, storage in zip(hosts, (slow, plain), strict=True)
    ]
    try:
        first, second = ReapResult(), ReapResult()
        sweeping = threading.Thread(target=reapers[0].sweep_orphans, args=(first,))
        sweeping.start()
        assert slow.listing.wait(30)
        time.sleep(LEASE + 1)  # longer than the lease: the sweeper's renewals keep it
        reapers[1].sweep_orphans(second)  # the other server finds the sweep taken: it skips it
        assert second.orphans_removed == 0
        slow.release.set()
        sweeping.join(60)
        assert first.orphans_removed == len(ghosts)
        assert query(database_url, "SELECT count(*) FROM reaper_leases") == [(0,)]  # given back
    finally:
        slow.release.set()
        for db in hosts:
            db.close()
        plain.close()


def test_a_dead_reapers_lease_keeps_its_sweep_until_it_runs_out(pooled_url, database_url, tmp_path):
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    storage = open_storage(spec)
    storage.write(layout.part_key(uuid.uuid4()), io.BytesIO(b"stray"), 5, 4096)
    db = Database(pooled_url, max_size=2)
    try:
        query(
            database_url,
            "INSERT INTO reaper_leases VALUES ('orphans', gen_random_uuid(), clock_timestamp() + interval '2 seconds')",
        )
        reaper = Reaper(db, storage, CompletionService(db, storage, TEST_LIMITS, 4096), ReaperSettings(orphan_grace=0))
        assert reaper.run().orphans_removed == 0  # a reaper that died mid-sweep: its lease still runs
        wait_for(
            lambda: query(database_url, "SELECT bool_and(until <= clock_timestamp()) FROM reaper_leases") == [(True,)],
            "the dead reaper's lease to run out",
        )
        assert reaper.run().orphans_removed == 1
    finally:
        db.close()
        storage.close()


def test_one_periodic_pass_at_a_time_across_two_servers(single, database_url):
    hosts = two_servers(single.url(database_url))
    slow = BlockingReaper()
    first = PeriodicReaper(hosts[0], slow, 300, lease=1)  # a short lease, renewed while it runs
    quick = BlockingReaper()
    quick.finish.set()  # its passes, when it gets one, end at once
    second = PeriodicReaper(hosts[1], quick, 300, lease=1)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(first.run_once)
            assert slow.running.wait(30)
            for _ in range(3):  # across several lease lengths
                assert second.run_once() is None
                time.sleep(1)
            slow.finish.set()
            assert running.result(timeout=30) == ReapResult()
        assert second.run_once() == ReapResult()  # given back: the next turn is taken at once
    finally:
        for db in hosts:
            db.close()


def test_two_servers_own_reapers_do_each_piece_of_work_once(bouncer, pooled_url, database_url, tmp_path):
    """Two gunicorn servers of two workers each, through PgBouncer, their periodic reapers taking
    turns every second: every overdue session expired once, every orphan removed once."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    storage = open_storage(spec)
    db = Database(database_url, max_size=1)
    key = KeyManager(db).create("reaped")[0]
    db.close()
    ghosts = [layout.part_key(uuid.uuid4()) for _ in range(8)]
    two_days_ago = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    for ghost in ghosts:
        storage.write(ghost, io.BytesIO(b"stray"), 5, 4096)
        os.utime(spec.root / ghost, (two_days_ago, two_days_ago))  # past the default grace (a day)
    env = {"CHUNKSVC_WORKERS": "2", "CHUNKSVC_REAP_INTERVAL": "1"}
    with serving(pooled_url, spec, tmp_path, **env) as one, serving(pooled_url, spec, tmp_path, **env) as other:
        with Client(one.url, key) as client:
            overdue = [client.create_session("late.bin", 10)["id"] for _ in range(6)]
        query(database_url, "UPDATE upload_sessions SET expires_at = now() WHERE id = ANY(%s::uuid[])", (overdue,))

        def work(kind: str) -> float:
            total = 0.0
            for server in (one, other):
                for line in server.request("GET", "/metrics")[2].decode().splitlines():
                    if line.startswith(f'chunksvc_reaper_work_total{{kind="{kind}"}}'):
                        total += float(line.rsplit(" ", 1)[1])
            return total

        wait_for(lambda: work("expired") >= 6 and work("orphans_removed") >= 8, "the servers' reapers")
        time.sleep(3)  # more turns of four workers on two servers: none may do the work again
        assert (work("expired"), work("orphans_removed"), work("ended_bytes_removed")) == (6, 8, 6)
    storage.close()
