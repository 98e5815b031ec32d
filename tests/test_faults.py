"""The fault-injection suite: real gunicorn processes, a real PostgreSQL and real storage (disk, or
S3 over HTTP to radosgw), with a TCP proxy that refuses, hangs, resets or drops replies in between,
kill -9 of workers mid-part and mid-assembly, SIGTERM of the master during uploads, and a load
with invariants across two hosts. Everything on loopback, bounded in count and time.

Each test ends with ``check_invariants``: no acknowledged part lost, no object other than its
source, counters equal to rows, and no stored byte left that no record needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chunksvc.config import StorageSpec
from chunksvc.db import Database
from chunksvc.services import layout
from chunksvc.services.auth import KeyManager
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.storage import open_storage
from chunksvc_client import ApiError
from tests.chaos import Tally, client, finish, measure_invariants, record_fault, upload
from tests.conftest import TEST_LIMITS
from tests.faults import HANG, PASS, PG_READY_FOR_QUERY, REFUSE, RESET, FaultProxy
from tests.helpers import payload, query, wait_for
from tests.storage_fixtures import make_s3_spec
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
PART = 64 * 1024
SERVER_ENV = {
    "CHUNKSVC_MIN_PART_SIZE": "1",
    "CHUNKSVC_ACCESS_LOG": "/dev/null",
    "CHUNKSVC_DB_POOL_MAX": "4",
    # A killed assembler's completion lease runs out this long after its last renewal; then
    # completing again takes the assembly over.
    "CHUNKSVC_LEASE": "2",
}


# --- fixtures ------------------------------------------------------------------------------------


def pg_socket(url: str) -> str | tuple[str, int]:
    """Where ``url``'s server listens: a Unix socket's path (the embedded server) or (host, port)."""
    params = conninfo_to_dict(url)
    # conninfo_to_dict's values are str | int | None; a URL's host and port come back as strings.
    host, port = str(params.get("host", "localhost")), int(str(params.get("port", 5432)))
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


@pytest.fixture
def pg_proxy(database_url) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the test database, and the URL that goes through it."""
    with FaultProxy(pg_socket(database_url)) as proxy:
        yield proxy, make_conninfo(database_url, host="127.0.0.1", port=str(proxy.port))


@pytest.fixture(params=["file", "s3"])
def spec(request, tmp_path) -> StorageSpec:
    if request.param == "file":
        return StorageSpec(kind="file", root=tmp_path / "storage")
    return make_s3_spec(request.getfixturevalue("radosgw_server"))


@pytest.fixture
def api_key(db) -> str:
    return KeyManager(db).create("chaos")[0]


def reap(db: Database, spec: StorageSpec, **settings):
    storage = open_storage(spec)
    try:
        completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
        settings = {"orphan_grace": 0, "completing_lease": 0, **settings}
        return Reaper(db, storage, completion, ReaperSettings(**settings)).run()
    finally:
        storage.close()


def verdict(request, database_url: str, spec: StorageSpec, sources: dict[str, str], tally: Tally) -> dict[str, int]:
    """The invariants after a fault (recorded for the report, see tests/chaos.py), then asserted.

    Besides the stored state: no server had to heal or re-ask for a part (bytes the service
    was told to keep were never lost in the first place)."""
    storage = open_storage(spec)
    try:
        counts, problems = measure_invariants(database_url, storage, sources)
    finally:
        storage.close()
    counts["healed"] = int(sum(found["healed"] for found in REPAIRS))
    counts["reasked"] = int(sum(found["lost"] for found in REPAIRS))
    if counts["healed"] or counts["reasked"]:
        problems.append(
            f"parts lost and repaired on the way: {counts['healed']} healed by a retry,"
            f" {counts['reasked']} dropped and asked for again"
        )
    record_fault(request.node.name, tally, counts)
    assert not problems, "\n".join(problems)
    return counts


# Repairs each server reported before it stopped (parts healed by a retry, parts dropped and
# asked for again): self-healing would otherwise hide a lost part from the final verdict.
REPAIRS: list[dict[str, float]] = []


