"""The same parallel upload direct and through the shipped nginx: ``make bench-proxy``.

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL, disk
storage) with ``deploy/nginx/`` in front (``tools.nginx``), then uploads one file with the
client (``upload_file``, ``--parallel`` parts at once, in a child process so it does not share our
GIL) directly to gunicorn, through nginx over HTTP and over TLS, in interleaved rounds. Timed from
the first request to the completion's 202 (assembly runs in the background and is not the proxy's
business). Prints MiB/s per route (median and range) and each route's median as a ratio to direct. CPU time of
nginx's processes is printed too: what the proxy itself costs per GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
print(json.dumps({"seconds": timing.accepted - started, "status": session["status"]}))
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
            with nginx.nginx(
                work / "nginx", server.port, max_part_size=5 * GiB, worker_processes=args.nginx_workers
            ) as proxy:
                routes = {"direct": server.url, "nginx http": proxy.http_url, "nginx tls": proxy.tls_url}
                rates: dict[str, list[float]] = {name: [] for name in routes}
                nginx_cpu: dict[str, float] = {name: 0.0 for name in routes}
                for round_number in range(1, args.rounds + 1):
                    for name, route_url in routes.items():
                        before = cpu_seconds(proxy.process.pid)
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
                        nginx_cpu[name] += cpu_seconds(proxy.process.pid) - before
                        outcome = json.loads(result.stdout)
                        assert outcome["status"] == "COMPLETED", outcome
                        rate = args.size / outcome["seconds"]
                        rates[name].append(rate)
                        print(f"round {round_number} {name:<10} {rate:7.1f} MiB/s", file=sys.stderr, flush=True)

            if args.storage_root:
                shutil.rmtree(storage_root, ignore_errors=True)

    direct = statistics.median(rates["direct"])
    uploaded_gib = args.size * args.rounds / 1024
    print(
        f"{args.size} MiB, {args.part_size} MiB parts, {args.parallel} in parallel, {args.rounds} rounds,"
        f" storage under {args.storage_root or 'the temporary directory'}"
    )
    print(f"{'route':<11} {'median MiB/s':>12} {'range':>15} {'vs direct':>10} {'nginx CPU-s/GiB':>16}")
    for name, values in rates.items():
        median = statistics.median(values)
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name:<11} {median:12.1f} {spread:>15} {median / direct:10.2f} {nginx_cpu[name] / uploaded_gib:16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
