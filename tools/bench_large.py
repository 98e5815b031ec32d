"""Large uploads end to end: ``make bench-large`` (``python -m tools.bench_large``).

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL), writes a
file of ``--size`` GiB, and uploads it with the client (``chunksvc_client.upload_file``, 8 MiB
parts, ``--parallel`` at once) in a child process, so that the client's peak RSS is its own. Above
``CHUNKSVC_SYNC_COMPLETE_MAX`` the completion is assembled in the background (202), and the
client waits until it is ``COMPLETED``. Prints the upload MiB/s, the time from the last part's 2xx
to ``COMPLETED``, the assembly MiB/s, the peak RSS of the busiest worker and of the client, and
what that assembly rate means for 100 GiB and 5 TiB. Once per ``--backends`` entry: disk (a
directory under ``--file-root``) and S3 (radosgw, ``tools/radosgw.py``, on a sparse file under the
system's temporary directory; moto in a child process if Ceph is not installed: it holds every
byte in memory, so keep ``--s3-size`` well inside RAM there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from chunksvc.config import GiB, MiB, StorageSpec
from tools import harness, radosgw

ROOT = Path(__file__).resolve().parents[1]

# The client's side, in its own process: upload, time the phases, report its own peak RSS.
_CLIENT = """
import json, sys, time
from chunksvc_client import Client

# The last part's 2xx ends the upload phase; complete waits for the verified object on the server
# (Prefer: wait), so no 202 marks the hand-over any more.
last_part = []
def seen(attempt):
    if attempt.method == "PUT" and 200 <= attempt.status < 300:
        last_part.append(time.monotonic())

url, key, path, parallel = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with Client(url, key, timeout=600, on_attempt=seen) as client:
    started = time.monotonic()
    session = client.upload_file(path, part_size=8 * 1024 * 1024, parallel=parallel)
    ended = time.monotonic()
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"started": started, "accepted": max(last_part), "ended": ended,
                  "status": session["status"], "sha256": session["object"]["sha256"], "client_kib": peak}))
"""


def write_file(path: Path, size: int) -> None:
    """``size`` bytes that do not repeat within a part (a part-sized pattern would)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for index in range(size // MiB):
            f.write(index.to_bytes(8, "big") + block[8:])


def worker_peak_mib(server: harness.Server) -> float:
    peaks = []
    for pid in server.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=0.0)


def assembly_seconds(server: harness.Server) -> float:
    """The server's own measure of its assembly (the histogram's sum): the client's view includes
    its polling interval."""
    _, _, body = server.request("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith('chunksvc_assembly_duration_seconds_sum{outcome="completed"}'):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("the server reported no completed assembly")


@dataclasses.dataclass(frozen=True)
class LargeResult:
    backend: str
    size_gib: float
    upload_mib_s: float
    complete_s: float  # the last part's 2xx to COMPLETED
    assembly_mib_s: float
    worker_peak_mib: float
    client_peak_mib: float


def run(backend: str, spec: StorageSpec, url: str, key: str, size: int, parallel: int, work: Path) -> LargeResult:
    path = work / f"large-{backend}.bin"
    write_file(path, size)
    os.sync()  # the source file's own write-back must not compete with the service's writes
    env = {"CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_ACCESS_LOG": ""}
    try:
        with harness.gunicorn(url, spec, env=env, cwd=ROOT, unset=["PROMETHEUS_MULTIPROC_DIR"]) as server:
            answer = subprocess.run(
                [sys.executable, "-c", _CLIENT, server.url, key, str(path), str(parallel)],
                capture_output=True,
                text=True,
                check=True,
            )
            timing = json.loads(answer.stdout)
            worker_mib = worker_peak_mib(server)
            assembly_s = assembly_seconds(server)
    finally:
        path.unlink()
    assert timing["status"] == "COMPLETED"
    accepted = timing["accepted"]  # the last part's 2xx
    upload_s = accepted - timing["started"]
    complete_s = timing["ended"] - accepted
    return LargeResult(
        backend=backend,
        size_gib=size / GiB,
        upload_mib_s=size / MiB / upload_s,
        complete_s=complete_s,
        assembly_mib_s=size / MiB / assembly_s,
        worker_peak_mib=worker_mib,
        client_peak_mib=timing["client_kib"] / 1024,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="file", help="comma-separated: file, s3 (default file)")
    parser.add_argument("--size", type=float, default=10, help="GiB on disk (default 10)")
    parser.add_argument("--s3-size", type=float, default=1, help="GiB on S3 (default 1)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--file-root", type=Path, help="where the file and the disk storage go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="chunksvc-large-", dir=args.file_root) as tmp:
        work = Path(tmp)
        with harness.embedded_database(work / "db") as url:
            key = harness.create_api_key(url, "large")
            for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
                if backend == "file":
                    spec = StorageSpec(kind="file", root=work / "storage")
                    results.append(run(backend, spec, url, key, int(args.size * GiB), args.parallel, work))
                else:
                    with radosgw.bench_s3() as (endpoint, _server):
                        spec = harness.s3_spec(endpoint)
                        results.append(run(backend, spec, url, key, int(args.s3_size * GiB), args.parallel, work))
    for result in results:
        print(f"{result.backend}: {result.size_gib:.1f} GiB, parallel {args.parallel}")
        print(f"  upload {result.upload_mib_s:.0f} MiB/s; last part's 2xx to COMPLETED {result.complete_s:.2f} s")
        rate = result.assembly_mib_s
        print(
            f"  assembly (assemble, verify, fsync) {rate:.0f} MiB/s: 100 GiB in {100 * 1024 / rate / 60:.1f} min,"
            f" 5 TiB in {5 * 1024 * 1024 / rate / 3600:.1f} h"
        )
        print(f"  peak RSS: busiest worker {result.worker_peak_mib:.0f} MiB, client {result.client_peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
