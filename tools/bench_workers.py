"""Which gunicorn worker class and counts serve large parts best: ``python -m tools.bench_workers``.

Starts gunicorn exactly as ops do (``gunicorn.conf.py``, ``chunksvc.wsgi:app``) through
``tools.harness``, on an embedded PostgreSQL and disk storage, once per configuration, and has N
concurrent clients each PUT 8 MiB parts over keep-alive while a prober times ``GET /healthz``
(what a load balancer or a small request sees while the big bodies stream), first at full speed,
then as slow clients (paced bodies, as over a WAN without a buffering proxy). Prints medians over
rounds with min-max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from chunksvc.config import StorageSpec
from tools import harness, measure
from tools.client import Client

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

CONFIGS = [
    ("sync", 3, 1),
    ("sync", 5, 1),
    ("gthread", 3, 4),
    ("gthread", 2, 8),
    ("gthread", 5, 2),
    ("gthread", 3, 8),
]


def server_env(worker_class: str, workers: int, threads: int) -> dict[str, str]:
    """The CHUNKSVC_* settings of one configuration (quiet logs: the figures are the output)."""
    return {
        "CHUNKSVC_WORKER_CLASS": worker_class,
        "CHUNKSVC_WORKERS": str(workers),
        "CHUNKSVC_THREADS": str(threads),
        "CHUNKSVC_ACCESS_LOG": "",
        "CHUNKSVC_LOG_LEVEL": "warning",
    }


def paced(data: bytes, rate: float, chunk: int = 256 * 1024) -> Iterator[memoryview]:
    """``data`` in chunks, at ``rate`` bytes per second."""
    started = time.perf_counter()
    view = memoryview(data)
    for offset in range(0, len(data), chunk):
        yield view[offset : offset + chunk]
        ahead = (offset + chunk) / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)


def upload(port: int, key: str, part: bytes, parts: int, latencies: list[float], rate: float | None) -> None:
    # The benchmark's minimal client (no retries, no hashing): the server's figures are the server's.
    client = Client(f"http://127.0.0.1:{port}", key)
    try:
        session = client.create_session(len(part) * parts, len(part))
        for number in range(1, parts + 1):
            started = time.perf_counter()
            if rate is None:
                client.put_part(session, number, part)
            else:
                client.request(
                    "PUT",
                    f"/uploads/sessions/{session}/parts/{number}",
                    paced(part, rate),
                    {"Content-Length": str(len(part))},
                )
            latencies.append(time.perf_counter() - started)
        client.abort(session)  # removes the stored parts, so a long run does not fill the disk
    finally:
        client.close()


def probe(port: int, key: str, stop: threading.Event, latencies: list[float]) -> None:
    """``GET /healthz`` on a fresh connection each time, as a load balancer probes."""
    while not stop.is_set():
        started = time.perf_counter()
        client = Client(f"http://127.0.0.1:{port}", key)
        try:
            client.healthz()
        finally:
            client.close()
        latencies.append(time.perf_counter() - started)
        stop.wait(0.02)


def one_round(port: int, key: str, part: bytes, clients: int, parts: int, rate: float | None) -> dict[str, float]:
    part_latencies: list[float] = []
    probe_latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(port, key, stop, probe_latencies))
    threads = [
        threading.Thread(target=upload, args=(port, key, part, parts, part_latencies, rate)) for _ in range(clients)
    ]
    started = time.perf_counter()
    prober.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    stop.set()
    prober.join()
    return {
        "mb_s": clients * parts * len(part) / elapsed / 1e6,
        "part_p50": statistics.median(part_latencies),
        "part_max": max(part_latencies),
        "healthz_p50": statistics.median(probe_latencies) * 1000,
        "healthz_max": max(probe_latencies) * 1000,
    }


def spread(values: list[float], fmt: str) -> str:
    return measure.fmt_spread(values, lambda v: format(v, fmt))


def worker_config(raw: str) -> tuple[str, int, int]:
    worker_class, workers, threads = raw.split(":")
    return worker_class, int(workers), int(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--parts", type=int, default=4, help="8 MiB parts per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-clients", type=int, default=6, help="clients in the paced scenario (0: skip it)")
    parser.add_argument("--slow-rate", type=float, default=8.0, help="MB/s per paced client")
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=worker_config,
        metavar="CLASS:WORKERS:THREADS",
        help="a gunicorn configuration to measure (repeatable; default: a set of sync and gthread ones)",
    )
    args = parser.parse_args(argv)

    part = os.urandom(8 * MiB)
    print(f"{os.cpu_count()} CPUs; {args.rounds} rounds of {args.parts} x 8 MiB parts per client; median (min-max)")
    scenarios: list[tuple[int, float | None]] = [(clients, None) for clients in args.clients]
    if args.slow_clients:
        scenarios.append((args.slow_clients, args.slow_rate * 1e6))
    print(
        f"{'worker':<8} {'w':>2} {'t':>2} {'clients':>9}  {'MB/s':<18} {'part p50 s':<18} "
        f"{'part max s':<18} {'healthz p50 ms':<20} {'healthz max ms':<20}"
    )
    with (
        tempfile.TemporaryDirectory(prefix="chunksvc-bench-workers-") as tmp,
        harness.embedded_database(Path(tmp)) as url,
    ):
        key = harness.create_api_key(url, "bench")
        storage = StorageSpec(kind="file", root=Path(tmp) / "storage")
        for worker_class, workers, threads in args.configs or CONFIGS:
            with harness.gunicorn(
                url,
                storage,
                config=ROOT / "gunicorn.conf.py",
                cwd=ROOT,
                env=server_env(worker_class, workers, threads),
                # each master gets a metrics directory of its own (gunicorn.conf.py's default)
                unset=("PROMETHEUS_MULTIPROC_DIR",),
            ) as server:
                port = server.port
                for clients, rate in scenarios:
                    one_round(port, key, part, clients, 1, None)  # warm-up: pools open, pages cached
                    rounds = [one_round(port, key, part, clients, args.parts, rate) for _ in range(args.rounds)]
                    column = {name: [r[name] for r in rounds] for name in rounds[0]}
                    print(
                        f"{worker_class:<8} {workers:>2} {threads:>2} {clients:>4}{' slow' if rate else '':<5}  "
                        f"{spread(column['mb_s'], '.0f'):<18} {spread(column['part_p50'], '.2f'):<18} "
                        f"{spread(column['part_max'], '.2f'):<18} {spread(column['healthz_p50'], '.1f'):<20} "
                        f"{spread(column['healthz_max'], '.0f'):<20}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
