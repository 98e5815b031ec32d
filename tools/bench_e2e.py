"""Time to a verified object, end to end: ``make bench-e2e`` (``python -m tools.bench_e2e``).

What a user waits for, from the command to the object being there, for the same file of random
bytes, in interleaved rounds (one of each route per round, then the next round):

- ``chunksvc-cli``: ``chunksvc-client upload FILE --parallel 4`` (defaults), until ``COMPLETED``
  with the whole-file SHA-256 verified; gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL.
- ``chunksvc-lib``: ``Client.upload_file(FILE)`` (defaults) in a child process, which also times
  each request (``on_attempt``): the last part's 2xx to ``COMPLETED`` is its figure.
- ``tus`` (disk): tus-node-server (``tools/peer_tus.py`` installs it under ~/.cache) and tuspy
  from PyPI, 8 MiB PATCHes: nothing fsynced, nothing verified.
- ``cp+sync`` (disk): ``cp FILE DEST && sync DEST``, the floor for durable bytes on this disk.
- ``boto3`` (s3): ``upload_file`` straight to the same S3 server (4 threads, 8 MiB parts).

Before the first round, one small untimed upload warms the server's pools; the CLI and the
library swap places from round to round, so neither always follows the other routes' syncs.

Prints medians with min-max, the issue's ratios, and the peak RSS of the busiest worker and of
the CLI client (a fresh server per size, so the worker's figure is that size's). S3 runs on
radosgw (``tools/radosgw.py``); on moto in a child process only when Ceph is not installed, which
is printed (moto keeps every byte in RAM: keep ``--s3-sizes`` small there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from chunksvc.config import MiB, StorageSpec
from chunksvc_client import Client
from tools import harness, measure, peer_tus, radosgw, tus_js
from tools.bench_large import worker_peak_mib, write_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Client.upload_file with its defaults; prints when the last part's 2xx came and when it ended.
_LIBRARY = """
import json, sys, time
from chunksvc_client import Client
url, key, path = sys.argv[1:4]
last_part = []
def seen(attempt):
    if attempt.method == "PUT" and 200 <= attempt.status < 300:
        last_part.append(time.monotonic())
with Client(url, key, on_attempt=seen) as client:
    started = time.monotonic()
    session = client.upload_file(path)
    ended = time.monotonic()
