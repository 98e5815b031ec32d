"""Cost as work grows: ``make bench-curves`` (``python -m tools.bench_curves``).

Curves, not single points: each figure is measured at several sizes of the work, in rounds (every
size once per round, so a busy machine moves all sizes alike), and printed as min-median-max with
the growth from one size to the next (the exponent k of time ~ size^k: 0 flat, 1 linear; above
1.25 the curve is called SUPER-LINEAR). Starts chunksvc as ops do (gunicorn with
``gunicorn.conf.py`` and the code of the tree this file is in, an embedded PostgreSQL):

- complete: ``POST .../complete`` wall time against the part count, synchronous (the server runs
  with ``CHUNKSVC_SYNC_COMPLETE_MAX`` at 1 TiB, so the answer is the 200 of a finished assembly),
  with the server's own assembly time beside it (its ``chunksvc_assembly_duration_seconds``). On
  disk: small parts (``--file-part-kib``, 16 KiB by default) so the count, not the bytes, is what
  grows. On S3 (radosgw, ``tools/radosgw.py``; moto in a child process only without Ceph): 5 MiB
  parts, the minimum MinIO and S3 compose accept for all but the last, so bytes grow with the
  count. moto joins a completed object in one in-memory
  buffer and reads it whole to serve it (about 4.1 bytes of its RSS per byte: 1,000 parts peak
  at 20 GiB), so a point runs only when that much memory is available (else it says so); points
  over 1 GiB run in one round; 10,000 parts (49 GiB) do not fit this box.
- sessions: with 10^3, 10^5 and 10^6 rows in upload_sessions (filled directly with SQL across four
  clients, the measuring one included, with a realistic mix of statuses; then VACUUM ANALYZE):
  p50/p99 of part PUTs (4 KiB, into fresh sessions) and session creates, and of
  ``GET /uploads/sessions``: the first page, page 11 (through the cursor), a page from the middle
  of the client's history, and the first page of ``?status=IN_PROGRESS``. ``--explain`` prints
  the list statement's plans (EXPLAIN ANALYZE) at each size.
- hosts: aggregate MiB/s of 8 MiB part PUTs with 1, 2 and 4 hosts (separate gunicorn servers, each
  with its default workers) on one PostgreSQL and one storage directory, the same parallel clients
  spread across them, with the box's CPU use meanwhile (/proc/stat): every host runs on the same
  cores and the same disk (``--file-root /dev/shm`` takes the disk out).

About 10 minutes on a 2-core box (3 more with the 1,000-part S3 point); ``--quick`` runs smaller
sizes in 2 rounds (a minute or two).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg

from chunksvc.config import GiB, KiB, MiB, StorageSpec
from tools import harness, radosgw
from tools.client import Client
from tools.measure import percentile, spread

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
CLIENT_NAME = "bench"
CURVES = ("complete", "sessions", "hosts")
SYNC_ALWAYS = 1 << 40  # CHUNKSVC_SYNC_COMPLETE_MAX: every completion is assembled in its request
S3_PART = 5 * MiB  # MinIO's (and S3's) minimum for every part of a compose but the last
HOST_PART = 8 * MiB
SESSION_PART = 4 * KiB
PARTS_PER_FRESH_SESSION = 10
# moto's peak RSS per byte of a completed object (it joins the parts into one buffer, hashes and
# spools it, then reads it whole to serve the read-back): 20.0 GiB for 1,000 parts (4.9 GiB), 2.3
# GiB for 100 (its own 0.2 GiB included); and a little room. Should moto die all the same (the
# kernel's OOM killer takes the largest process: moto), the point says so and the run goes on.
MOTO_MEMORY_FACTOR = 4.05
MOTO_MEMORY_HEADROOM = 384 * MiB
S3_ONE_ROUND_OVER = 1 * GiB  # S3 points above this run once: each takes minutes and most of the memory

# The filled sessions' statuses, per mille, in order of the bucket (i % 1000) they take.
# Open sessions are the recent ones (created in the last OPEN_RECENT fill steps, 5 s apart: a few
# hours); an open bucket further back is a session that ran out and the reaper marked EXPIRED.
STATUS_MIX: tuple[tuple[str, int], ...] = (
    ("COMPLETED", 850),
    ("ABORTED", 60),
    ("EXPIRED", 50),
    ("FAILED", 10),
    ("COMPLETING", 0),  # none: a stale one would be re-driven by the reaper while we measure
    ("IN_PROGRESS", 20),
    ("INIT", 10),
)
OPEN_STATUSES = ("INIT", "IN_PROGRESS")
OPEN_RECENT = 2000
FILL_STEP_SECONDS = 5
FILL_BATCH = 200_000


# --- pure helpers (tests/test_bench_curves.py) -----------------------------------------------


def growth_exponent(x0: float, y0: float, x1: float, y1: float) -> float:
    """k in y ~ x^k between two points: 0 flat, 1 linear, 2 quadratic."""
    if x0 <= 0 or x1 <= 0 or x0 == x1 or y0 <= 0 or y1 <= 0:
        raise ValueError("need positive values and two different x")
    return math.log(y1 / y0) / math.log(x1 / x0)


FLAT_BELOW = 0.25  # |k| below this: flat (within this box's noise)
LINEAR_UP_TO = 1.25  # k above this: worse than linear


def cost_shape(xs: Sequence[float], ys: Sequence[float]) -> str:
    """A cost curve's shape (time or latency against the size of the work), from the exponent of
    each step; the worst step decides."""
    if len(xs) < 2:
        return "one point"
    steps = [growth_exponent(xs[i], ys[i], xs[i + 1], ys[i + 1]) for i in range(len(xs) - 1)]
    worst = max(steps)
    exponents = ", ".join(f"{k:.2f}" for k in steps)
    if worst > LINEAR_UP_TO:
        verdict = "SUPER-LINEAR"
    elif worst >= FLAT_BELOW:
        verdict = "linear" if worst > 0.75 else "sub-linear"
    else:
        verdict = "flat"
    return f"{verdict} (k = {exponents})"


def throughput_shape(xs: Sequence[float], ys: Sequence[float]) -> str:
    """A throughput curve's shape against the hosts serving it: scales (k near 1), flat (bounded
    by something they share), or falls (adding hosts costs throughput)."""
    if len(xs) < 2:
        return "one point"
    steps = [growth_exponent(xs[i], ys[i], xs[i + 1], ys[i + 1]) for i in range(len(xs) - 1)]
    exponents = ", ".join(f"{k:.2f}" for k in steps)
    if min(steps) < -FLAT_BELOW:
        verdict = "FALLS"
    elif min(steps) > 0.75:
        verdict = "scales"
    else:
        verdict = "flat"
    return f"{verdict} (k = {exponents})"


def parse_int_list(text: str) -> list[int]:
    """``"100,1e3,10_000"`` -> [100, 1000, 10000] (sizes on the command line)."""
    values = []
    for item in text.split(","):
        item = item.strip().replace("_", "")
        if item:
            number = float(item)
            if number < 1 or number != int(number):
                raise ValueError(f"not a positive whole number: {item!r}")
            values.append(int(number))
    if not values:
        raise ValueError("empty list")
    return values


def cpu_busy_and_total(stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from /proc/stat's first line (idle and iowait are
    not busy; guest time is already inside user)."""
    fields = stat_text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError("not /proc/stat")
    ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def fill_batches(start: int, stop: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) in ranges of at most ``batch``."""
    return [(low, min(low + batch, stop)) for low in range(start, stop, batch)]


def status_case_sql(mix: Sequence[tuple[str, int]] = STATUS_MIX, open_recent: int = OPEN_RECENT) -> str:
    """The CASE expression giving fill row ``g.i`` its stored status from ``STATUS_MIX``."""
    if sum(share for _, share in mix) != 1000:
        raise ValueError("the status mix must add up to 1000 per mille")
    arms = []
    upper = 0
    for status, share in mix:
        if not share:
            continue
        upper += share
        if status in OPEN_STATUSES:
            value = f"CASE WHEN g.i < {open_recent} THEN '{status}' ELSE 'EXPIRED' END"
        else:
            value = f"'{status}'"
        arms.append(f"WHEN mod(g.i, 1000) < {upper} THEN {value}")
    return "CASE " + " ".join(arms) + " END"


def fill_sessions_sql(mix: Sequence[tuple[str, int]] = STATUS_MIX, open_recent: int = OPEN_RECENT) -> str:
    """One INSERT ... SELECT generate_series of fill rows ``%(start)s`` to ``%(stop)s - 1``, spread
    round-robin over ``%(client_ids)s``, each row within the table's CHECK constraints: sizes and
    total_parts agree, counters in range, an object exactly when COMPLETED, an Idempotency-Key with
    its fingerprint. Row i was created i * FILL_STEP_SECONDS ago; ended sessions are purged (the
    reaper is up to date), open ones expire tomorrow. Ids are md5s of i: a refill is refused."""
    return f"""
