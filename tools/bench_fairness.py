"""Does one client at its rate limit slow another? ``python -m tools.bench_fairness``.

Two gunicorn servers ("hosts", as ops start them) on one embedded PostgreSQL and one storage
directory. Client ``flood`` has a rate limit (``--rate``, bursts of ``--burst``, set as an
operator's override) and sends ``GET /uploads/limits`` from threads on both hosts at ``--flood``
times that rate. Client ``victim`` has no limit and meanwhile uploads 8 MiB parts (create, 4
parts, abort: the disk stays empty) on one connection. Each round measures the victim alone,
then with the flood; prints the medians (min-max) of:

- the victim's MB/s and part p99 with the flood, as ratios to without (goals >= 0.9 and <= 1.5);
- the flood's admitted requests against the limit's allowance (burst + rate x seconds; within 20%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from chunksvc import dao
from chunksvc.config import StorageSpec
from chunksvc.db import Database
from tools import harness, measure
from tools.client import ApiError, Client

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
PART = 8 * MiB
PARTS = 4
FLOOD_THREADS = 8  # half on each host


def victim(url: str, key: str, seconds: float, data: bytes) -> tuple[float, list[float]]:
    """Upload for ``seconds``: (MB/s, every part's seconds)."""
    client = Client(url, key)
    latencies: list[float] = []
    sent = 0
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            session = client.create_session(PART * PARTS, PART)
            for number in range(1, PARTS + 1):
                begun = time.perf_counter()
                client.put_part(session, number, data)
                latencies.append(time.perf_counter() - begun)
                sent += PART
            client.abort(session)
    finally:
        client.close()
    return sent / (time.perf_counter() - started) / 1e6, latencies


def flood(urls: list[str], key: str, per_thread: float, stop: threading.Event, counts: dict[int, int]) -> None:
    """Each thread paces ``GET /uploads/limits`` at ``per_thread`` a second until ``stop``."""
    lock = threading.Lock()

    def send(url: str) -> None:
        client = Client(url, key)
        started = time.perf_counter()
        sent = 0
        try:
            while not stop.is_set():
                try:
                    client.request("GET", "/uploads/limits")
                    status = 200
                except ApiError as exc:
                    status = exc.status
                with lock:
                    counts[status] = counts.get(status, 0) + 1
                sent += 1
                ahead = sent / per_thread - (time.perf_counter() - started)
                if ahead > 0:
                    stop.wait(ahead)
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(urls[n % len(urls)],)) for n in range(FLOOD_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase (default 8)")
    parser.add_argument("--rate", type=float, default=20.0, help="the flooding client's limit (default 20/s)")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--flood", type=float, default=10.0, help="the flood, times its limit (default 10)")
    args = parser.parse_args(argv)
    env = {"CHUNKSVC_ACCESS_LOG": "", "CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_WORKERS": "2"}
    data = os.urandom(PART)
    ratios_mbs: list[float] = []
    ratios_p99: list[float] = []
    accepted: list[float] = []
    with tempfile.TemporaryDirectory(prefix="chunksvc-fairness-") as tmp:
        work = Path(tmp)
        with harness.embedded_database(work / "db") as url:
            victim_key = harness.create_api_key(url, "victim")
            flood_key = harness.create_api_key(url, "flood")
            db = Database(url, min_size=1, max_size=1)
            with db.connection() as conn:
                dao.set_client_limits(conn, "flood", None, None, args.rate, args.burst)
            db.close()
            spec = StorageSpec(kind="file", root=work / "storage")
            with (
                harness.gunicorn(url, spec, env=env, cwd=ROOT) as one,
                harness.gunicorn(url, spec, env=env, cwd=ROOT) as two,
            ):
                urls = [f"http://127.0.0.1:{one.port}", f"http://127.0.0.1:{two.port}"]
                for round_number in range(1, args.rounds + 1):
                    alone_mbs, alone = victim(urls[0], victim_key, args.seconds, data)
                    time.sleep(1 + args.burst / args.rate)  # the flood's bucket refills to its burst
                    stop = threading.Event()
                    counts: dict[int, int] = {}
                    per_thread = args.rate * args.flood / FLOOD_THREADS
                    flooding = threading.Thread(target=flood, args=(urls, flood_key, per_thread, stop, counts))
                    began = time.perf_counter()
                    flooding.start()
                    shared_mbs, shared = victim(urls[0], victim_key, args.seconds, data)
                    stop.set()
                    flooding.join()
                    elapsed = time.perf_counter() - began
                    allowance = args.burst + args.rate * elapsed
                    ratios_mbs.append(shared_mbs / alone_mbs)
                    ratios_p99.append(measure.percentile(shared, 0.99) / measure.percentile(alone, 0.99))
                    accepted.append(counts.get(200, 0) / allowance)
                    admitted, refused = counts.get(200, 0), counts.get(429, 0)
                    print(
                        f"round {round_number}: victim {alone_mbs:.0f} -> {shared_mbs:.0f} MB/s, part p99"
                        f" {measure.percentile(alone, 0.99) * 1000:.0f} ->"
                        f" {measure.percentile(shared, 0.99) * 1000:.0f} ms; flood sent {sum(counts.values())}"
                        f" in {elapsed:.1f} s, admitted {admitted} (allowance {allowance:.0f}), refused {refused},"
                        f" other {sum(counts.values()) - admitted - refused}"
                    )

    def show(name: str, values: list[float], goal: str) -> None:
        low, middle, high = measure.spread(values)
        print(f"{name:<44} {middle:5.2f}  ({low:.2f}-{high:.2f})  goal {goal}")

    print(
        f"\nflood: {args.flood:g}x a limit of {args.rate:g}/s (burst {args.burst}) from 2 hosts; {args.rounds} rounds"
    )
    show("victim throughput, flood / alone", ratios_mbs, ">= 0.9")
    show("victim part p99, flood / alone", ratios_p99, "<= 1.5")
    show("flood admitted / allowance", accepted, "0.8-1.2")
    print(f"load average after: {os.getloadavg()[0]:.2f}; median victim ratios {statistics.median(ratios_mbs):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