@pytest.fixture(autouse=True)
def _no_repairs_yet() -> None:
    REPAIRS.clear()


def repairs(server: harness.Server) -> dict[str, float]:
    """``healed`` and ``lost`` parts, summed over the server's workers, from its /metrics."""
    status, _, body = server.request("GET", "/metrics")
    assert status == 200
    found = {"healed": 0.0, "lost": 0.0}
    for line in body.decode().splitlines():
        if line.startswith('chunksvc_parts_total{outcome="healed"}'):
            found["healed"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("chunksvc_parts_lost_total "):
            found["lost"] += float(line.rsplit(" ", 1)[1])
    return found


@contextlib.contextmanager
def serving(database_url: str, spec: StorageSpec, tmp_path: Path, **env: str) -> Iterator[harness.Server]:
    log = tmp_path / f"gunicorn-{uuid.uuid4().hex[:6]}.log"
    with harness.gunicorn(database_url, spec, env={**SERVER_ENV, **env}, cwd=ROOT, stderr_path=log) as server:
        yield server
        if server.process.poll() is None:  # not if the test stopped it (SIGTERM)
            REPAIRS.append(repairs(server))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unfinished_s3_uploads(spec: StorageSpec) -> list[str]:
    if spec.kind != "s3":
        assert spec.root is not None
        return sorted(path.name for path in (spec.root / ".incoming").iterdir())
    from tests.storage_fixtures import s3_admin

    return [u["Key"] for u in s3_admin(spec).list_multipart_uploads(Bucket=spec.bucket).get("Uploads", [])]


# --- the lost commit reply ------------------------------------------------------------------------


def test_a_part_whose_commit_reply_is_lost_is_not_lost(request, pg_proxy, database_url, db, spec, api_key, tmp_path):
    """PostgreSQL commits the part's row, the reply never arrives: 503, and the bytes stay."""
    proxy, proxied_url = pg_proxy
    data = payload(3 * PART - 5, seed=7)
    tally = Tally()
    with (
        serving(proxied_url, spec, tmp_path, CHUNKSVC_WORKERS="1") as server,
        client(server.url, api_key, tally) as chunksvc,
        client(server.url, api_key, tally, attempts=1) as once,
    ):
        session_id = chunksvc.create_session("x", len(data), part_size=PART, sha256=sha(data))["id"]
        proxy.drop_reply_after(b"chunksvc_record_part(")

        with pytest.raises(ApiError) as first:
            once.put_part(session_id, 2, data[PART : 2 * PART])

        assert (first.value.status, first.value.code) == (503, "database_unavailable")
        assert proxy.replies_dropped == 1
        [(recorded_key,)] = query(
            database_url, "SELECT storage_key FROM upload_parts WHERE session_id = %s", (session_id,)
        )
        storage = open_storage(spec)
        assert storage.exists(recorded_key)  # the v1 bug deleted these bytes here
        retry = chunksvc.put_part(session_id, 2, data[PART : 2 * PART])
        assert retry["received_parts"] == 1 and tally.statuses[200] == 1  # already accepted: 200, counted once
        assert storage.exists(recorded_key)  # and v1 deleted them here, too
        for number in (1, 3):
            chunksvc.put_part(session_id, number, data[(number - 1) * PART : number * PART])
        done = finish(chunksvc, session_id, data, PART)

    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    with storage.open(done["object"]["key"]) as stored:
        assert stored.read() == data
    storage.close()
    assert reap(db, spec).errors == 0
    assert verdict(request, database_url, spec, {session_id: sha(data)}, tally)["stored_keys"] == 1


# --- outages of PostgreSQL and of S3 --------------------------------------------------------------


def chaos(
    proxy: FaultProxy,
    stop: threading.Event,
    steps: list[tuple[str, float]],
    marker: bytes,
    reply_end: bytes,
    rounds: int = 3,
) -> None:
    """Go through fault ``steps`` (mode, seconds) ``rounds`` times, or until ``stop``; once a round,
    drop the reply to the next request containing ``marker``. Then pass traffic: the faults are
    a bounded storm, after which every retry must get through."""
    for _round in range(rounds):
        for index, (mode, seconds) in enumerate(steps):
            if stop.is_set():
                break
            proxy.set_mode(mode)
            if index == 0:
                proxy.drop_reply_after(marker, reply_end=reply_end)
            stop.wait(seconds)
    proxy.set_mode(PASS)


def uploads_through_faults(
    proxy: FaultProxy,
    steps: list[tuple[str, float]],
    marker: bytes,
    reply_end: bytes,
    server_port: int,
    api_key: str,
    tally: Tally,
    count: int,
) -> dict[str, str]:
    """``count`` uploads by 4 threads with the contract's retries while ``proxy`` goes through
    ``steps``; the uploads' ids and their sources' digests."""
    stop = threading.Event()
    faults = threading.Thread(target=chaos, args=(proxy, stop, steps, marker, reply_end))

    def one(index: int) -> tuple[str, str]:
        data = payload(random.randint(2, 6) * PART - random.randint(0, 999), seed=1000 + index)
        return upload(chunksvc, data, PART, parallel=2), sha(data)

    faults.start()
    try:
        with (
            client(f"http://127.0.0.1:{server_port}", api_key, tally) as chunksvc,
            ThreadPoolExecutor(max_workers=4) as pool,
        ):
            return dict(pool.map(one, range(count)))
    finally:
        stop.set()
        faults.join()


def through(spec: StorageSpec, proxy: FaultProxy) -> StorageSpec:
    """The same bucket, reached through ``proxy``."""
    return dataclasses.replace(spec, endpoint=f"127.0.0.1:{proxy.port}")


DB_FAULTS = [(PASS, 0.4), (REFUSE, 0.6), (PASS, 0.4), (RESET, 0.0), (PASS, 0.4), (HANG, 0.8)]


def test_database_outages_during_uploads_lose_nothing(request, pg_proxy, database_url, db, spec, api_key, tmp_path):
    """PostgreSQL refuses, resets and hangs, and a part's commit reply is dropped now and then."""
    proxy, proxied_url = pg_proxy
    tally = Tally()
    with serving(proxied_url, spec, tmp_path, CHUNKSVC_WORKERS="2") as server:
        sources = uploads_through_faults(
            proxy, DB_FAULTS, b"chunksvc_record_part(", PG_READY_FOR_QUERY, server.port, api_key, tally, 24
        )

    assert tally.server_errors > 0 and proxy.replies_dropped > 0, f"no fault reached a request: {tally}"
    assert reap(db, spec).errors == 0
    assert verdict(request, database_url, spec, sources, tally)["completed"] == 24
    # 202: a completion whose database connection was cut after it took the session's completion
    # lease, and that could not give it back, keeps it until it runs out (CHUNKSVC_LEASE, 2 s
    # here); completing again meanwhile answers 202, and the client completes again after it.
    assert set(tally.statuses) <= {200, 201, 202, 409, 503, "connection_error"}, tally


S3_FAULTS = [(PASS, 0.4), (REFUSE, 0.5), (PASS, 0.4), (RESET, 0.0), (PASS, 0.3), (HANG, 0.6)]


def test_storage_outages_during_uploads_lose_nothing(request, database_url, db, api_key, tmp_path, radosgw_server):
    """S3 refuses, resets and hangs, and a stored part's reply is dropped (stored, not recorded)."""
    spec = make_s3_spec(radosgw_server)
    host, port = radosgw_server.rsplit(":", 1)
    tally = Tally()
    with FaultProxy((host, int(port))) as proxy:
        with serving(database_url, through(spec, proxy), tmp_path, CHUNKSVC_WORKERS="2") as server:
            part_put = f"PUT /{spec.bucket}/{layout.PARTS}".encode()
            sources = uploads_through_faults(proxy, S3_FAULTS, part_put, b"HTTP/1.1 ", server.port, api_key, tally, 10)
        assert proxy.replies_dropped > 0

    assert tally.server_errors > 0, f"no fault reached a request: {tally}"
    assert reap(db, spec).errors == 0
    assert verdict(request, database_url, spec, sources, tally)["completed"] == 10
    assert unfinished_s3_uploads(spec) == []


# --- kill -9 and SIGTERM --------------------------------------------------------------------------


def test_a_worker_killed_mid_part_loses_nothing(request, database_url, db, spec, api_key, tmp_path):
    data = payload(2 * 1024 * 1024, seed=3)
    part_size = 1024 * 1024
    tally = Tally()
    with (
        serving(database_url, spec, tmp_path, CHUNKSVC_WORKERS="1", CHUNKSVC_BLOCK_SIZE="4096") as server,
        client(server.url, api_key, tally) as chunksvc,
    ):
        session_id = chunksvc.create_session("k", len(data), part_size=part_size, sha256=sha(data))["id"]
        chunksvc.put_part(session_id, 2, data[part_size:])
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                f"PUT /uploads/sessions/{session_id}/parts/1 HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {api_key}\r\nContent-Length: {part_size}\r\n\r\n".encode()
            )
            sock.sendall(data[: part_size // 2])  # then nothing: the worker is mid-part
            time.sleep(0.3)
            [worker] = server.worker_pids()
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: worker not in server.worker_pids(), "the master to reap the killed worker")
        server.wait_until_serving()
        done = finish(chunksvc, session_id, data, part_size)  # complete says part 1 is missing; resend

    assert done["status"] == "COMPLETED"
    assert reap(db, spec).errors == 0
    counts = verdict(request, database_url, spec, {session_id: sha(data)}, tally)
    assert (counts["sessions"], counts["completed"], counts["stored_keys"]) == (1, 1, 1)
    assert unfinished_s3_uploads(spec) == []


@pytest.mark.parametrize("moment", ["copying", "recording"])
def test_a_worker_killed_mid_assembly_loses_nothing(
    request, moment, pg_proxy, database_url, db, spec, api_key, tmp_path
):
    """Killed while it assembles: in the middle of writing the object (S3: its upload to storage
    stops answering; disk: once the object's temporary file has grown), or after assembling and
    before the outcome is recorded (the database stops answering at mark_completed)."""
    proxy, proxied_url = pg_proxy
    part_size = 1024 * 1024
    # On disk the copy stays in the kernel and is quick: enough bytes that a kill at the first
    # sight of the object's temporary file lands while it is still being written.
    parts = 64 if (moment, spec.kind) == ("copying", "file") else 8
    data = payload(parts * part_size - 1, seed=4)
    tally = Tally()
    with contextlib.ExitStack() as stack:
        serving_spec = spec
        if moment == "copying" and spec.kind == "s3":
            host, port = spec.endpoint.rsplit(":", 1)
            s3_proxy = stack.enter_context(FaultProxy((host, int(port))))
            serving_spec = through(spec, s3_proxy)
        # On disk "copying" is the copy of parts stored apart (CHUNKSVC_IN_PLACE_MIN_PART=0);
        # "recording" is of parts written in place, whose completion copies nothing.
        in_place = "0" if moment == "copying" else "1"
        server = stack.enter_context(
            serving(
                proxied_url,
                serving_spec,
                tmp_path,
                CHUNKSVC_WORKERS="1",
                CHUNKSVC_BLOCK_SIZE="4096",
                CHUNKSVC_IN_PLACE_MIN_PART=in_place,
            )
        )
        chunksvc = stack.enter_context(client(server.url, api_key, tally))
        once = stack.enter_context(client(server.url, api_key, tally, attempts=1))
        session_id = chunksvc.create_session("k", len(data), part_size=part_size, sha256=sha(data))["id"]
        for number in range(1, parts + 1):
            chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
        [worker] = server.worker_pids()
        if moment == "recording":
            proxy.hold_after(b"SET status = 'COMPLETED'")
        elif spec.kind == "s3":
            s3_proxy.hold_after(f"/{spec.bucket}/{layout.object_key(session_id)}?partNumber=2".encode())

        def complete_once() -> None:
            with contextlib.suppress(ApiError):  # the worker dies under it: no answer
                once.complete(session_id)

        completing = threading.Thread(target=complete_once)
        completing.start()
        if moment == "recording":
            wait_for(lambda: proxy.requests_held, "the assembler to record its outcome")
        elif spec.kind == "s3":
            wait_for(lambda: s3_proxy.requests_held, "the object's upload to be under way")
        else:
            wait_for(lambda: os.listdir(spec.root / ".incoming"), "the object's temporary file", interval=0)
        os.kill(worker, signal.SIGKILL)
        completing.join()
        status = query(database_url, "SELECT status FROM upload_sessions WHERE id = %s", (session_id,))[0][0]
        assert status == "COMPLETING"
        if moment == "copying" and spec.kind == "file":
            assert [p for p in (spec.root / ".incoming").iterdir()]  # the half-written object
        server.wait_until_serving()
        done = finish(chunksvc, session_id, data, part_size)  # calling complete again drives it to the end

    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    assert reap(db, spec).errors == 0
    counts = verdict(request, database_url, spec, {session_id: sha(data)}, tally)
    assert (counts["sessions"], counts["completed"], counts["stored_keys"]) == (1, 1, 1)
    assert unfinished_s3_uploads(spec) == []


def test_a_worker_killed_mid_frontier_loses_nothing(request, pg_proxy, database_url, db, spec, api_key, tmp_path):
    """Parts hashed as they arrive (written in place on disk, read back on S3): the worker is
    killed while its hash frontier saves a state (the save never reaches the database). Its
    frontier lease stays behind until it runs out; the parts sent after the restart, and the
    completion, carry the frontier on from the last saved state, and the object is
    byte-identical."""
    proxy, proxied_url = pg_proxy
    part_size, parts = 1024 * 1024, 8
    data = payload(parts * part_size - 1, seed=5)
    tally = Tally()
    with (
        serving(proxied_url, spec, tmp_path, CHUNKSVC_WORKERS="1", CHUNKSVC_IN_PLACE_MIN_PART="1") as server,
        client(server.url, api_key, tally) as chunksvc,
    ):
        session_id = chunksvc.create_session("k", len(data), part_size=part_size, sha256=sha(data))["id"]
        chunksvc.put_part(session_id, 1, data[:part_size])
        wait_for(
            lambda: (
                query(database_url, "SELECT frontier_parts FROM upload_sessions WHERE id = %s", (session_id,))[0][0]
                == 1
            ),
            "the frontier to hash part 1",
        )
        proxy.hold_after(b"SET frontier_parts")
        chunksvc.put_part(session_id, 2, data[part_size : 2 * part_size])
        wait_for(lambda: proxy.requests_held, "the frontier to save its state after part 2")
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: worker not in server.worker_pids(), "the master to reap the killed worker")
        held = query(
            database_url, "SELECT frontier_owner, frontier_parts FROM upload_sessions WHERE id = %s", (session_id,)
        )
        assert held[0][0] is not None and held[0][1] == 1  # a dead holder's lease; part 1's state saved
        server.wait_until_serving()
        for number in range(3, parts + 1):
            chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
        done = finish(chunksvc, session_id, data, part_size)

    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    frontier = query(
        database_url, "SELECT frontier_parts, frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)
    )
    assert frontier == [(parts, None)]
    assert reap(db, spec).errors == 0
    counts = verdict(request, database_url, spec, {session_id: sha(data)}, tally)
    assert (counts["sessions"], counts["completed"], counts["stored_keys"]) == (1, 1, 1)