INSERT INTO upload_sessions (
    id, client_id, status, filename, content_type, size, part_size, total_parts, received_parts,
    received_bytes, sha256, metadata, idempotency_key, request_fingerprint, created_at, updated_at,
    expires_at, object_key, object_size, object_sha256, purged_at
)
SELECT v.id, v.client_id, v.status, 'file-' || g.i || '.bin',
       CASE WHEN mod(g.i, 5) = 0 THEN 'video/mp4' ELSE 'application/octet-stream' END,
       v.size, v.part_size, v.total_parts,
       CASE WHEN v.status IN ('COMPLETED', 'FAILED') THEN v.total_parts
            WHEN v.status = 'INIT' THEN 0
            ELSE mod(g.i, v.total_parts + 1) END,
       CASE WHEN v.status IN ('COMPLETED', 'FAILED') THEN v.size
            WHEN v.status = 'INIT' THEN 0
            ELSE LEAST(v.size, mod(g.i, v.total_parts + 1) * v.part_size) END,
       CASE WHEN mod(g.i, 2) = 0 THEN encode(sha256(('declared-' || g.i)::bytea), 'hex') END,
       CASE WHEN mod(g.i, 7) = 0 THEN jsonb_build_object('batch', g.i / 1000, 'source', 'bench')
            ELSE '{{}}'::jsonb END,
       CASE WHEN mod(g.i, 3) = 0 THEN 'idem-' || g.i END,
       CASE WHEN mod(g.i, 3) = 0 THEN sha256(('idem-' || g.i)::bytea) END,
       v.created_at,
       LEAST(now(), v.created_at + make_interval(secs => 60 + mod(g.i, 3600))),
       CASE WHEN v.status IN ('INIT', 'IN_PROGRESS') THEN now() + interval '1 day'
            ELSE v.created_at + interval '1 day' END,
       CASE WHEN v.status = 'COMPLETED' THEN 'objects/' || v.id END,
       CASE WHEN v.status = 'COMPLETED' THEN v.size END,
       CASE WHEN v.status = 'COMPLETED' THEN encode(sha256(('object-' || g.i)::bytea), 'hex') END,
       CASE WHEN v.status IN ('INIT', 'IN_PROGRESS') THEN NULL
            ELSE LEAST(now(), v.created_at + make_interval(secs => 360 + mod(g.i, 3600))) END
  FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) AS g(i)
 CROSS JOIN LATERAL (
    SELECT md5('chunksvc-bench-curves-' || g.i)::uuid AS id,
           (%(client_ids)s::bigint[])[1 + mod(g.i, cardinality(%(client_ids)s::bigint[]))] AS client_id,
           {status_case_sql(mix, open_recent)} AS status,
           s.size, 8388608::bigint AS part_size, ((s.size + 8388607) / 8388608)::integer AS total_parts,
           now() - make_interval(secs => g.i * {FILL_STEP_SECONDS}) AS created_at
      FROM (SELECT 8388608::bigint * (1 + mod(g.i, 16)) - mod(g.i * 7919, 8388608) AS size) s
 ) v
