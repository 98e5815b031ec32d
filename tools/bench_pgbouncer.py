"""PostgreSQL connections with several chunksvc hosts, direct and through PgBouncer:
``python -m tools.bench_pgbouncer`` (issue 13, "Scale-out without a connection wall").

``connections`` (the figure): an embedded PostgreSQL, then for each mode, direct and through the
distribution's PgBouncer in transaction pooling mode (``tools/pgbouncer.py``, ``--pool`` server
connections), ``--hosts`` gunicorn servers of ``--workers`` workers each (as ops run them, with
their default pools of ``CHUNKSVC_DB_POOL_MAX`` connections) on a fresh database and disk storage,
and ``--clients`` threads that each upload, again and again for ``--seconds``, ``--parts`` parts of
``--part-size`` bytes (create, PUT each part, complete) to the hosts in turn. Meanwhile
``pg_stat_activity`` is sampled every 0.1 s: the connections PostgreSQL has to the database,
before the load (idle) and during it (median and max). Also printed: what the load got done
(uploads and parts per second, p99 seconds per part), and in PgBouncer mode the most client
connections PgBouncer held (what the hosts opened: the same as the direct figure, but to
PgBouncer).

``prepared``: the part path's two statements (``authenticate`` and ``record_part``, one each per
part, on one pooled connection as a request runs them) with psycopg's server-side prepared
statements (``prepare_threshold`` 5, psycopg's default: what chunksvc gave up to run behind
PgBouncer 1.18) and without (None, chunksvc's default now), in interleaved rounds: microseconds
per part of wall time, and of the PostgreSQL backend's CPU (utime+stime from /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from chunksvc import dao, embedded, migrations
from chunksvc.config import StorageSpec
from chunksvc.db import Database
from tools import harness, measure
from tools import pgbouncer as bouncer_tool
from tools.client import Client

ROOT = Path(__file__).resolve().parents[1]


def connections_to(admin_url: str, database: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
    assert row is not None
    return int(row[0])


class Sampler:
    """Samples PostgreSQL's connections to one database (and PgBouncer's clients) every 0.1 s."""

    def __init__(self, admin_url: str, database: str, bouncer: bouncer_tool.PgBouncer | None) -> None:
        self._admin_url = admin_url
        self._database = database
        self._bouncer = bouncer
        self.server: list[int] = []
        self.clients: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self._admin_url, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self._database,)
                ).fetchone()
                assert row is not None
                self.server.append(int(row[0]))
                if self._bouncer is not None:
                    self.clients.append(
                        sum(1 for client in self._bouncer.show("CLIENTS") if client["database"] == self._database)
                    )


def load(urls: list[str], key: str, clients: int, seconds: float, parts: int, part_size: int) -> dict[str, float]:
    """``clients`` threads uploading to ``urls`` in turn for ``seconds``: uploads/s, parts/s, p99 s per part."""
    data = os.urandom(part_size)
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    uploads = 0
    latencies: list[float] = []
    errors: list[BaseException] = []

    def client(index: int) -> None:
        nonlocal uploads
        connections = [Client(url, key) for url in urls]
        mine: list[float] = []
        done = 0
        try:
            turn = index
            while time.monotonic() < deadline:
                http = connections[turn % len(connections)]
                turn += 1
                session_id = http.create_session(parts * part_size, part_size)
                for number in range(1, parts + 1):
                    started = time.perf_counter()
                    http.put_part(session_id, number, data)
                    mine.append(time.perf_counter() - started)
                http.complete(session_id)
                done += 1
        except BaseException as exc:  # reported after the others stop
            errors.append(exc)
        finally:
            for http in connections:
                http.close()
            with lock:
                uploads += done
                latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed; the first: {errors[0]!r}")
    latencies.sort()
    return {
        "uploads_per_s": uploads / elapsed,
        "parts_per_s": len(latencies) / elapsed,
        "p99_part_s": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


@contextlib.contextmanager
def hosts(url: str, count: int, workers: int, storage: Path, work: Path) -> Iterator[list[harness.Server]]:
    env = {
        "CHUNKSVC_WORKERS": str(workers),
        "CHUNKSVC_ACCESS_LOG": "",
        "CHUNKSVC_LOG_LEVEL": "warning",
        "CHUNKSVC_MIN_PART_SIZE": "1",
    }
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                harness.gunicorn(
                    url,
                    StorageSpec(kind="file", root=storage),
                    env=env,
                    cwd=ROOT,
                    stderr_path=work / f"gunicorn-{uuid.uuid4().hex[:6]}.log",
                )
            )
            for _ in range(count)
        ]
        yield servers


def connections_figure(admin_url: str, args: argparse.Namespace, work: Path) -> None:
    print(
        f"{args.hosts} hosts x {args.workers} workers (CHUNKSVC_DB_POOL_MAX {os.environ.get('CHUNKSVC_DB_POOL_MAX', 8)}"
        f" each), {args.clients} parallel uploads of {args.parts} x {args.part_size // 1024} KiB parts,"
        f" {args.seconds:.0f} s per mode; {bouncer_tool.version()} in transaction mode,"
        f" default_pool_size {args.pool}"
    )
    print(
        f"{'mode':<10} {'round':>5} {'idle conns':>10} {'load median':>11} {'load max':>8}"
        f" {'uploads/s':>9} {'parts/s':>8} {'p99 part s':>10} {'bouncer clients max':>19}"
    )
    modes = ["direct", "pgbouncer"]
    for round_ in range(1, args.rounds + 1):
        for mode in modes if round_ % 2 else reversed(modes):
            database = f"chunksvc_conns_{uuid.uuid4().hex[:8]}"
            url = embedded.ensure_database(admin_url, database)
            migrations.migrate(url)
            key = harness.create_api_key(url, "bench")
            with contextlib.ExitStack() as stack:
                bouncer = None
                served_url = url
                if mode == "pgbouncer":
                    bouncer = stack.enter_context(bouncer_tool.pgbouncer(admin_url, default_pool_size=args.pool))
                    served_url = bouncer.url(url)
                storage = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=work)))
                servers = stack.enter_context(hosts(served_url, args.hosts, args.workers, storage, work))
                time.sleep(1)  # every worker's background threads have started
                idle = connections_to(admin_url, database)
                with Sampler(admin_url, database, bouncer) as sampler:
                    got = load([s.url for s in servers], key, args.clients, args.seconds, args.parts, args.part_size)
                bouncer_clients = str(max(sampler.clients)) if sampler.clients else "-"
                print(
                    f"{mode:<10} {round_:>5} {idle:>10} {statistics.median(sampler.server):>11.0f}"
                    f" {max(sampler.server):>8} {got['uploads_per_s']:>9.1f} {got['parts_per_s']:>8.0f}"
                    f" {got['p99_part_s']:>10.3f} {bouncer_clients:>19}",
                    flush=True,
                )
            embedded.drop_database(admin_url, database)


def prepared_figure(admin_url: str, args: argparse.Namespace) -> None:
    database = f"chunksvc_prep_{uuid.uuid4().hex[:8]}"
    url = embedded.ensure_database(admin_url, database)
    migrations.migrate(url)
    key = harness.create_api_key(url, "bench")
    key_hash = hashlib.sha256(key.encode()).digest()
    count = args.prepared_parts
    print(
        f"part path statements (authenticate + record_part) per part, {count} parts per round,"
        f" {args.rounds} interleaved rounds, direct to PostgreSQL:"
    )
    results: dict[str, list[tuple[float, float]]] = {"prepared (threshold 5)": [], "not prepared (None)": []}
    thresholds = {"prepared (threshold 5)": 5, "not prepared (None)": None}
    try:
        for round_ in range(args.rounds):
            names = list(thresholds) if round_ % 2 == 0 else list(reversed(thresholds))
            for name in names:
                db = Database(url, min_size=1, max_size=1, prepare_threshold=thresholds[name])
                try:
                    with db.connection() as conn:
                        found = dao.authenticate(conn, key_hash)
                        assert found is not None
                        session = dao.insert_session(
                            conn,
                            id=uuid.uuid4(),
                            client_id=found.client_id,
                            filename="p.bin",
                            content_type="application/octet-stream",
                            size=count,
                            part_size=1,
                            total_parts=count,
                            sha256=None,
                            metadata={},
                            idempotency_key=None,
                            request_fingerprint=None,
                            ttl=3600,
                        )
                        assert session is not None
                        pid = _backend_pid(conn)
                        cpu, started = measure.cpu_seconds(pid), time.perf_counter()
                        for number in range(1, count + 1):
                            dao.authenticate(conn, key_hash, session.id)
                            dao.record_part(
                                conn, session.id, found.client_id, number, 1, "0" * 64, f"k/{session.id}/{number}"
                            )
                        wall = time.perf_counter() - started
                        cpu = measure.cpu_seconds(pid) - cpu
                finally:
                    db.close()
                results[name].append((wall / count * 1e6, cpu / count * 1e6))
        for name, rounds in results.items():
            walls, cpus = [w for w, _ in rounds], [c for _, c in rounds]
            print(
                f"  {name:<24} wall {statistics.median(walls):6.0f} us/part ({min(walls):.0f}-{max(walls):.0f}),"
                f" PostgreSQL CPU {statistics.median(cpus):5.0f} us/part ({min(cpus):.0f}-{max(cpus):.0f})"
            )
        ratio = statistics.median(w for w, _ in results["not prepared (None)"]) / statistics.median(
            w for w, _ in results["prepared (threshold 5)"]
        )
        print(f"  not prepared / prepared, wall: {ratio:.2f}")
    finally:
        embedded.drop_database(admin_url, database)


def _backend_pid(conn: object) -> int:
    """The PostgreSQL backend behind a pooled connection (psycopg's, under chunksvc's wrapper)."""
    raw = getattr(conn, "_conn")  # noqa: B009 - a private attribute, on purpose: a measuring tool
    return int(raw.info.backend_pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", default="connections,prepared", help="comma-separated: connections, prepared")
    parser.add_argument("--hosts", type=int, default=4, help="gunicorn servers (default 4)")
    parser.add_argument("--workers", type=int, default=3, help="workers per server (default 3)")
    parser.add_argument("--clients", type=int, default=16, help="parallel uploads (default 16)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of load per mode and round (default 20)")
    parser.add_argument("--parts", type=int, default=16, help="parts per upload (default 16)")
    parser.add_argument("--part-size", type=int, default=64 * 1024, help="bytes per part (default 64 KiB)")
    parser.add_argument("--pool", type=int, default=10, help="PgBouncer's default_pool_size (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per mode, interleaved (default 1)")
    parser.add_argument("--prepared-parts", type=int, default=3000, help="parts per prepared-figure round")
    args = parser.parse_args(argv)
    figures = {f.strip() for f in args.figures.split(",") if f.strip()}
    if unknown := figures - {"connections", "prepared"}:
        parser.error(f"unknown --figures: {', '.join(sorted(unknown))}")
    if "connections" in figures and bouncer_tool.pgbouncer_binary() is None:
        print("pgbouncer is not installed (apt-get install pgbouncer)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="chunksvc-bench-pgbouncer-") as tmp:
        work = Path(tmp)
        server = embedded.start(work / "pgdata", cleanup_mode="delete")
        try:
            admin_url = server.get_uri()
            print(f"PostgreSQL: {embedded.describe(admin_url)} (embedded); {os.cpu_count()} CPUs")
            if "prepared" in figures:
                prepared_figure(admin_url, args)
            if "connections" in figures:
                connections_figure(admin_url, args, work)
        finally:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