@pytest.mark.parametrize(
    ("parts_go", "moment"),
    [("copied", "staging"), ("copied", "completing"), ("sent", "sending"), ("sent", "completing")],
)
def test_a_worker_killed_while_it_stages_the_object_loses_nothing(
    request, parts_go, moment, pg_proxy, database_url, db, api_key, tmp_path
):
    """S3 only (a local file system writes parts in place, it stages nothing): parts of 5 MiB go
    into the session's multipart upload, either ``copied`` in as the frontier passes them (no local
    copies: CHUNKSVC_SPILL_DIR empty) or ``sent`` straight in by their requests (the default). The
    worker is killed while a copy is under way (S3 holds its UploadPartCopy: it may still land after
    the kill), while a part's UploadPart is under way, or after the staging became the object and
    before ``COMPLETED`` was recorded (the staging is gone). The restarted worker completes from what
    is left, and the object is byte-identical; no multipart upload is left."""
    spec = make_s3_spec(request.getfixturevalue("radosgw_server"))
    proxy, proxied_url = pg_proxy
    part_size, parts = 5 * 1024 * 1024, 4
    data = payload(parts * part_size - 7, seed=6)
    tally = Tally()
    spill = {"CHUNKSVC_SPILL_DIR": "" if parts_go == "copied" else str(tmp_path / "spill")}
    with contextlib.ExitStack() as stack:
        host, port = spec.endpoint.rsplit(":", 1)
        s3_proxy = stack.enter_context(FaultProxy((host, int(port))))
        server = stack.enter_context(
            serving(
                proxied_url,
                through(spec, s3_proxy),
                tmp_path,
                CHUNKSVC_WORKERS="1",
                CHUNKSVC_IN_PLACE_MIN_PART="1",
                **spill,
            )
        )
        chunksvc = stack.enter_context(client(server.url, api_key, tally))
        once = stack.enter_context(client(server.url, api_key, tally, attempts=1))
        session_id = chunksvc.create_session("k", len(data), part_size=part_size, sha256=sha(data))["id"]
        sending = None
        if moment == "sending":
            # The first request for part 2 sends it as piece 2501 (part 2 of 4 owns 2501-5000):
            # held on its way to S3, and the worker killed under it. Its retry writes 2502.
            s3_proxy.hold_after(f"/{spec.bucket}/{layout.object_key(session_id)}?partNumber=2501&".encode())
            chunksvc.put_part(session_id, 1, data[:part_size])

            def send_once() -> None:
                with contextlib.suppress(ApiError):  # the worker dies under it: no answer
                    once.put_part(session_id, 2, data[part_size : 2 * part_size])

            sending = threading.Thread(target=send_once)
            sending.start()
            wait_for(lambda: s3_proxy.requests_held, "part 2's UploadPart to be held")
        elif moment == "staging":
            # The copy of part 2 into the staging (the only request with this query on this key
            # before completion) is held; parts 1 and 2 are sent, then the worker killed under it.
            s3_proxy.hold_after(f"/{spec.bucket}/{layout.object_key(session_id)}?partNumber=2".encode())
            for number in (1, 2):
                chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
            wait_for(lambda: s3_proxy.requests_held, "the frontier to copy part 2 in")
        else:
            for number in range(1, parts + 1):
                chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
            if parts_go == "copied":
                staged = "SELECT count(staged_token) FROM upload_parts WHERE session_id = %s"
            else:  # sent: staged by their requests; once hashed, the frontier has nothing left
                staged = "SELECT frontier_parts FROM upload_sessions WHERE id = %s"
            wait_for(lambda: query(database_url, staged, (session_id,))[0][0] == parts, "every part staged")
            proxy.hold_after(b"SET status = 'COMPLETED'")

            def complete_once() -> None:
                with contextlib.suppress(ApiError):  # the worker dies under it: no answer
                    once.complete(session_id)

            completing = threading.Thread(target=complete_once)
            completing.start()
            wait_for(lambda: proxy.requests_held, "the assembler to record its outcome")
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: worker not in server.worker_pids(), "the master to reap the killed worker")
        if moment == "completing":
            completing.join()
            # The staging became the object before the kill; the session is still COMPLETING.
            assert query(database_url, "SELECT status FROM upload_sessions WHERE id = %s", (session_id,)) == [
                ("COMPLETING",)
            ]
        server.wait_until_serving()
        if sending is not None:
            sending.join()
            assert query(database_url, "SELECT count(*) FROM upload_parts WHERE session_id = %s", (session_id,)) == [
                (1,)
            ]
            chunksvc.put_part(session_id, 2, data[part_size : 2 * part_size])
            [(key,)] = query(
                database_url,
                "SELECT storage_key FROM upload_parts WHERE session_id = %s AND part_number = 2",
                (session_id,),
            )
            assert key == layout.piece_key(session_id, 2502)  # a piece of its own, not the held one's
        if moment in ("staging", "sending"):
            for number in range(3, parts + 1):
                chunksvc.put_part(session_id, number, data[(number - 1) * part_size : number * part_size])
        done = finish(chunksvc, session_id, data, part_size)

    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    # After the kill at "completing" the staging was gone (it had become the object): forgotten,
    # and the object made again from the parts (copied), or taken as read back (sent: its pieces
    # were the only copy). At "staging" and "sending" it survived, and became the object.
    [(staged_id,)] = query(database_url, "SELECT staged_id FROM upload_sessions WHERE id = %s", (session_id,))
    assert (staged_id is None) == (moment == "completing")
    if (parts_go, moment) == ("sent", "completing"):  # read back, not sent again: the first pieces
        keys = dict(
            query(
                database_url, "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (session_id,)
            )
        )
        assert keys == {n: layout.piece_key(session_id, (n - 1) * 2500 + 1) for n in range(1, parts + 1)}
    assert reap(db, spec).errors == 0
    counts = verdict(request, database_url, spec, {session_id: sha(data)}, tally)
    assert (counts["sessions"], counts["completed"], counts["stored_keys"]) == (1, 1, 1)
    assert unfinished_s3_uploads(spec) == []