"""


# --- talking to the service ------------------------------------------------------------------


def put_parts(urls: Sequence[str], key: str, session: str, data: bytes, count: int, parallel: int) -> None:
    """Parts 1..count of ``data`` into ``session``, by ``parallel`` clients (client j on urls[j % n])."""
    numbers = iter(range(1, count + 1))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def sender(url: str) -> None:
        client = Client(url, key)
        try:
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None or errors:
                    return
                client.put_part(session, number, data)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=sender, args=(urls[j % len(urls)],)) for j in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def assembly_seconds(server: harness.Server) -> float:
    """The server's total completed-assembly time so far (its histogram's sum; 0 before any)."""
    _, _, body = server.request("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith('chunksvc_assembly_duration_seconds_sum{outcome="completed"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KiB
    return 0


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KiB
    return 0


def peak_rss(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


def timed(call: Callable[[], T], into: list[float]) -> T:
    started = time.perf_counter()
    result = call()
    into.append(time.perf_counter() - started)
    return result


# --- printing ------------------------------------------------------------------------------


def fmt_seconds(value: float) -> str:
    if value < 0.001:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.1f} ms" if value < 0.01 else f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def fmt_spread(values: Sequence[float], fmt: Callable[[float], str] = fmt_seconds) -> str:
    low, mid, high = spread(values)
    return f"{fmt(low)} / {fmt(mid)} / {fmt(high)}" if len(values) > 1 else fmt(mid)


def fmt_bytes(value: float) -> str:
    if value >= GiB:
        return f"{value / GiB:.1f} GiB"
    if value >= MiB:
        return f"{value / MiB:.0f} MiB" if value >= 10 * MiB else f"{value / MiB:.1f} MiB"
    return f"{value / KiB:.0f} KiB"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- curve 1: complete against the part count ------------------------------------------------


@dataclasses.dataclass
class CompletePoint:
    backend: str
    parts: int
    part_size: int
    complete_s: list[float] = dataclasses.field(default_factory=list)
    assembly_s: list[float] = dataclasses.field(default_factory=list)
    skipped: str = ""


def complete_once(
    server: harness.Server, key: str, data: bytes, parts: int, parallel: int, remove: Callable[[str], None] | None
) -> tuple[float, float]:
    """Upload ``parts`` parts of ``data``, then time the synchronous complete: (wall, assembly) seconds.
    The complete goes on a connection of its own, opened first (an idle keep-alive connection is
    closed by the server after CHUNKSVC_KEEPALIVE seconds, and the upload takes longer)."""
    with contextlib.closing(Client(server.url, key)) as client:
        session = client.create_session(len(data) * parts, len(data))
    put_parts([server.url], key, session, data, parts, parallel)
    with contextlib.closing(Client(server.url, key, timeout=1800)) as client:
        client.healthz()
        before = assembly_seconds(server)
        started = time.perf_counter()
        answer = client.complete(session)
        elapsed = time.perf_counter() - started
        assembled = assembly_seconds(server) - before
    if answer.get("status") != "COMPLETED":
        raise RuntimeError(f"complete answered {answer.get('status')!r}, not COMPLETED (is it synchronous?)")
    if remove is not None:
        remove(session)
    return elapsed, assembled


def complete_curve(
    backend: str,
    server: harness.Server,
    key: str,
    part_size: int,
    counts: Sequence[int],
    rounds: int,
    parallel: int,
    remove: Callable[[str], None] | None,
    moto: subprocess.Popen[str] | None = None,
) -> list[CompletePoint]:
    """``rounds`` rounds, each completing an upload of every part count in turn. On S3 (``moto``
    given), a point is skipped when moto could not hold it: the memory available plus what moto
    holds already (it reuses its own) is under MOTO_MEMORY_FACTOR times the object's bytes; if
    moto dies during a point, that point says so and the curve ends there."""
    data = os.urandom(part_size)
    points = [CompletePoint(backend, count, part_size) for count in counts]
    for round_number in range(rounds):
        for point in points:
            size = point.parts * part_size
            if backend == "s3" and round_number and size > S3_ONE_ROUND_OVER:
                continue
            if moto is not None and moto.poll() is not None:
                point.skipped = point.skipped or "not run: moto had died"
                continue
            needed = MOTO_MEMORY_FACTOR * size + MOTO_MEMORY_HEADROOM if moto else 0
            usable = mem_available() + (_status_bytes(moto.pid, "VmRSS") if moto else 0)
            if needed and usable < needed:
                point.skipped = (
                    f"skipped: moto would need about {fmt_bytes(needed)} of memory, {fmt_bytes(usable)} available to it"
                )
                continue
            progress(f"complete {backend}: round {round_number + 1}/{rounds}, {point.parts} parts")
            try:
                wall, assembled = complete_once(server, key, data, point.parts, parallel, remove)
            except Exception as exc:
                if moto is None or moto.poll() is None:
                    raise
                point.skipped = (
                    f"failed ({type(exc).__name__}): moto died, exit status {moto.returncode} (out of memory?)"
                )
                continue
            point.complete_s.append(wall)
            point.assembly_s.append(assembled)
    return points


def print_complete(points: list[CompletePoint], moto_peak: int | None, parallel: int) -> None:
    print(
        "curve 1: complete time vs part count: POST .../complete as the client waits for it, synchronous"
        " (CHUNKSVC_SYNC_COMPLETE_MAX=1 TiB: the 200 of a finished assembly, verified and recorded);"
        " assembly: the server's own share of it (chunksvc_assembly_duration_seconds)"
    )
    rows = []
    for point in points:
        if not point.complete_s:
            rows.append([point.backend, f"{point.parts:,}", fmt_bytes(point.part_size), "", point.skipped, "", ""])
            continue
        median = statistics.median(point.complete_s)
        rows.append(
            [
                point.backend,
                f"{point.parts:,}",
                fmt_bytes(point.part_size),
                fmt_bytes(point.parts * point.part_size),
                fmt_spread(point.complete_s),
                fmt_seconds(statistics.median(point.assembly_s)),
                f"{median / point.parts * 1e3:.2f} ms",
            ]
        )
    print_table(
        ["backend", "parts", "part", "object", "complete min / median / max", "assembly (median)", "per part"],
        rows,
    )
    for backend in dict.fromkeys(point.backend for point in points):
        measured = [p for p in points if p.backend == backend and p.complete_s]
        xs = [p.parts for p in measured]
        wall = [statistics.median(p.complete_s) for p in measured]
        print(f"  {backend}: complete time vs parts: {cost_shape(xs, wall)}")
        print(
            f"  {backend}: assembly time vs parts: "
            + cost_shape(xs, [max(statistics.median(p.assembly_s), 1e-6) for p in measured])
        )
        if backend == "s3" and moto_peak:
            print(
                f"  s3: moto's peak RSS {fmt_bytes(moto_peak)}: it builds a completed object in one buffer and reads"
                " it whole to serve it, so 10,000 parts of 5 MiB (49 GiB) do not fit this box"
            )
    print(f"  parts uploaded by {parallel} clients before each complete (not timed); each object removed after")
    if any(p.backend == "s3" for p in points) and moto_peak is not None:
        print(
            "  s3: the server's own reaper is off (CHUNKSVC_REAP_INTERVAL=0): moto dates every multipart upload"
            " 2010-11-10, so the reaper's sweep of stale ones would abort a compose under way"
        )
    if any(p.backend == "s3" and p.parts * p.part_size > S3_ONE_ROUND_OVER for p in points):
        print(f"  s3 points over {fmt_bytes(S3_ONE_ROUND_OVER)}: one round (minutes each, and most of the memory)")


# --- curve 2: the database's size ------------------------------------------------------------


@dataclasses.dataclass
class SessionsPoint:
    sessions: int
    client_sessions: int
    fill_s: float
    series: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)  # (p50, p99) per round
    explains: dict[str, str] = dataclasses.field(default_factory=dict)  # --explain: the list statement's plans


LIST_SERIES = (
    "GET list, first page",
    "GET list, page 11",
    "GET list, middle page",
    "GET list ?status=IN_PROGRESS",
)


def fresh_parts(server: harness.Server, key: str, puts: int) -> tuple[list[float], list[float]]:
    """(create latencies, PUT latencies): ``puts`` 4 KiB parts into fresh sessions of 10 parts,
    one client on one keep-alive connection; the sessions are aborted afterwards."""
    data = os.urandom(SESSION_PART)
    creates: list[float] = []
    part_times: list[float] = []
    sessions = []
    with contextlib.closing(Client(server.url, key)) as client:
        client.healthz()
        for _ in range(max(1, puts // PARTS_PER_FRESH_SESSION)):
            session = timed(
                lambda: client.create_session(SESSION_PART * PARTS_PER_FRESH_SESSION, SESSION_PART), creates
            )
            sessions.append(session)
            for number in range(1, PARTS_PER_FRESH_SESSION + 1):
                timed(functools.partial(client.put_part, session, number, data), part_times)
        for session in sessions:
            client.abort(session)
    return creates, part_times


def list_latencies(server: harness.Server, key: str, query: str, count: int) -> list[float]:
    latencies: list[float] = []
    with contextlib.closing(Client(server.url, key)) as client:
        client.request("GET", "/uploads/sessions" + query)  # the connection, and a warm cache
        for _ in range(count):
            timed(lambda: client.request("GET", "/uploads/sessions" + query), latencies)
    return latencies


@dataclasses.dataclass
class ListSeries:
    query: str  # the request's query string
    params: dict[str, Any]  # the same as list_sessions' parameters (for --explain)


def list_series(
    server: harness.Server, key: str, conn: psycopg.Connection[Any], client_id: int
) -> dict[str, ListSeries]:
    """The list series: page 11 (or the last, when there are fewer) through the cursors the
    service hands out; the middle page from a cursor made of the row there (which the client would
    reach by walking every page before it)."""
    from chunksvc.services.uploads import decode_cursor, encode_cursor

    cursor: str | None = None
    with contextlib.closing(Client(server.url, key)) as client:
        for _ in range(10):
            page = json.loads(
                client.request("GET", "/uploads/sessions" + (f"?cursor={quote(cursor)}" if cursor else ""))
            )
            cursor = page["next_cursor"] or cursor
    (total,) = one_row(conn, "SELECT count(*) FROM upload_sessions WHERE client_id = %s", (client_id,))
    middle_at, middle_id = one_row(
        conn,
        "SELECT created_at, id FROM upload_sessions WHERE client_id = %s"
        " ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
        (client_id, total // 2),
    )
    page_at, page_id = decode_cursor(cursor) if cursor else (None, None)
    params = {"client_id": client_id, "status": None, "after_created_at": None, "after_id": None, "limit": 101}
    return {
        LIST_SERIES[0]: ListSeries("", params),
        LIST_SERIES[1]: ListSeries(
            f"?cursor={quote(cursor or '')}", {**params, "after_created_at": page_at, "after_id": page_id}
        ),
        LIST_SERIES[2]: ListSeries(
            f"?cursor={quote(encode_cursor(middle_at, middle_id))}",
            {**params, "after_created_at": middle_at, "after_id": middle_id},
        ),
        LIST_SERIES[3]: ListSeries("?status=IN_PROGRESS", {**params, "status": "IN_PROGRESS"}),
    }


def one_row(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> tuple[Any, ...]:
    """The one row ``sql`` answers (a count, an id)."""
    row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {sql!r}")
    return row


def explain_list(conn: psycopg.Connection[Any], params: dict[str, Any]) -> str:
    """EXPLAIN ANALYZE of the service's own list_sessions statement, planned with these values
    (as the service's unprepared statements are)."""
    from chunksvc.db import QUERIES

    rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + QUERIES["list_sessions"], params).fetchall()
    return "\n".join(row[0] for row in rows)


