"""The same parallel upload direct and through the shipped nginx: ``make bench-proxy``.

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL, disk
storage) with ``deploy/nginx/`` in front (``tools.nginx``), then uploads one file with the
client (``upload_file``, ``--parallel`` parts at once, in a child process so it does not share our
GIL) directly to gunicorn, through nginx over HTTP and over TLS, in interleaved rounds. Timed from
the first request to the completion's 202 (assembly runs in the background and is not the proxy's
business). Each round takes the routes in a rotated order, so none always follows the same one.

Prints MiB/s per route (median and range) and each route's ratio to direct: the median, min and max
of the rounds' own ratios (a route against direct in the same round, so a busy moment moves both).
Client, nginx and gunicorn share this machine's cores, so the CPU-seconds each spends per GiB on each
route are printed too: a route through nginx costs nginx's own CPU and, over TLS, the client's
encryption as well, both taken from the cores gunicorn would otherwise have. The share of the
machine's CPU that was busy while the parts went (all processes, from ``/proc/stat``) tells whether
the cores are the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chunksvc.config import GiB, MiB, StorageSpec
from tools import harness, nginx
from tools.bench_large import write_file

ROOT = Path(__file__).resolve().parents[1]

_CLIENT = """
import json, sys, time, uuid
from chunksvc_client import Client, NoProgress

class Timing(NoProgress):
    accepted = None
    def assembling(self, assembled, total):  # the first 202: every part is in
        if self.accepted is None:
            self.accepted = time.monotonic()

url, key, path, parallel, part_size, ca = sys.argv[1:7]
timing = Timing()
with Client(url, key, timeout=300, verify=ca if url.startswith("https") else True) as client:
    started = time.monotonic()
    # A fresh session each run (the client would otherwise resume the one the last run completed).
    session = client.upload_file(path, part_size=int(part_size), parallel=int(parallel), progress=timing,
                                 metadata={"run": uuid.uuid4().hex})
print(json.dumps({"started": started, "accepted": timing.accepted, "status": session["status"]}))
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its children's living processes (nginx: master and workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid] + [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def children_cpu_seconds() -> float:
    """utime + stime of our children that have ended and been waited for (each client run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class BusySampler:
    """The machine's busy share (all processes) between two ``time.monotonic()`` instants: ``/proc/stat``
    sampled every 20 ms in a thread (monotonic time is the same clock in the client's process)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (when, all jiffies, idle + iowait jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/stat") as f:
                fields = [int(value) for value in f.readline().split()[1:]]
            self.samples.append((time.monotonic(), sum(fields), fields[3] + fields[4]))
            self._stop.wait(0.02)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, start: float, end: float) -> float:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2 or inside[-1][1] == inside[0][1]:
            return float("nan")
        return 1 - (inside[-1][2] - inside[0][2]) / (inside[-1][1] - inside[0][1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB per upload (default 512)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--part-size", type=int, default=8, help="MiB (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nginx-workers", type=int, default=2)
    parser.add_argument(
        "--storage-root",
        type=Path,
        help="where the stored parts go (default: the temporary directory); /dev/shm takes the disk out of it",
    )
    args = parser.parse_args(argv)
    if nginx.nginx_binary() is None:
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="chunksvc-bench-proxy-") as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        write_file(source, args.size * MiB)
        storage_root = (args.storage_root / work.name) if args.storage_root else work / "storage"
        spec = StorageSpec(kind="file", root=storage_root)
        # Every completion in the background (202): the figure is the parts' transfer, from the first
        # request to the 202, not the assembly (the same whichever way the parts came).
        env = {"CHUNKSVC_ACCESS_LOG": "", "CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_SYNC_COMPLETE_MAX": "0"}
        with harness.embedded_database(work) as url, harness.gunicorn(url, spec, env=env, cwd=ROOT) as server:
            key = harness.create_api_key(url, "bench-proxy")
            with (
                nginx.nginx(
                    work / "nginx", server.port, max_part_size=5 * GiB, worker_processes=args.nginx_workers
                ) as proxy,
                BusySampler() as sampler,
            ):
                routes = {"direct": server.url, "nginx http": proxy.http_url, "nginx tls": proxy.tls_url}
                names = list(routes)
                rates: dict[str, list[float]] = {name: [] for name in routes}
                ratios: dict[str, list[float]] = {name: [] for name in routes}
                busy: dict[str, list[float]] = {name: [] for name in routes}
                cpu: dict[str, dict[str, float]] = {
                    name: {"client": 0.0, "nginx": 0.0, "gunicorn": 0.0} for name in routes
                }
                for round_number in range(1, args.rounds + 1):
                    shift = (round_number - 1) % len(names)
                    this_round: dict[str, float] = {}
                    for name in names[shift:] + names[:shift]:
                        route_url = routes[name]
                        before = (
                            children_cpu_seconds(),
                            cpu_seconds(proxy.process.pid),
                            cpu_seconds(server.process.pid),
                        )
                        result = subprocess.run(
                            [
                                sys.executable,
                                "-c",
                                _CLIENT,
                                route_url,
                                key,
                                str(source),
                                str(args.parallel),
                                str(args.part_size * MiB),
                                str(proxy.certificate),
                            ],
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        cpu[name]["client"] += children_cpu_seconds() - before[0]
                        cpu[name]["nginx"] += cpu_seconds(proxy.process.pid) - before[1]
                        cpu[name]["gunicorn"] += cpu_seconds(server.process.pid) - before[2]
                        outcome = json.loads(result.stdout)
                        assert outcome["status"] == "COMPLETED", outcome
                        rate = args.size / (outcome["accepted"] - outcome["started"])
                        rates[name].append(rate)
                        this_round[name] = rate
                        busy[name].append(sampler.busy(outcome["started"], outcome["accepted"]))
                        print(f"round {round_number} {name:<10} {rate:7.1f} MiB/s", file=sys.stderr, flush=True)
                    for name in names:
                        ratios[name].append(this_round[name] / this_round["direct"])

            if args.storage_root:
                shutil.rmtree(storage_root, ignore_errors=True)

    uploaded_gib = args.size * args.rounds / 1024
    print(
        f"{args.size} MiB, {args.part_size} MiB parts, {args.parallel} in parallel, {args.rounds} rounds,"
        f" storage under {args.storage_root or 'the temporary directory'}, nginx {args.nginx_workers} workers"
    )
    print(
        f"{'route':<11} {'MiB/s':>6} {'min-max':>9} {'vs direct':>9} {'min-max':>9} {'CPU busy':>8}"
        f"   CPU-s/GiB: {'client':>6} {'nginx':>6} {'gunicorn':>8}"
    )
    for name in names:
        ratio = ratios[name]
        print(
            f"{name:<11} {statistics.median(rates[name]):6.0f} {min(rates[name]):4.0f}-{max(rates[name]):<4.0f}"
            f" {statistics.median(ratio):9.2f} {min(ratio):4.2f}-{max(ratio):<4.2f}"
            f" {statistics.median(busy[name]):8.2f}"
            f"              {cpu[name]['client'] / uploaded_gib:6.2f} {cpu[name]['nginx'] / uploaded_gib:6.2f}"
            f" {cpu[name]['gunicorn'] / uploaded_gib:8.2f}"
        )
    print(
        "vs direct: each round's ratio (median, min-max); CPU busy: the machine's share while the parts went"
        " (median); CPU-s/GiB: each process's CPU over the whole run (the client's includes hashing the file,"
        " gunicorn's the assembly)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