assert session["status"] == "COMPLETED", session
print(json.dumps({"total": ended - started, "tail": ended - max(last_part), "sha256": session["object"]["sha256"]}))
"""

_TUS = """
import sys
from tusclient import client
# tuspy sends an empty Upload-Metadata without metadata, which tus-node-server refuses (400).
uploader = client.TusClient(sys.argv[1] + "/files").uploader(
    sys.argv[2], chunk_size=8 * 1024 * 1024, metadata={"filename": "source.bin"}
)
uploader.upload()
"""

_BOTO3 = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
endpoint, access, secret, bucket, path = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                  region_name="us-east-1")
config = TransferConfig(multipart_chunksize=8 * 1024 * 1024, max_concurrency=4)
s3.upload_file(path, bucket, "boto3-peer/object", Config=config)
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``argv``; its wall time, its peak RSS in KiB (wait4), and its stdout."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.returncode != 0:
            raise RuntimeError(f"{argv[:3]} failed ({process.returncode}): {stderr[-2000:]}")
        out.seek(0)
        return elapsed, usage.ru_maxrss, out.read()


def spread(values: list[float]) -> str:
    low, median, high = measure.spread(values)
    return f"{median:.2f} s ({low:.2f}-{high:.2f})"


class Routes:
    """One size's routes on one backend, each a callable that uploads the file once."""

    def __init__(self, path: Path, work: Path) -> None:
        self.path = path
        self.work = work
        self.times: dict[str, list[float]] = {}
        self.client_kib: list[int] = []
        self.tails: list[float] = []
        self.worker_mib = 0.0

    def record(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def warm_up(self, server: harness.Server, key: str, clean: Callable[[], None]) -> None:
        """One small upload, not timed: a server that has just started opens its database pools
        and imports lazily on its first requests, which a long-running service has long done."""
        small = self.work / "warm-up.bin"
        write_file(small, 16 * MiB)
        env = {"CHUNKSVC_URL": server.url, "CHUNKSVC_API_KEY": key}
        timed([str(BIN / "chunksvc-client"), "upload", str(small), "--quiet"], env)
        small.unlink()
        clean()

    def chunksvc(self, server: harness.Server, key: str, clean: Callable[[], None]) -> None:
        # The CLI and the library swap places from round to round: whichever runs first in a round
        # follows the other routes' deletes and syncs, which would otherwise always tax the same one.
        routes = [self._cli, self._library]
        for route in routes if len(self.tails) % 2 == 0 else reversed(routes):
            # A fresh mtime each time: the client would otherwise find the last run's session COMPLETED.
            os.utime(self.path)
            route(server, key)
            clean()

    def _cli(self, server: harness.Server, key: str) -> None:
        env = {"CHUNKSVC_URL": server.url, "CHUNKSVC_API_KEY": key}
        seconds, kib, _ = timed([str(BIN / "chunksvc-client"), "upload", str(self.path), "--quiet"], env)
        self.record("chunksvc-cli", seconds)
        self.client_kib.append(kib)

    def _library(self, server: harness.Server, key: str) -> None:
        _, _, out = timed([sys.executable, "-c", _LIBRARY, server.url, key, str(self.path)])
        answer = json.loads(out)
        self.record("chunksvc-lib", answer["total"])
        self.tails.append(answer["tail"])


def empty(directory: Path) -> Callable[[], None]:
    """Removes everything under ``directory`` (the bench's own storage): rounds of 10 GiB add up."""

    def clean() -> None:
        for entry in directory.iterdir():
            if entry.is_dir() and entry.name != ".incoming":
                shutil.rmtree(entry, ignore_errors=True)
        os.sync()

    return clean


def tus_js_upload(directory: Path, path: Path, options: dict[str, object]) -> str:
    return tus_js.upload(directory, path, options, timeout=600)


def wait_completed(server: harness.Server, key: str, session_id: str, timeout: float = 600) -> None:
    """Poll the session (every 10 ms: the poll is not what is measured) until COMPLETED."""
    deadline = time.monotonic() + timeout
    with Client(server.url, key) as client:
        while (status := client.get_session(session_id)["status"]) != "COMPLETED":
            if status in ("FAILED", "ABORTED", "EXPIRED") or time.monotonic() > deadline:
                raise RuntimeError(f"tus upload {session_id} ended {status}, not COMPLETED")
            time.sleep(0.01)


def disk_rounds(
    url: str,
    key: str,
    size: int,
    rounds: int,
    work: Path,
    tus: peer_tus.Installation | None,
    tus_js: Path | None = None,
) -> Routes:
    routes = Routes(work / "source.bin", work)
    write_file(routes.path, size)
    storage = work / "storage"
    env = {"CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_ACCESS_LOG": ""}
    spec = StorageSpec(kind="file", root=storage)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(harness.gunicorn(url, spec, env=env, cwd=ROOT, unset=["PROMETHEUS_MULTIPROC_DIR"]))
        tus_server = stack.enter_context(peer_tus.serve(tus, work / "tus")) if tus else None
        routes.warm_up(server, key, empty(storage))
        os.sync()
        for _ in range(rounds):
            routes.chunksvc(server, key, empty(storage))
            if tus_server is not None:
                routes.record("tus", timed([sys.executable, "-c", _TUS, tus_server.url, str(routes.path)])[0])
                shutil.rmtree(work / "tus", ignore_errors=True)
                (work / "tus").mkdir()
                os.sync()
            if tus_js is not None:
                # The same tus client against both servers: chunksvc's /tus/ (durable, verified) and
                # tus-node-server's file store.
                options = {"chunkSize": 8 * MiB, "metadata": {"filename": "source.bin"}}
                started = time.monotonic()
                url = tus_js_upload(
                    tus_js,
                    routes.path,
                    {**options, "endpoint": f"{server.url}/tus/", "headers": {"Authorization": f"Bearer {key}"}},
                )
                # Until the object is verified, as for the native routes: tus-js-client is done at
                # the last PATCH's 204, and the upload completes in the background after it.
                sent = time.monotonic()
                wait_completed(server, key, url.rsplit("/", 1)[1])
                routes.record("tus-js>chunksvc", time.monotonic() - started)
                routes.record("tus-js: last 204 -> COMPLETED", time.monotonic() - sent)
                empty(storage)()
                if tus_server is not None:
                    started = time.monotonic()
                    tus_js_upload(tus_js, routes.path, {**options, "endpoint": f"{tus_server.url}/files"})
                    routes.record("tus-js>tus-node", time.monotonic() - started)
                    shutil.rmtree(work / "tus", ignore_errors=True)
                    (work / "tus").mkdir()
                    os.sync()
            dest = work / "copy.bin"
            routes.record("cp+sync", timed(["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(routes.path), str(dest)])[0])
            dest.unlink()
            os.sync()
        routes.worker_mib = worker_peak_mib(server)
    routes.path.unlink()
    return routes


def s3_rounds(url: str, key: str, size: int, rounds: int, work: Path) -> Routes:
    routes = Routes(work / "source.bin", work)
    write_file(routes.path, size)
    env = {"CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_ACCESS_LOG": ""}
    with radosgw.bench_s3() as (endpoint, server_name):
        print(f"S3 server: {server_name}")
        spec = harness.s3_spec(endpoint)
        with harness.gunicorn(url, spec, env=env, cwd=ROOT, unset=["PROMETHEUS_MULTIPROC_DIR"]) as server:

            def clean() -> None:
                harness.empty_bucket(spec)
                radosgw.free_deleted(endpoint)

            routes.warm_up(server, key, clean)
            for _ in range(rounds):
                routes.chunksvc(server, key, clean)
                argv = [
                    sys.executable,
                    "-c",
                    _BOTO3,
                    f"http://{endpoint}",
                    spec.access_key or "",
                    spec.secret_key or "",
                ]
                routes.record("boto3", timed([*argv, spec.bucket or "", str(routes.path)])[0])
                clean()
            routes.worker_mib = worker_peak_mib(server)
    routes.path.unlink()
    return routes


def ratio(routes: Routes, top: str, bottom: str) -> str:
    if top not in routes.times or bottom not in routes.times:
        return "n/a"
    pairs = [a / b for a, b in zip(routes.times[top], routes.times[bottom], strict=True)]
    return measure.fmt_spread(pairs)


def report(backend: str, size: int, routes: Routes) -> None:
    print(f"\n{backend}, {size // MiB} MiB, {len(routes.tails)} interleaved rounds")
    for name, values in routes.times.items():
        print(f"  {name:<16} {spread(values)}")
    print(f"  last part's 2xx -> COMPLETED (library): {spread(routes.tails)}")
    if backend == "file":
        print(f"  tus / chunksvc-cli (goal >= 1.5): {ratio(routes, 'tus', 'chunksvc-cli')}")
        print(f"  chunksvc-cli / cp+sync (goal <= 3): {ratio(routes, 'chunksvc-cli', 'cp+sync')}")
        if "tus-js>chunksvc" in routes.times:
            print(f"  tus-js-client, chunksvc / tus-node-server: {ratio(routes, 'tus-js>chunksvc', 'tus-js>tus-node')}")
    else:
        print(f"  chunksvc-cli / boto3 (goal <= 1.3): {ratio(routes, 'chunksvc-cli', 'boto3')}")
    print(f"  peak RSS: busiest worker {routes.worker_mib:.0f} MiB, CLI client {max(routes.client_kib) / 1024:.0f} MiB")


def sizes(text: str) -> list[int]:
    return [int(float(item) * MiB) for item in text.split(",") if item.strip()]


@contextlib.contextmanager
def tus_peer(wanted: bool) -> Iterator[peer_tus.Installation | None]:
    if not wanted:
        yield None
        return
    try:
        yield peer_tus.prepare()
    except peer_tus.PeerUnavailable as exc:
        print(f"tus peer skipped: {exc}", file=sys.stderr)
        yield None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="file", help="comma-separated: file, s3 (default file)")
    parser.add_argument("--sizes", default="256,1024", help="MiB on disk, comma-separated (default 256,1024)")
    parser.add_argument("--large", action="store_true", help="add 4 GiB and 10 GiB on disk")
    parser.add_argument("--s3-sizes", default="256,1024", help="MiB on S3 (default 256,1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-tus", action="store_true", help="leave out tus-node-server")
    parser.add_argument("--file-root", type=Path, help="where files and storage go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    disk_sizes = sizes(args.sizes) + ([4096 * MiB, 10240 * MiB] if args.large else [])
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with (
        tempfile.TemporaryDirectory(prefix="chunksvc-e2e-", dir=args.file_root) as tmp,
        tus_peer(not args.no_tus and "file" in backends) as tus,
    ):
        work = Path(tmp)
        tus_js_client = None
        if not args.no_tus and "file" in backends:
            try:
                tus_js_client = tus_js.prepare()
            except peer_tus.PeerUnavailable as exc:
                print(f"tus-js-client skipped: {exc}", file=sys.stderr)
        with harness.embedded_database(work / "db") as url:
            key = harness.create_api_key(url, "e2e")
            if "file" in backends:
                for size in disk_sizes:
                    report("file", size, disk_rounds(url, key, size, args.rounds, work, tus, tus_js_client))
            if "s3" in backends:
                for size in sizes(args.s3_sizes):
                    report("s3", size, s3_rounds(url, key, size, args.rounds, work))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