def fill_to(conn: psycopg.Connection[Any], filled: int, target: int, client_ids: list[int]) -> None:
    sql = fill_sessions_sql()
    for start, stop in fill_batches(filled, target, FILL_BATCH):
        progress(f"sessions: filling rows {start:,} to {stop:,}")
        conn.execute(sql, {"start": start, "stop": stop, "client_ids": client_ids})


def sessions_curve(
    server: harness.Server,
    key: str,
    client_name: str,
    database_url: str,
    levels: Sequence[int],
    rounds: int,
    puts: int,
    lists: int,
    explain: bool = False,
) -> list[SessionsPoint]:
    points = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        (client_id,) = one_row(conn, "SELECT id FROM clients WHERE name = %s", (client_name,))
        others = [
            one_row(
                conn,
                "INSERT INTO clients (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name"
                " RETURNING id",
                (name,),
            )[0]
            for name in ("tenant-b", "tenant-c", "tenant-d")
        ]
        client_ids = [client_id, *others]
        filled = 0
        for level in levels:
            (existing,) = one_row(conn, "SELECT count(*) FROM upload_sessions")
            target = filled + max(0, level - existing)
            started = time.monotonic()
            fill_to(conn, filled, target, client_ids)
            filled = target
            progress("sessions: VACUUM ANALYZE upload_sessions")
            conn.execute("VACUUM (ANALYZE) upload_sessions")
            fill_s = time.monotonic() - started
            (total,) = one_row(conn, "SELECT count(*) FROM upload_sessions")
            (mine,) = one_row(conn, "SELECT count(*) FROM upload_sessions WHERE client_id = %s", (client_id,))
            point = SessionsPoint(total, mine, fill_s)
            series = list_series(server, key, conn, client_id)
            for round_number in range(rounds):
                progress(f"sessions: {total:,} rows, round {round_number + 1}/{rounds}")
                creates, part_times = fresh_parts(server, key, puts)
                point.series.setdefault("POST create", []).append((percentile(creates, 0.5), percentile(creates, 0.99)))
                point.series.setdefault("PUT part (4 KiB)", []).append(
                    (percentile(part_times, 0.5), percentile(part_times, 0.99))
                )
                for name, one in series.items():
                    count = lists if name != LIST_SERIES[3] else max(20, lists // 4)
                    latencies = list_latencies(server, key, one.query, count)
                    point.series.setdefault(name, []).append((percentile(latencies, 0.5), percentile(latencies, 0.99)))
            if explain:
                point.explains = {name: explain_list(conn, one.params) for name, one in series.items()}
            points.append(point)
    return points


def print_sessions(points: list[SessionsPoint], puts: int, lists: int) -> None:
    print("curve 2: latency vs sessions in the database (one client on one keep-alive connection)")
    names = list(points[0].series)
    header = ["request", *(f"{p.sessions:,} sessions ({p.client_sessions:,} ours)" for p in points), "shape (p99)"]
    rows = []
    for name in names:
        for which, label in ((0, "p50"), (1, "p99")):
            cells = [fmt_spread([pair[which] for pair in p.series[name]]) for p in points]
            shape = ""
            if which == 1:
                xs = [p.sessions for p in points]
                shape = cost_shape(xs, [statistics.median(pair[1] for pair in p.series[name]) for p in points])
            rows.append([f"{name} {label}", *cells, shape])
    print_table(header, rows)
    print(
        f"  per round: {puts} PUTs into fresh sessions of {PARTS_PER_FRESH_SESSION} parts,"
        f" {lists} GETs per list series ({max(20, lists // 4)} with ?status); cells are min / median / max"
        " over the rounds of each round's percentile"
    )
    print(
        "  fill (INSERT ... SELECT generate_series, VACUUM ANALYZE): "
        + ", ".join(f"{p.sessions:,} in {p.fill_s:.0f} s" for p in points)
    )
    print(
        f"  the filled rows: {', '.join(f'{status} {share / 10:g}%' for status, share in STATUS_MIX if share)}"
        f" (open ones only among the newest {OPEN_RECENT:,}: further back they ran out and were marked EXPIRED),"
        " round-robin over 4 clients, ours included"
    )
    for point in points:
        for name, plan in point.explains.items():
            print(f"\n  EXPLAIN ANALYZE of list_sessions at {point.sessions:,} sessions, {name}:")
            print("\n".join("    " + line for line in plan.splitlines()))


# --- curve 3: hosts --------------------------------------------------------------------------


@dataclasses.dataclass
class HostsPoint:
    hosts: int
    workers: int
    mib_s: list[float] = dataclasses.field(default_factory=list)
    busy_cores: list[float] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)


