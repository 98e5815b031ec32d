"""The part path's benchmark: ``make bench`` (``python -m tools.bench``).

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL) once per
storage backend (a directory; S3 served by radosgw, ``tools/radosgw.py``, or by moto in a child
process if Ceph is not installed) and prints, as the median of
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
  in MB/s, divided by ``cat parts > object && sync`` of the same parts, alternated in each round;
- server CPU: with stream and small, the CPU time (utime+stime in /proc) of gunicorn's master and
  workers and of the PostgreSQL server's processes while the parts were sent, per GiB of 8 MiB
  parts and per 4 KiB part (S3: the S3 server's is not counted);
- peer (``--peer tus``, file backend): chunksvc side by side with tus-node-server
  (``tools/peer_tus.py`` installs and starts it) in interleaved rounds, one Python client each:
  MiB/s with 8 MiB parts for 1, 4 and 16 clients, 4 KiB parts per second, and the servers' CPU
  per GiB and per 4 KiB part (tus: its Node process), each as the ratio chunksvc/tus.
  ``--figures peer`` without ``--peer`` prints chunksvc's side alone.
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
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, cast

import psycopg
from minio import Minio

from chunksvc.config import GiB, KiB, MiB, StorageSpec
from tools import harness, peer_tus, radosgw
from tools.client import Client
from tools.measure import (
    ProcStat,
    cpu_ticks_between,
    fmt_spread,
    meminfo_kib,
    peak_rss_kib,
    percentile,
    process_tree,
    read_proc_stat,
    reset_peak_rss,
    rss_kib,
)

STREAM_PART = 8 * MiB
SMALL_PART = 4 * KiB
MEMORY_PART = 64 * MiB
FIGURES = ("stream", "small", "concurrency", "memory", "s3path", "client", "assembly", "peer")
# "peer" runs by default only with --peer (without it, it prints chunksvc's side alone).
DEFAULT_FIGURES = tuple(name for name in FIGURES if name != "peer")
PEER_CLIENTS = (4, 16)
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


def upload_parts(
    client: Client, data: bytes, count: int, latencies: list[float] | None = None, meter: CpuMeter | None = None
) -> float:
    """PUT ``count`` parts of ``data`` into a new session; return the seconds the PUTs took (and,
    given ``meter``, measure the servers' CPU over exactly those PUTs: ``meter.last``)."""
    session = client.create_session(len(data) * count, len(data))
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    for number in range(1, count + 1):
        sent = time.perf_counter()
        client.put_part(session, number, data)
        if latencies is not None:
            latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    if meter is not None:
        meter.stop()
    client.abort(session)  # frees the disk (or moto's memory) for the next round
    return elapsed


@dataclasses.dataclass
class CpuReading:
    seconds: dict[str, float]  # group -> CPU seconds
    missed: int = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class CpuMeter:
    """CPU seconds used by named process trees (e.g. gunicorn's master, the postmaster) between
    ``start()`` and ``stop()``; the last reading stays in ``last``."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)
        self._before: dict[str, dict[int, ProcStat]] = {}
        self.last = CpuReading({})

    def start(self) -> None:
        self._before = {name: process_tree(pid) for name, pid in self.roots.items()}

    def stop(self) -> CpuReading:
        seconds, missed = {}, 0
        for name, pid in self.roots.items():
            ticks, lost = cpu_ticks_between(self._before[name], process_tree(pid))
            seconds[name] = ticks / self.TICK
            missed += lost
        self.last = CpuReading(seconds, missed)
        return self.last


def postmaster_pid(database_url: str) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine (the bench's embedded
    one does): the parent of the backend serving a connection."""
    try:
        with psycopg.connect(database_url) as conn:  # the backend exits with the connection: read it first
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            backend = int(row[0]) if row else 0
            parent = read_proc_stat(backend).ppid
        # On another machine that pid would be some unrelated local process, or none.
        return parent if "postgres" in Path(f"/proc/{parent}/comm").read_text() else None
    except (psycopg.Error, OSError, ValueError):
        return None


def stream(
    client: Client, data: bytes, rounds: int, parts: int, disk: Path | None, meter: CpuMeter | None = None
) -> tuple[dict[str, list[float]], list[CpuReading]]:
    """Per round: the ratio, the service's MB/s, SHA-256 MB/s and (given ``disk``) the disk's; and
    (given ``meter``) the servers' CPU over each round's parts."""
    figures: dict[str, list[float]] = {"ratio": [], "service": [], "sha256": [], "disk": []}
    cpu: list[CpuReading] = []
    upload_parts(client, data, 2)  # warm-up: connections, page cache, code paths
    for _ in range(rounds):
        sha = hash_rate(data)
        service = parts * len(data) / upload_parts(client, data, parts, meter=meter) / 1e6
        if meter is not None:
            cpu.append(meter.last)
        figures["ratio"].append(service / sha)
        figures["service"].append(service)
        figures["sha256"].append(sha)
        if disk is not None:
            figures["disk"].append(disk_write_rate(disk, data, parts))
    return figures, cpu


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


def small_parts(
    client: Client, rounds: int, count: int, meter: CpuMeter | None = None
) -> tuple[list[float], list[float], list[float], list[CpuReading]]:
    """(ratios, parts per second, healthz per second, the servers' CPU over the parts), one value
    per round."""
    data = os.urandom(SMALL_PART)
    ratios, part_rates, health_rates, cpu = [], [], [], []
    upload_parts(client, data, 20)
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            client.healthz()
        health_rate = count / (time.perf_counter() - started)
        part_rate = count / upload_parts(client, data, count, meter=meter)
        if meter is not None:
            cpu.append(meter.last)
        ratios.append(part_rate / health_rate)
        part_rates.append(part_rate)
        health_rates.append(health_rate)
    return ratios, part_rates, health_rates, cpu


def concurrent(
    server_url: str, key: str, data: bytes, clients: int, parts: int, rounds: int
) -> tuple[list[float], list[float]]:
    """(aggregate MB/s per round, every part's latency in seconds)."""
    rates: list[float] = []
    latencies: list[float] = []
    for _ in range(rounds):
        elapsed = concurrent_round(server_url, key, data, clients, parts, latencies)
        rates.append(clients * parts * len(data) / elapsed / 1e6)
    return rates, latencies


def concurrent_round(server_url: str, key: str, data: bytes, clients: int, parts: int, latencies: list[float]) -> float:
    """``clients`` threads, each PUTting ``parts`` parts at once; the seconds until all are done."""
    return parallel_uploads(lambda: ChunksvcUploader(server_url, key), data, clients, parts, latencies)


class Uploader(Protocol):
    """One client on one keep-alive connection, to chunksvc or to the peer."""

    def connect(self) -> None:
        """Open the connection with one cheap request (before a clock starts)."""

    def upload(
        self, data: bytes, count: int, latencies: list[float] | None = None, meter: CpuMeter | None = None
    ) -> float:
        """A new upload of ``count`` parts of ``data``, removed afterwards; the seconds the parts took."""
        ...

    def close(self) -> None: ...


class ChunksvcUploader:
    def __init__(self, server_url: str, key: str) -> None:
        self.client = Client(server_url, key)

    def connect(self) -> None:
        self.client.healthz()

    def upload(
        self, data: bytes, count: int, latencies: list[float] | None = None, meter: CpuMeter | None = None
    ) -> float:
        return upload_parts(self.client, data, count, latencies, meter)

    def close(self) -> None:
        self.client.close()


class TusUploader:
    """tus: POST with Upload-Length, a PATCH per part at its Upload-Offset, DELETE."""

    def __init__(self, server_url: str) -> None:
        self.client = peer_tus.TusClient(server_url)

    def connect(self) -> None:
        self.client.options()

    def upload(
        self, data: bytes, count: int, latencies: list[float] | None = None, meter: CpuMeter | None = None
    ) -> float:
        upload = self.client.create(len(data) * count)
        body = memoryview(data)
        offset = 0
        if meter is not None:
            meter.start()
        started = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            offset = self.client.patch(upload, offset, body)
            if latencies is not None:
                latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
        if meter is not None:
            meter.stop()
        self.client.delete(upload)
        if offset != len(data) * count:
            raise RuntimeError(f"tus: upload ended at offset {offset}, not {len(data) * count}")
        return elapsed

    def close(self) -> None:
        self.client.close()


def parallel_uploads(
    connect: Callable[[], Uploader], data: bytes, clients: int, parts: int, latencies: list[float] | None = None
) -> float:
    """``clients`` threads, each with its own connection and upload of ``parts`` parts, at once;
    the seconds until all are done."""
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run() -> None:
        client = connect()
        try:
            client.connect()  # connected before the clock starts
            barrier.wait()
            client.upload(data, parts, latencies)
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


def memory_growth(server: harness.Server, client: Client, rounds: int) -> list[float]:
    """MiB by which a worker's peak RSS rose above its RSS while it took one 64 MiB part, per round."""
    data = os.urandom(MEMORY_PART)
    growth = []
    upload_parts(client, os.urandom(SMALL_PART), 2)  # the serving worker has loaded everything
    for _ in range(rounds):
        baseline = {}
        for pid in server.worker_pids():
            reset_peak_rss(pid)
            baseline[pid] = rss_kib(pid)
        upload_parts(client, data, 1)
        growth.append(max(peak_rss_kib(pid) - rss for pid, rss in baseline.items()) / 1024)
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


def s3_path(
    client: Client, spec: StorageSpec, data: bytes, rounds: int, parts: int
) -> tuple[list[float], list[float], list[float]]:
    """(ratios, service MB/s, direct MB/s), alternating the two in each round."""
    ratios: list[float] = []
    service: list[float] = []
    direct: list[float] = []
    direct_put_rate(spec, data, 2)
    for _ in range(rounds):
        direct_rate = direct_put_rate(spec, data, parts)
        service_rate = parts * len(data) / upload_parts(client, data, parts) / 1e6
        ratios.append(service_rate / direct_rate)
        service.append(service_rate)
        direct.append(direct_rate)
    return ratios, service, direct


@dataclasses.dataclass
class PeerSide:
    """One server of the peer comparison: how to reach it, its CPU meter, its values per round."""

    name: str
    connect: Callable[[], Uploader]
    meter: CpuMeter
    values: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    missed: int = 0  # exited processes whose CPU could not be counted

    def record_cpu(self, key: str, reading: CpuReading, scale: float) -> None:
        self.values[key].append(reading.total * scale)
        for group, seconds in reading.seconds.items():
            self.values[f"{key}:{group}"].append(seconds * scale)
        self.missed += reading.missed


@contextlib.contextmanager
def _uploader(connect: Callable[[], Uploader]) -> Iterator[Uploader]:
    client = connect()
    try:
        client.connect()
        yield client
    finally:
        client.close()


def peer_rounds(sides: list[PeerSide], rounds: int, stream_parts: int, small_count: int) -> None:
    """Each figure of each side, in ``rounds`` rounds; within a round the sides take turns figure by
    figure, and which goes first alternates from round to round."""
    big, small = os.urandom(STREAM_PART), os.urandom(SMALL_PART)
    stream_bytes = stream_parts * STREAM_PART
    for side in sides:  # warm-up: connections, page cache, code paths, Node's JIT
        with _uploader(side.connect) as client:
            client.upload(big, 4)
            client.upload(small, 100)
    for round_number in range(rounds):
        order = sides if round_number % 2 == 0 else sides[::-1]
        for side in order:
            with _uploader(side.connect) as client:
                elapsed = client.upload(big, stream_parts, meter=side.meter)
            side.values["stream"].append(stream_bytes / MiB / elapsed)
            side.record_cpu("cpu_gib", side.meter.last, GiB / stream_bytes)
        for clients in PEER_CLIENTS:
            per_client = max(1, stream_parts // clients)
            for side in order:
                elapsed = parallel_uploads(side.connect, big, clients, per_client)
                side.values[f"clients{clients}"].append(clients * per_client * STREAM_PART / MiB / elapsed)
        for side in order:
            with _uploader(side.connect) as client:
                elapsed = client.upload(small, small_count, meter=side.meter)
            side.values["small"].append(small_count / elapsed)
            side.record_cpu("cpu_part", side.meter.last, 1000 / small_count)


# key, row name, unit, goal of chunksvc/tus (issue 13): "higher" rates, "lower" CPU.
PEER_METRICS = (
    ("stream", "8 MiB parts, 1 client", "MiB/s", ">=", 1.5),
    *((f"clients{n}", f"8 MiB parts, {n} clients", "MiB/s", ">=", 1.0) for n in PEER_CLIENTS),
    ("small", "4 KiB parts, 1 client", "parts/s", ">=", 1.0),
    ("cpu_gib", "server CPU per GiB, 8 MiB parts", "s", "<=", 0.8),
    ("cpu_part", "server CPU per 4 KiB part", "ms", "<=", 1.0),
)
GROUP_NAMES = {"gunicorn": "gunicorn", "postgres": "PostgreSQL", "node": "node"}


def _spread(values: list[float]) -> str:
    """median (min-max)."""
    return fmt_spread(values, _fmt)


def _groups_note(side: PeerSide, key: str) -> str:
    """For a CPU figure: the median of each process tree's share, and what could not be counted."""
    groups = [
        f"{GROUP_NAMES.get(name.split(':', 1)[1], name)} {_fmt(statistics.median(values))}"
        for name, values in side.values.items()
        if name.startswith(key + ":")
    ]
    note = f" [{' + '.join(groups)}]" if len(groups) > 1 else ""
    if groups and side.missed:
        note += f" ({side.missed} exited processes not counted)"
    return note


def peer_figures(backend: str, chunksvc: PeerSide, tus: PeerSide | None) -> Iterator[Figure]:
    """chunksvc/tus per round (median, min-max) against the goal; without the peer, chunksvc's own."""
    for key, name, unit, op, goal in PEER_METRICS:
        ours = chunksvc.values[key]
        note = f"chunksvc {_spread(ours)} {unit}{_groups_note(chunksvc, key)}"
        if tus is None:
            yield Figure(f"peer {name}", backend, ours, unit=f" {unit}", note=note)
            continue
        theirs = tus.values[key]
        ratios = [a / b if b else float("inf") for a, b in zip(ours, theirs, strict=True)]
        median = statistics.median(ratios)
        yield Figure(
            f"peer {name}, chunksvc/tus",
            backend,
            ratios,
            target=f"{op} {goal}",
            met=median >= goal if op == ">=" else median <= goal,
            note=f"{note}; tus {_spread(theirs)} {unit}{_groups_note(tus, key)}",
        )


def _cpu_note(readings: list[CpuReading], scale: float, unit: str) -> str:
    """The median of each process tree's share, e.g. ``gunicorn 2.10 + PostgreSQL 0.15 s``."""
    groups = [
        f"{GROUP_NAMES.get(name, name)} {_fmt(statistics.median(r.seconds[name] * scale for r in readings))}"
        for name in readings[0].seconds
    ]
    missed = sum(r.missed for r in readings)
    return " + ".join(groups) + f" {unit}" + (f" ({missed} exited processes not counted)" if missed else "")


def bench_backend(
    backend: str,
    spec: StorageSpec,
    url: str,
    key: str,
    args: argparse.Namespace,
    env: dict[str, str],
    postmaster: int | None = None,
    peer: peer_tus.Installation | None = None,
) -> Iterator[Figure]:
    part = os.urandom(STREAM_PART)
    wanted = set(args.figures.split(","))
    if spec.kind == "s3":
        # The server's own reaper off: moto (the fallback) dates every multipart upload 2010-11-10,
        # so the reaper's sweep of stale ones would abort a compose under way (the client figures
        # complete). radosgw dates them right, but the figures are kept alike on both.
        env = {**env, "CHUNKSVC_REAP_INTERVAL": "0"}
    with harness.gunicorn(url, spec, config=args.gunicorn_config, env=env) as server:
        # The service's CPU: gunicorn's master and workers, and the PostgreSQL server's processes.
        roots = {"gunicorn": server.process.pid, **({"postgres": postmaster} if postmaster else {})}
        meter = CpuMeter(roots)
        not_counted = "" if spec.kind == "file" else " (the S3 server's not counted)"
        # A fresh connection per phase: an idle keep-alive connection is closed by the server.
        if "stream" in wanted:
            with _connected(server, key) as client:
                figures, cpu = stream(client, part, args.rounds, args.stream_parts, spec.root, meter)
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
            per_gib = GiB / (args.stream_parts * STREAM_PART)
            yield Figure(
                "server CPU per GiB, 8 MiB parts",
                backend,
                [reading.total * per_gib for reading in cpu],
                unit=" s",
                note=_cpu_note(cpu, per_gib, "s") + not_counted + "; goal vs tus <= 0.8x (--peer tus)",
            )

        if "small" in wanted:
            with _connected(server, key) as client:
                ratios, part_rates, health_rates, cpu = small_parts(client, args.rounds, args.small_parts, meter)
            yield Figure(
                "small 4 KiB parts / healthz",
                backend,
                ratios,
                target=">= 0.35",
                met=statistics.median(ratios) >= 0.35,
                note=f"{statistics.median(part_rates):.0f} parts/s, {statistics.median(health_rates):.0f} healthz/s",
            )
            per_part = 1000 / args.small_parts
            yield Figure(
                "server CPU per 4 KiB part",
                backend,
                [reading.total * per_part for reading in cpu],
                unit=" ms",
                note=_cpu_note(cpu, per_part, "ms") + not_counted + "; goal vs tus <= 1.0x (--peer tus)",
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
                    ratios, client_mbs, raw_mbs, client_cpu = client_rates(
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
                        f" client CPU {statistics.median(client_cpu):.2f} s/GiB",
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

        if "peer" in wanted and spec.kind == "file" and spec.root is not None:
            chunksvc_side = PeerSide("chunksvc", lambda: ChunksvcUploader(server.url, key), meter)
            tus_side: PeerSide | None = None
            with contextlib.ExitStack() as peer_stack:
                if peer is not None:
                    try:
                        # Its FileStore beside chunksvc's storage root: the same filesystem.
                        tus = peer_stack.enter_context(peer_tus.serve(peer, spec.root.parent / "tus"))
                    except peer_tus.PeerUnavailable as exc:
                        print(f"peer tus skipped: {exc}", flush=True)
                    else:
                        tus_side = PeerSide("tus", lambda: TusUploader(tus.url), CpuMeter({"node": tus.pid}))
                sides = [chunksvc_side] if tus_side is None else [chunksvc_side, tus_side]
                stream_parts = max(1, args.peer_stream_mib * MiB // STREAM_PART)
                peer_rounds(sides, args.peer_rounds, stream_parts, args.peer_small_parts)
            yield from peer_figures(backend, chunksvc_side, tus_side)

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
                peak_kib = max(peak_kib, peak_rss_kib(process.pid))
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
    memory = meminfo_kib("MemTotal") / 1024 / 1024
    return f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB RAM, Python {platform.python_version()}"


def prepare_peer(args: argparse.Namespace, wanted: list[str], backends: list[str]) -> peer_tus.Installation | None:
    """The installed peer, or None after printing why not (a missing peer never fails the bench)."""
    if args.peer != "tus" or "peer" not in wanted:
        return None
    if "file" not in backends:
        print("peer tus skipped: it is compared on the file backend only")
        return None
    try:
        peer = peer_tus.prepare(args.peer_cache)
    except peer_tus.PeerUnavailable as exc:
        print(f"peer tus skipped: {exc}")
        return None
    print(f"peer: {peer.describe()}, from {peer.directory}")
    return peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3 (default both)")
    parser.add_argument(
        "--figures",
        help=f"comma-separated subset of {', '.join(FIGURES)} (default all but peer; --peer adds it)",
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
    parser.add_argument(
        "--peer",
        choices=["tus"],
        help="also measure tus-node-server side by side (file backend; needs node and npm, else skipped)",
    )
    parser.add_argument("--peer-rounds", type=int, default=3, help="interleaved rounds of the peer figures (default 3)")
    parser.add_argument("--peer-stream-mib", type=int, default=512, help="MiB per 8 MiB-part upload (default 512)")
    parser.add_argument("--peer-small-parts", type=int, default=2000, help="4 KiB parts per round (default 2000)")
    parser.add_argument(
        "--peer-cache",
        type=Path,
        help="where the peer is installed and reused (default $XDG_CACHE_HOME or ~/.cache, /chunksvc-bench)",
    )
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"file", "s3"}:
        parser.error("--backends takes file and/or s3")
    wanted = [f.strip() for f in (args.figures or ",".join(DEFAULT_FIGURES)).split(",") if f.strip()]
    if unknown := sorted(set(wanted) - set(FIGURES)):
        parser.error(f"unknown --figures: {', '.join(unknown)} (choose from {', '.join(FIGURES)})")
    if args.peer and "peer" not in wanted:
        wanted.append("peer")
    args.figures = ",".join(wanted)

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
    peer = prepare_peer(args, wanted, backends)
    started = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="chunksvc-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        url = stack.enter_context(harness.embedded_database(work))
        key = harness.create_api_key(url, "bench")
        postmaster = postmaster_pid(url)
        if postmaster is None:
            print("server CPU: PostgreSQL's processes not found, not counted")
        for backend in backends:
            spec: StorageSpec
            if backend == "file":
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.file_root)))
                spec = StorageSpec(kind="file", root=root / "storage")
            else:
                spec = harness.s3_spec(stack.enter_context(radosgw.bench_s3())[0])
            for figure in bench_backend(backend, spec, url, key, args, env, postmaster, peer):
                figures.append(figure)
                print(f"  measured: {figure.name} ({backend})", file=sys.stderr, flush=True)
    print()
    print_table(figures)
    missed = [f"{figure.name} ({figure.backend})" for figure in figures if figure.met is False]
    print(f"\n{args.rounds} rounds per ratio; total {time.monotonic() - started:.0f} s")
    compared = peer is not None and any(figure.name.endswith(", chunksvc/tus") for figure in figures)
    if {"stream", "small", "peer"} & set(wanted):
        print(
            "server CPU: utime+stime (/proc/<pid>/stat) over the parts sent; chunksvc: gunicorn's master and"
            " workers and PostgreSQL's postmaster and its processes (exited ones through their parent's cutime)"
            + ("; tus: its Node process" if compared else "")
        )
    if "peer" in wanted and "file" in backends:
        print(
            f"peer: {args.peer_rounds} interleaved rounds, {args.peer_stream_mib} MiB per 8 MiB-part upload,"
            f" {args.peer_small_parts} 4 KiB parts; "
            + (peer.describe() if peer and compared else "chunksvc alone (tus-node-server: --peer tus)")
        )
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    # --check: for CI jobs or release gates that must fail when a target is missed.
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
