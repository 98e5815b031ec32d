"""The part path's benchmark: ``make bench`` (``python -m tools.bench``).

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL) once per
storage backend (a directory; S3 served by moto in a child process) and prints, as the median of
several rounds with min-max, figures that are ratios of two rates measured in the same round, so
a busy or slow machine moves both sides alike:

- stream: one client PUTting 8 MiB parts over keep-alive, MB/s divided by one thread's hashlib
  SHA-256 MB/s over the same bytes;
- small parts: sequential 4 KiB parts per second divided by sequential ``GET /healthz`` per second;
- concurrency: 8 and 32 clients at once, aggregate MB/s and p50/p99 seconds per part;
- memory: a worker's peak RSS growth while it takes 64 MiB parts;
- S3 path: MB/s through the service to the S3 server divided by the ``minio`` SDK's own
  ``put_object`` MB/s of the same bytes to the same server;
- client: ``chunksvc_client.upload_file`` of a file (8 MiB parts, ``parallel`` 1, 4 and 8) in
  MB/s divided by the server-side aggregate of the same upload done with the minimal client
  (``parallel`` connections PUTting the same parts from memory, then complete), alternated in
  each round; and the client CLI's peak RSS uploading a 1 GiB file at ``--parallel 4``;
- assembly (disk): ``LocalStorage.assemble`` of 8 MiB parts into one object (hashed, fsynced)
  in MB/s, divided by ``cat parts > object && sync`` of the same parts, alternated in each round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from minio import Minio

from chunksvc.config import KiB, MiB, StorageSpec
from tools import harness
from tools.client import Client

STREAM_PART = 8 * MiB
SMALL_PART = 4 * KiB
MEMORY_PART = 64 * MiB
FIGURES = ("stream", "small", "concurrency", "memory", "s3path", "client", "assembly")
CLIENT_PARALLEL = (1, 4, 8)


@dataclasses.dataclass
class Figure:
    name: str
    backend: str
    values: list[float]
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    def row(self) -> list[str]:
        median = statistics.median(self.values)
        spread = f"{_fmt(min(self.values))}-{_fmt(max(self.values))}" if len(self.values) > 1 else ""
        met = "" if self.met is None else ("yes" if self.met else "NO")
        return [self.name, self.backend, f"{_fmt(median)}{self.unit}", spread, self.target, met, self.note]


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def print_table(figures: list[Figure]) -> None:
    header = ["figure", "backend", "median", "min-max", "target", "met", "detail"]
    rows = [header, *(figure.row() for figure in figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        if index == 0:
            print("  ".join("-" * width for width in widths) + "  " + "-" * 6)


def hash_rate(data: bytes, repeat: int = 4) -> float:
    """hashlib SHA-256 MB/s of ``data`` in this thread."""
    started = time.perf_counter()
    for _ in range(repeat):
        hashlib.sha256(data).digest()
    return repeat * len(data) / (time.perf_counter() - started) / 1e6


def upload_parts(client: Client, data: bytes, count: int, latencies: list[float] | None = None) -> float:
    """PUT ``count`` parts of ``data`` into a new session; return the seconds the PUTs took."""
    session = client.create_session(len(data) * count, len(data))
    started = time.perf_counter()
    for number in range(1, count + 1):
        sent = time.perf_counter()
        client.put_part(session, number, data)
        if latencies is not None:
            latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    client.abort(session)  # frees the disk (or moto's memory) for the next round
    return elapsed


def stream(client: Client, data: bytes, rounds: int, parts: int, disk: Path | None) -> dict[str, list[float]]:
    """Per round: the ratio, the service's MB/s, SHA-256 MB/s and (given ``disk``) the disk's."""
    figures: dict[str, list[float]] = {"ratio": [], "service": [], "sha256": [], "disk": []}
    upload_parts(client, data, 2)  # warm-up: connections, page cache, code paths
    for _ in range(rounds):
        sha = hash_rate(data)
        service = parts * len(data) / upload_parts(client, data, parts) / 1e6
        figures["ratio"].append(service / sha)
        figures["service"].append(service)
        figures["sha256"].append(sha)
        if disk is not None:
            figures["disk"].append(disk_write_rate(disk, data, parts))
    return figures


def disk_write_rate(directory: Path, data: bytes, count: int) -> float:
    """MB/s of plain writes of ``data`` to new files, each fsynced, as the file backend stores parts."""
    paths = [directory / f"bench-disk-{uuid.uuid4().hex}" for _ in range(count)]
    started = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    rate = count * len(data) / (time.perf_counter() - started) / 1e6
    for path in paths:
        path.unlink()
    return rate


def small_parts(client: Client, rounds: int, count: int) -> tuple[list[float], list[float], list[float]]:
    """(ratios, parts per second, healthz per second), one value per round."""
    data = os.urandom(SMALL_PART)
    ratios, part_rates, health_rates = [], [], []
    upload_parts(client, data, 20)
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            client.healthz()
        health_rate = count / (time.perf_counter() - started)
        part_rate = count / upload_parts(client, data, count)
        ratios.append(part_rate / health_rate)
        part_rates.append(part_rate)
        health_rates.append(health_rate)
    return ratios, part_rates, health_rates


def concurrent(server_url: str, key: str, data: bytes, clients: int, parts: int, rounds: int) -> tuple[list, list]:
    """(aggregate MB/s per round, every part's latency in seconds)."""
    rates: list[float] = []
    latencies: list[float] = []
    for _ in range(rounds):
        elapsed = concurrent_round(server_url, key, data, clients, parts, latencies)
        rates.append(clients * parts * len(data) / elapsed / 1e6)
    return rates, latencies


def concurrent_round(server_url: str, key: str, data: bytes, clients: int, parts: int, latencies: list[float]) -> float:
    """``clients`` threads, each PUTting ``parts`` parts at once; the seconds until all are done."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run() -> None:
        client = Client(server_url, key)
        try:
            client.healthz()  # connected before the clock starts
            barrier.wait()
            upload_parts(client, data, parts, latencies)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: raised below
        barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def memory_growth(server: harness.Server, client: Client, rounds: int) -> list[float]:
    """MiB by which a worker's peak RSS rose above its RSS while it took one 64 MiB part, per round."""
    data = os.urandom(MEMORY_PART)
    growth = []
    upload_parts(client, os.urandom(SMALL_PART), 2)  # the serving worker has loaded everything
    for _ in range(rounds):
        baseline = {}
        for pid in server.worker_pids():
            # Writing 5 resets the kernel's peak (VmHWM) to the current RSS.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            baseline[pid] = _status_kib(pid, "VmRSS")
        upload_parts(client, data, 1)
        growth.append(max(_status_kib(pid, "VmHWM") - rss for pid, rss in baseline.items()) / 1024)
    return growth


def minio_client(spec: StorageSpec) -> Minio:
    """The minio SDK on the bench's S3 server, built here from the same StorageSpec the service gets
    (endpoint, keys, TLS, region), with the SDK's own connection pool: the bench measures the SDK,
    and reaches into none of the product's internals to do it."""
    if not (spec.endpoint and spec.bucket):
        raise ValueError("an S3 StorageSpec needs an endpoint and a bucket")
    return Minio(
        spec.endpoint, access_key=spec.access_key, secret_key=spec.secret_key, secure=spec.secure, region=spec.region
    )


def direct_put_rate(spec: StorageSpec, data: bytes, count: int) -> float:
    """MB/s of the minio SDK's put_object, one request per object, to the service's bucket."""
    sdk = minio_client(spec)
    bucket = cast(str, spec.bucket)
    keys = [f"bench/direct-{uuid.uuid4().hex}" for _ in range(count)]
    try:
        started = time.perf_counter()
        for key in keys:
            sdk.put_object(bucket, key, io.BytesIO(data), len(data), part_size=len(data))
        return count * len(data) / (time.perf_counter() - started) / 1e6
    finally:
        for key in keys:
            sdk.remove_object(bucket, key)


def s3_path(client: Client, spec: StorageSpec, data: bytes, rounds: int, parts: int) -> tuple[list, list, list]:
    """(ratios, service MB/s, direct MB/s), alternating the two in each round."""
    ratios, service, direct = [], [], []
    direct_put_rate(spec, data, 2)
    for _ in range(rounds):
        direct_rate = direct_put_rate(spec, data, parts)
        service_rate = parts * len(data) / upload_parts(client, data, parts) / 1e6
        ratios.append(service_rate / direct_rate)
        service.append(service_rate)
        direct.append(direct_rate)
    return ratios, service, direct


def bench_backend(
    backend: str, spec: StorageSpec, url: str, key: str, args: argparse.Namespace, env: dict[str, str]
) -> Iterator[Figure]:
    part = os.urandom(STREAM_PART)
    wanted = set(args.figures.split(","))
    with harness.gunicorn(url, spec, config=args.gunicorn_config, env=env) as server:
        # A fresh connection per phase: an idle keep-alive connection is closed by the server.
        if "stream" in wanted:
            with _connected(server, key) as client:
                figures = stream(client, part, args.rounds, args.stream_parts, spec.root)
            note = (
                f"service {statistics.median(figures['service']):.0f} MB/s,"
                f" sha256 {statistics.median(figures['sha256']):.0f} MB/s"
            )
            if figures["disk"]:
                note += f", the disk alone (write + fsync) {statistics.median(figures['disk']):.0f} MB/s"
            yield Figure(
                "stream 8 MiB parts / sha256",
                backend,
                figures["ratio"],
                target=">= 0.5",
                met=statistics.median(figures["ratio"]) >= 0.5,
                note=note,
            )

        if "small" in wanted:
            with _connected(server, key) as client:
                ratios, part_rates, health_rates = small_parts(client, args.rounds, args.small_parts)
            yield Figure(
                "small 4 KiB parts / healthz",
                backend,
                ratios,
                target=">= 0.35",
                met=statistics.median(ratios) >= 0.35,
                note=f"{statistics.median(part_rates):.0f} parts/s, {statistics.median(health_rates):.0f} healthz/s",
            )

        if "concurrency" in wanted:
            for clients, parts in ((8, 4), (32, 2)):
                rates, latencies = concurrent(server.url, key, part, clients, parts, args.concurrency_rounds)
                yield Figure(
                    f"{clients} clients, 8 MiB parts",
                    backend,
                    rates,
                    unit=" MB/s",
                    note=f"per part p50 {percentile(latencies, 0.5):.3f} s, p99 {percentile(latencies, 0.99):.3f} s",
                )

        if spec.kind == "s3" and "s3path" in wanted:
            with _connected(server, key) as client:
                ratios, service, direct = s3_path(client, spec, part, args.rounds, args.stream_parts)
            yield Figure(
                "S3 path / direct put_object",
                backend,
                ratios,
                target=">= 0.8",
                met=statistics.median(ratios) >= 0.8,
                note=f"service {statistics.median(service):.0f} MB/s, put_object {statistics.median(direct):.0f} MB/s",
            )

        if "client" in wanted:
            with tempfile.TemporaryDirectory(dir=args.file_root) as work:
                for parallel in CLIENT_PARALLEL:
                    ratios, client_mbs, raw_mbs, cpu = client_rates(
                        server.url, key, part, args.client_parts, parallel, args.client_rounds, Path(work)
                    )
                    yield Figure(
                        f"client parallel {parallel} / minimal clients",
                        backend,
                        ratios,
                        target=">= 0.9",
                        met=statistics.median(ratios) >= 0.9,
                        note=f"upload_file {statistics.median(client_mbs):.0f} MB/s,"
                        f" server-side aggregate {statistics.median(raw_mbs):.0f} MB/s;"
                        f" client CPU {statistics.median(cpu):.2f} s/GiB",
                    )
                rss = client_peak_rss(server.url, key, args.client_rss_size * MiB, STREAM_PART, 4, Path(work))
            yield Figure(
                f"client peak RSS, {args.client_rss_size} MiB file, parallel 4",
                backend,
                [rss],
                unit=" MiB",
                target="< 64",
                met=rss < 64,
                note="the whole CLI process (Python, httpx, tqdm included)",
            )

    if "assembly" in wanted and spec.kind == "file" and spec.root is not None:
        ratios, assembled, baseline = assembly_rates(spec.root, part, args.assembly_parts, args.rounds)
        yield Figure(
            f"assembly {args.assembly_parts} x 8 MiB / cat+sync",
            backend,
            ratios,
            target=">= 0.8",
            met=statistics.median(ratios) >= 0.8,
            note=f"assemble {statistics.median(assembled):.0f} MB/s, cat+sync {statistics.median(baseline):.0f} MB/s",
        )

    if "memory" in wanted:
        # A fresh server with one worker: its buffers and threads count, none are left from before.
        one_worker = {**env, "CHUNKSVC_WORKERS": "1"}
        with (
            harness.gunicorn(url, spec, config=args.gunicorn_config, env=one_worker) as server,
            _connected(server, key) as client,
        ):
            growth = memory_growth(server, client, args.memory_rounds)
        yield Figure(
            "worker peak RSS growth, 64 MiB part",
            backend,
            growth,
            unit=" MiB",
            target="<= 16",
            met=max(growth) <= 16,
            note=f"largest {max(growth):.1f} MiB (buffers are pooled: the first part allocates them)",
        )


def raw_upload_rate(server_url: str, key: str, data: bytes, parts: int, parallel: int) -> float:
    """MB/s of one upload of ``parts`` parts of ``data`` by ``parallel`` minimal clients, create to complete."""
    creator = Client(server_url, key)
    try:
        started = time.perf_counter()
        session = creator.create_session(len(data) * parts, len(data))
        numbers = iter(range(1, parts + 1))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def sender() -> None:
            client = Client(server_url, key)
            try:
                while True:
                    with lock:
                        number = next(numbers, None)
                    if number is None:
                        return
                    client.put_part(session, number, data)
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=sender) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        creator.complete(session)
        return len(data) * parts / (time.perf_counter() - started) / 1e6
    finally:
        creator.close()