def hosts_round(
    urls: Sequence[str], key: str, data: bytes, clients: int, parts: int
) -> tuple[float, float, list[float]]:
    """``clients`` clients (client j on host j % n), each PUTting ``parts`` parts into a session of
    its own: (aggregate MiB/s, cores busy meanwhile, every part's latency)."""
    sessions = []
    for j in range(clients):
        with contextlib.closing(Client(urls[j % len(urls)], key)) as client:
            sessions.append(client.create_session(len(data) * parts, len(data)))
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def sender(j: int) -> None:
        client = Client(urls[j % len(urls)], key)
        try:
            client.healthz()
            mine: list[float] = []
            barrier.wait()
            for number in range(1, parts + 1):
                timed(functools.partial(client.put_part, sessions[j], number, data), mine)
            latencies.extend(mine)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=sender, args=(j,)) for j in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    busy0, total0 = cpu_busy_and_total(Path("/proc/stat").read_text())
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    busy1, total1 = cpu_busy_and_total(Path("/proc/stat").read_text())
    if errors:
        raise errors[0]
    for j, session in enumerate(sessions):
        with contextlib.closing(Client(urls[j % len(urls)], key)) as client:
            client.abort(session)
    cores = (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)
    return clients * parts * len(data) / MiB / elapsed, cores, latencies