def test_sigterm_of_the_master_during_uploads_loses_nothing(request, database_url, db, api_key, tmp_path):
    """Graceful shutdown: requests in flight finish, new ones are refused; a new server resumes."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    data = payload(40 * PART - 11, seed=5)
    acknowledged: list[int] = []
    tally = Tally()
    with (
        serving(database_url, spec, tmp_path, CHUNKSVC_WORKERS="2", CHUNKSVC_BLOCK_SIZE="4096") as server,
        client(server.url, api_key, tally, attempts=1) as once,
    ):
        session_id = once.create_session("t", len(data), part_size=PART, sha256=sha(data))["id"]

        def send(number: int) -> None:
            with contextlib.suppress(ApiError):  # refused once the master stops: not acknowledged
                once.put_part(session_id, number, data[(number - 1) * PART : number * PART])
                acknowledged.append(number)

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(send, number) for number in range(1, 41)]
            wait_for(lambda: len(acknowledged) >= 5, "some parts to be acknowledged")
            server.process.send_signal(signal.SIGTERM)
            for future in futures:
                future.result()
        assert server.process.wait(timeout=60) == 0

    recorded = {
        row[0]
        for row in query(database_url, "SELECT part_number FROM upload_parts WHERE session_id = %s", (session_id,))
    }
    assert set(acknowledged) <= recorded  # every 2xx survived the shutdown
    assert 5 <= len(acknowledged) < 40, acknowledged  # the shutdown really cut the upload short
    with (
        serving(database_url, spec, tmp_path, CHUNKSVC_WORKERS="1") as server,
        client(server.url, api_key, tally) as chunksvc,
    ):
        done = finish(chunksvc, session_id, data, PART)
    assert done["status"] == "COMPLETED"
    assert reap(db, spec).errors == 0
    verdict(request, database_url, spec, {session_id: sha(data)}, tally)


# --- load with invariants, two hosts --------------------------------------------------------------


def test_load_on_two_hosts_keeps_every_invariant(request, database_url, db, spec, api_key, tmp_path):
    """Many threads over two hosts: retries, same-part races with different bytes, aborts, completes."""
    tally = Tally()
    sources: dict[str, str] = {}
    lock = threading.Lock()
    outcomes: dict[str, int] = {"completed": 0, "aborted": 0, "raced_lost": 0}

    def session_work(index: int, hosts: list) -> None:
        rng = random.Random(index)
        data = payload(rng.randint(1, 5) * PART - rng.randint(0, 500), seed=5000 + index)
        count = -(-len(data) // PART)
        session_id = hosts[index % 2].create_session("l", len(data), part_size=PART, sha256=sha(data))["id"]
        chunks = {n: data[(n - 1) * PART : n * PART] for n in range(1, count + 1)}
        rogue = rng.random() < 0.2 and count > 1  # another writer races one part with other bytes
        raced = rng.randint(1, count)

        def put(number: int, body: bytes) -> str:
            try:
                hosts[number % 2].put_part(session_id, number, body)  # the parts go to both hosts
                return "accepted"
            except ApiError as error:
                return error.code

        with ThreadPoolExecutor(max_workers=3) as parts:
            jobs = [parts.submit(put, n, chunks[n]) for n in rng.sample(sorted(chunks), k=count)]
            if rogue:
                jobs.append(parts.submit(put, raced, payload(len(chunks[raced]), seed=-index - 1)))
            if rng.random() < 0.3:  # a retry of an acknowledged part: 200, counted once
                jobs.append(parts.submit(put, 1, chunks[1]))
            outcomes_of_parts = [job.result() for job in jobs]
        assert set(outcomes_of_parts) <= {"accepted", "part_conflict"}, outcomes_of_parts
        lost_race = "part_conflict" in outcomes_of_parts[:count]
        if lost_race or rng.random() < 0.15:
            hosts[index % 2].abort(session_id)
            with lock:
                outcomes["raced_lost" if lost_race else "aborted"] += 1
            return
        try:
            hosts[(index + 1) % 2].complete(session_id)
        except ApiError as error:
            assert rogue and error.code == "checksum_mismatch", error  # the rogue won a race unseen
            with lock:
                outcomes["raced_lost"] += 1
            return
        with lock:
            sources[session_id] = sha(data)
            outcomes["completed"] += 1

    sessions = 120 if spec.kind == "file" else 48
    with (
        serving(database_url, spec, tmp_path, CHUNKSVC_WORKERS="2") as first,
        serving(database_url, spec, tmp_path, CHUNKSVC_WORKERS="2") as second,
        client(first.url, api_key, tally) as one,
        client(second.url, api_key, tally) as other,
        ThreadPoolExecutor(max_workers=12) as pool,
    ):
        for future in [pool.submit(session_work, index, [one, other]) for index in range(sessions)]:
            future.result()

    assert tally.server_errors == 0, tally
    assert outcomes["completed"] > sessions // 2, outcomes
    assert reap(db, spec).errors == 0
    report = verdict(request, database_url, spec, sources, tally)
    assert report["completed"] == outcomes["completed"] and report["stored_keys"] == outcomes["completed"]


# --- slow clients ---------------------------------------------------------------------------------


def test_stalled_bodies_are_abandoned_and_free_their_threads(request, database_url, db, api_key, tmp_path):
    """One worker of two threads, two clients that stall mid-body: an honest upload still gets
    through once CHUNKSVC_BODY_TIMEOUT has abandoned them, and the stalled parts leave nothing."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    data = payload(2 * PART, seed=6)
    env = {"CHUNKSVC_WORKERS": "1", "CHUNKSVC_THREADS": "2", "CHUNKSVC_BODY_TIMEOUT": "2"}
    tally = Tally()
    with serving(database_url, spec, tmp_path, **env) as server, client(server.url, api_key, tally) as chunksvc:
        session_id = chunksvc.create_session("s", len(data), part_size=PART, sha256=sha(data))["id"]
        stalled = []
        for number in (1, 2):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(
                f"PUT /uploads/sessions/{session_id}/parts/{number} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {api_key}\r\nContent-Length: {PART}\r\n\r\n".encode()
            )
            sock.sendall(data[:100])
            stalled.append(sock)
        try:
            # Both threads are held by stalled bodies; this request waits for one to be freed.
            started = time.monotonic()
            done = upload(chunksvc, data, PART)
            waited = time.monotonic() - started
            answers = [sock.recv(65536) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()

    assert waited >= 1.5, waited  # it did wait for the body timeout (2 s), so the threads were held
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 400") and b'"incomplete_body"' in answer, answer[:300]
    assert reap(db, spec).errors == 0
    verdict(request, database_url, spec, {done: sha(data)}, tally)
    assert list((spec.root / ".incoming").iterdir()) == []