def client_rates(
    server_url: str, key: str, data: bytes, parts: int, parallel: int, rounds: int, work: Path
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(ratios, client MB/s, raw MB/s, client CPU seconds per GiB): ``upload_file`` against the
    minimal clients, alternated in each round."""
    from chunksvc_client import Client as UploadClient

    path = work / f"client-{uuid.uuid4().hex}.bin"
    with open(path, "wb") as f:
        for _ in range(parts):
            f.write(data)
    ratios, client_mbs, raw_mbs, cpu_per_gib = [], [], [], []
    try:
        with UploadClient(server_url, key) as client:
            for round_number in range(rounds + 1):
                raw = raw_upload_rate(server_url, key, data, parts, parallel)
                os.utime(path)  # a new modification time: a new upload, not a resumed one
                started, cpu_started = time.perf_counter(), time.process_time()
                client.upload_file(path, part_size=len(data), parallel=parallel)
                uploaded = len(data) * parts / (time.perf_counter() - started) / 1e6
                cpu = (time.process_time() - cpu_started) / (len(data) * parts / 2**30)
                if round_number:  # the first round warms both up
                    ratios.append(uploaded / raw)
                    client_mbs.append(uploaded)
                    raw_mbs.append(raw)
                    cpu_per_gib.append(cpu)
    finally:
        path.unlink()
    return ratios, client_mbs, raw_mbs, cpu_per_gib


def client_peak_rss(server_url: str, key: str, size: int, part_size: int, parallel: int, work: Path) -> float:
    """MiB: the CLI's peak RSS (the whole process) uploading a file of ``size`` bytes."""
    path = work / f"client-rss-{uuid.uuid4().hex}.bin"
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    env = {**os.environ, "CHUNKSVC_URL": server_url, "CHUNKSVC_API_KEY": key}
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chunksvc_client.cli",
                "upload",
                str(path),
                "--part-size",
                str(part_size),
                "--parallel",
                str(parallel),
                "--quiet",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        # The kernel's high-water mark of the process's own memory (VmHWM), read until it exits.
        # Not getrusage's ru_maxrss: across fork and exec it keeps the parent's (this bench's) peak.
        peak_kib = 0
        while process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                peak_kib = max(peak_kib, _status_kib(process.pid, "VmHWM"))
            time.sleep(0.02)
        if process.returncode != 0:
            raise RuntimeError(f"chunksvc-client upload exited {process.returncode}")
        return peak_kib / 1024
    finally:
        path.unlink()


def assembly_rates(root: Path, data: bytes, parts: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(ratios, assemble MB/s, cat+sync MB/s) for ``parts`` parts of ``data`` on disk under ``root``."""
    from chunksvc.storage import PartSource
    from chunksvc.storage.local import LocalStorage

    storage = LocalStorage(root)
    sources = []
    for number in range(parts):
        key = f"parts/bench/{number:05d}"
        storage.write(key, io.BytesIO(data), len(data), MiB)
        sources.append(PartSource(key, len(data)))
    paths = " ".join(str(root / source.key) for source in sources)
    total = len(data) * parts
    ratios, assembled, baseline = [], [], []

    def settled() -> None:
        """Nothing of the last run left to write (a virtual disk drains its host cache too)."""
        subprocess.run(["sync"], check=True)
        time.sleep(2)

    def assemble() -> float:
        settled()
        started = time.perf_counter()
        storage.assemble(sources, "objects/bench", MiB)
        rate = total / (time.perf_counter() - started) / 1e6
        storage.delete(["objects/bench"])
        return rate

    def cat() -> float:
        settled()
        started = time.perf_counter()
        subprocess.run(f"cat {paths} > {root}/cat.bin && sync", shell=True, check=True)
        rate = total / (time.perf_counter() - started) / 1e6
        (root / "cat.bin").unlink()
        return rate

    try:
        for round_number in range(rounds):
            # Each goes first every other round, so neither always follows the other's writes.
            if round_number % 2:
                cat_rate = cat()
                assemble_rate = assemble()
            else:
                assemble_rate = assemble()
                cat_rate = cat()
            ratios.append(assemble_rate / cat_rate)
            assembled.append(assemble_rate)
            baseline.append(cat_rate)
    finally:
        storage.delete_prefix("parts/bench/")
    return ratios, assembled, baseline


@contextlib.contextmanager
def _connected(server: harness.Server, key: str) -> Iterator[Client]:
    client = Client(server.url, key)
    try:
        yield client
    finally:
        client.close()


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    memory = _status_kib_meminfo("MemTotal") / 1024 / 1024
    return f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB RAM, Python {platform.python_version()}"


def _status_kib_meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3 (default both)")
    parser.add_argument(
        "--figures", default=",".join(FIGURES), help=f"comma-separated subset of {', '.join(FIGURES)} (default all)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds per ratio (default 7)")
    parser.add_argument("--stream-parts", type=int, default=16, help="8 MiB parts per stream round")
    parser.add_argument("--small-parts", type=int, default=300, help="4 KiB parts (and healthz calls) per round")
    parser.add_argument("--concurrency-rounds", type=int, default=2)
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--client-rounds", type=int, default=3, help="rounds per client figure (default 3)")
    parser.add_argument("--assembly-parts", type=int, default=128, help="8 MiB parts per assembly (default 128)")
    parser.add_argument("--client-parts", type=int, default=24, help="8 MiB parts per client upload (default 24)")
    parser.add_argument("--client-rss-size", type=int, default=1024, help="MiB of the client RSS file (default 1024)")
    parser.add_argument(
        "--file-root", type=Path, help="where the file backend stores parts (default: the temporary directory)"
    )
    parser.add_argument("--gunicorn-config", type=Path, default=Path("gunicorn.conf.py"))
    parser.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target")
    parser.add_argument("--workers", help="CHUNKSVC_WORKERS for this run (default: gunicorn.conf.py's)")
    parser.add_argument("--threads", help="CHUNKSVC_THREADS for this run")
    parser.add_argument("--worker-class", help="CHUNKSVC_WORKER_CLASS for this run")
    parser.add_argument("--block-size", help="CHUNKSVC_BLOCK_SIZE for this run")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"file", "s3"}:
        parser.error("--backends takes file and/or s3")

    env = {
        "CHUNKSVC_MIN_PART_SIZE": str(SMALL_PART),
        "CHUNKSVC_LOG_LEVEL": "warning",
    }
    for option, variable in (
        ("workers", "CHUNKSVC_WORKERS"),
        ("threads", "CHUNKSVC_THREADS"),
        ("worker_class", "CHUNKSVC_WORKER_CLASS"),
        ("block_size", "CHUNKSVC_BLOCK_SIZE"),
    ):
        if getattr(args, option):
            env[variable] = getattr(args, option)

    print(f"chunksvc bench on {machine()}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(env.items())) + " (others from the config file)")
    started = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="chunksvc-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        url = stack.enter_context(harness.embedded_database(work))
        key = harness.create_api_key(url, "bench")
        for backend in backends:
            spec: StorageSpec
            if backend == "file":
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.file_root)))
                spec = StorageSpec(kind="file", root=root / "storage")
            else:
                spec = harness.s3_spec(stack.enter_context(harness.moto_s3()))
            for figure in bench_backend(backend, spec, url, key, args, env):
                figures.append(figure)
                print(f"  measured: {figure.name} ({backend})", file=sys.stderr, flush=True)
    print()
    print_table(figures)
    missed = [f"{figure.name} ({figure.backend})" for figure in figures if figure.met is False]
    print(f"\n{args.rounds} rounds per ratio; total {time.monotonic() - started:.0f} s")
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    # --check: for CI jobs or release gates that must fail when a target is missed.
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