def hosts_curve(
    servers: Sequence[harness.Server], key: str, counts: Sequence[int], rounds: int, clients: int, parts: int
) -> list[HostsPoint]:
    data = os.urandom(HOST_PART)
    urls = [server.url for server in servers]
    points = [HostsPoint(n, sum(len(s.worker_pids()) for s in servers[:n])) for n in counts]
    hosts_round(urls[:1], key, data, clients, 2)  # warm-up: connections, pools, buffers
    for round_number in range(rounds):
        for point in points:
            progress(f"hosts: round {round_number + 1}/{rounds}, {point.hosts} host(s)")
            rate, cores, latencies = hosts_round(urls[: point.hosts], key, data, clients, parts)
            point.mib_s.append(rate)
            point.busy_cores.append(cores)
            point.latencies.extend(latencies)
    return points


def print_hosts(points: list[HostsPoint], clients: int, parts: int) -> None:
    print("curve 3: aggregate MiB/s vs hosts (gunicorn servers on one PostgreSQL and one storage directory)")
    base = statistics.median(points[0].mib_s)
    rows = [
        [
            str(p.hosts),
            str(p.workers),
            fmt_spread(p.mib_s, lambda v: f"{v:.0f}"),
            f"{statistics.median(p.mib_s) / base:.2f}x",
            f"{statistics.median(p.busy_cores):.2f} of {os.cpu_count()}",
            f"{fmt_seconds(percentile(p.latencies, 0.5))} / {fmt_seconds(percentile(p.latencies, 0.99))}",
        ]
        for p in points
    ]
    print_table(["hosts", "workers", "MiB/s min / median / max", "vs 1 host", "box CPU busy", "part p50 / p99"], rows)
    xs = [p.hosts for p in points]
    print(f"  aggregate MiB/s vs hosts: {throughput_shape(xs, [statistics.median(p.mib_s) for p in points])}")
    print(
        f"  {clients} clients spread round-robin over the hosts, {parts} parts of 8 MiB each per round."
        f" Every host, PostgreSQL and the clients share this box's {os.cpu_count()} cores and its storage"
        " (one disk, or tmpfs with --file-root /dev/shm), so the curve is bounded by them, not by the design;"
        " box CPU busy: every process on the box (/proc/stat) while the parts were sent"
    )


# --- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(database_url: str, spec: StorageSpec, env: dict[str, str]) -> Iterator[harness.Server]:
    with harness.gunicorn(database_url, spec, env=env, cwd=ROOT, unset=["PROMETHEUS_MULTIPROC_DIR"]) as server:
        yield server


def s3_remover(spec: StorageSpec) -> Callable[[str], None]:
    from minio import Minio

    from chunksvc.services import layout

    client = Minio(spec.endpoint or "", spec.access_key, spec.secret_key, secure=False, region=spec.region)

    def remove(session: str) -> None:
        client.remove_object(spec.bucket or "", layout.object_key(session))

    return remove


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", default=",".join(CURVES), help=f"comma-separated subset of {', '.join(CURVES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 rounds: a couple of minutes")
    parser.add_argument("--rounds", type=int, help="rounds per point (default 3; --quick 2)")
    parser.add_argument("--backends", default="file,s3", help="complete curve: file and/or s3 (default both)")
    parser.add_argument("--file-parts", help="complete on disk: part counts (default 100,1000,10000)")
    parser.add_argument("--file-part-kib", type=int, default=16, help="complete on disk: KiB per part (default 16)")
    parser.add_argument(
        "--s3-parts", help="complete on S3, 5 MiB parts: part counts (default 10,100,1000; --quick 10,100)"
    )
    parser.add_argument("--parallel", type=int, default=4, help="clients uploading the parts before a complete")
    parser.add_argument("--sessions", help="rows in upload_sessions (default 1e3,1e5,1e6; --quick 1e3,1e5)")
    parser.add_argument("--puts", type=int, help="part PUTs per round (default 300; --quick 100)")
    parser.add_argument("--lists", type=int, help="GETs per list series per round (default 200; --quick 50)")
    parser.add_argument("--hosts", default="1,2,4", help="host counts (default 1,2,4)")
    parser.add_argument("--clients", type=int, default=8, help="parallel clients of the hosts curve (default 8)")
    parser.add_argument("--host-parts", type=int, help="8 MiB parts per client per round (default 16; --quick 8)")
    parser.add_argument(
        "--explain", action="store_true", help="print the list statement's plans (EXPLAIN ANALYZE) at each size"
    )
    parser.add_argument("--file-root", type=Path, help="where the database and disk storage go (default $TMPDIR)")
    args = parser.parse_args(argv)
    curves = [c.strip() for c in args.curves.split(",") if c.strip()]
    if unknown := sorted(set(curves) - set(CURVES)):
        parser.error(f"unknown --curves: {', '.join(unknown)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"file", "s3"}:
        parser.error("--backends takes file and/or s3")
    quick = args.quick
    rounds = args.rounds or (2 if quick else 3)
    try:
        file_parts = parse_int_list(args.file_parts or ("100,1000" if quick else "100,1000,10000"))
        s3_parts = parse_int_list(args.s3_parts or ("10,100" if quick else "10,100,1000"))
        levels = parse_int_list(args.sessions or ("1e3,1e5" if quick else "1e3,1e5,1e6"))
        host_counts = parse_int_list(args.hosts)
    except ValueError as exc:
        parser.error(str(exc))
    puts = args.puts or (100 if quick else 300)
    lists = args.lists or (50 if quick else 200)
    host_parts = args.host_parts or (8 if quick else 16)
    if levels != sorted(levels):
        parser.error("--sessions must grow (rows are added, never removed)")

    env = {
        "CHUNKSVC_LOG_LEVEL": "warning",
        "CHUNKSVC_ACCESS_LOG": "",
        "CHUNKSVC_SYNC_COMPLETE_MAX": str(SYNC_ALWAYS),
    }
    file_env = {**env, "CHUNKSVC_MIN_PART_SIZE": str(SESSION_PART)}
    print(f"chunksvc bench-curves from {ROOT}, {rounds} rounds per point")
    print(
        f"machine: {os.cpu_count()} CPUs, {fmt_bytes(mem_available())} memory available,"
        f" load average {os.getloadavg()[0]:.1f} at the start"
    )
    started = time.monotonic()
    reports: dict[int, Callable[[], None]] = {}  # printed in curve order once all are measured
    with tempfile.TemporaryDirectory(prefix="chunksvc-curves-", dir=args.file_root) as tmp:
        work = Path(tmp)
        with harness.embedded_database(work / "db") as url:
            key = harness.create_api_key(url, CLIENT_NAME)
            file_spec = StorageSpec(kind="file", root=work / "storage")
            if "complete" in curves:
                points: list[CompletePoint] = []
                moto_peak: int | None = None
                if "file" in backends:
                    with serve(url, file_spec, file_env) as server:
                        points += complete_curve(
                            "file", server, key, args.file_part_kib * KiB, file_parts, rounds, args.parallel, None
                        )
                if "s3" in backends and not radosgw.missing_binaries():
                    with radosgw.bench_s3() as (endpoint, _radosgw):
                        spec = harness.s3_spec(endpoint)
                        with serve(url, spec, env) as server:
                            points += complete_curve(
                                "s3", server, key, S3_PART, s3_parts, rounds, args.parallel, s3_remover(spec), None
                            )
                elif "s3" in backends:
                    print(f"S3: moto, not radosgw: {', '.join(radosgw.missing_binaries())} not installed")
                    with harness.moto_s3_process() as (endpoint, moto):
                        spec = harness.s3_spec(endpoint)
                        # The server's own reaper off: moto dates every multipart upload 2010-11-10,
                        # so the reaper's sweep of stale ones would abort a compose under way.
                        with serve(url, spec, {**env, "CHUNKSVC_REAP_INTERVAL": "0"}) as server:
                            points += complete_curve(
                                "s3", server, key, S3_PART, s3_parts, rounds, args.parallel, s3_remover(spec), moto
                            )
                        moto_peak = peak_rss(moto.pid) if moto.poll() is None else None
                reports[1] = lambda: print_complete(points, moto_peak, args.parallel)
            if "hosts" in curves:
                with contextlib.ExitStack() as stack:
                    servers = [stack.enter_context(serve(url, file_spec, file_env)) for _ in range(max(host_counts))]
                    host_points = hosts_curve(servers, key, host_counts, rounds, args.clients, host_parts)
                reports[3] = lambda: print_hosts(host_points, args.clients, host_parts)
            if "sessions" in curves:
                with serve(url, file_spec, file_env) as server:
                    session_points = sessions_curve(
                        server, key, CLIENT_NAME, url, levels, rounds, puts, lists, args.explain
                    )
                reports[2] = lambda: print_sessions(session_points, puts, lists)
    for number in sorted(reports):
        print()
        reports[number]()
    command = " ".join(["python -m tools.bench_curves", *(sys.argv[1:] if argv is None else argv)])
    print(f"\n{command}: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
