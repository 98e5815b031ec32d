"""The reaper on a real PostgreSQL and both storages: expiry, purging, orphans, unfinished writes,
re-driven completions, dry runs, two reapers at once, storage failures, the CLI, and a gunicorn
worker killed in the middle of an upload.

States a crash or a failed cleanup would leave are set up with plain SQL on the test database.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import webtest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from chunksvc.app import create_app
from chunksvc.config import Config, StorageSpec
from chunksvc.db import Database
from chunksvc.errors import ConfigError
from chunksvc.metrics import Metrics
from chunksvc.services import layout
from chunksvc.services.auth import Authenticator
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import (
    LIST_LIMIT,
    LIVE_KEY_MIN_AGE,
    PeriodicReaper,
    Reaper,
    ReaperSettings,
    ReapResult,
)
from chunksvc.services.uploads import UploadService
from chunksvc.storage import Storage, open_storage
from tests.conftest import TEST_LIMITS
from tests.helpers import (
    complete,
    create,
    hold_completion_lease,
    payload,
    put_part,
    query,
    sha,
    split,
    uploaded,
    wait_for,
)
from tests.storage_fixtures import make_s3_spec, s3_admin
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
PART = 1024
OLD = 2 * 3600  # seconds: older than the grace period the tests give (one hour)


# --- helpers ----------------------------------------------------------------------------------


def status(database_url: str, session_id) -> str:
    return query(database_url, "SELECT status FROM upload_sessions WHERE id = %s", (session_id,))[0][0]


def purged(database_url: str, session_id) -> bool:
    return query(database_url, "SELECT purged_at IS NOT NULL FROM upload_sessions WHERE id = %s", (session_id,))[0][0]


def part_keys(database_url: str, session_id) -> list[str]:
    rows = query(
        database_url, "SELECT storage_key FROM upload_parts WHERE session_id = %s ORDER BY part_number", (session_id,)
    )
    return [row[0] for row in rows]


def make_overdue(database_url: str, session_id) -> None:
    query(
        database_url, "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (session_id,)
    )


def force_status(database_url: str, session_id, new_status: str, age: str = "0 seconds") -> None:
    """Set a status as a dead worker or a failed cleanup leaves it (``purged_at`` stays unset)."""
    query(
        database_url,
        "UPDATE upload_sessions SET status = %s, updated_at = now() - %s::interval WHERE id = %s",
        (new_status, age, session_id),
    )


def stall_completion(database_url: str, session_id) -> None:
    """COMPLETING for an hour, and its assembler died: the completion lease it left has run out."""
    force_status(database_url, session_id, "COMPLETING", "1 hour")
    query(
        database_url,
        "UPDATE upload_sessions SET completion_owner = gen_random_uuid(),"
        " completion_lease_until = now() - interval '59 minutes' WHERE id = %s",
        (session_id,),
    )


def uploaded_in_parts(app: webtest.TestApp, auth: dict, parts: int = 2, seed: int = 0) -> tuple[str, bytes]:
    """A session of ``parts`` parts (the last one short), every part uploaded; ``(id, data)``."""
    return uploaded(app, auth, parts * PART - 100, part_size=PART, seed=seed)


def stored(storage: Storage, prefix: str = "") -> list[str]:
    return sorted(listed.key for listed in storage.list_keys(prefix))


def write(storage: Storage, key: str, data: bytes = b"stray bytes") -> None:
    storage.write(key, io.BytesIO(data), len(data), 4096)


def read(storage: Storage, key: str) -> bytes:
    with storage.open(key) as stored_object:
        return stored_object.read()


def leave_unfinished_write(spec: StorageSpec, key: str) -> None:
    """What a writer killed mid-write leaves: a temporary file, or an unfinished multipart upload."""
    if spec.kind == "file":
        assert spec.root is not None
        (spec.root / ".incoming" / uuid.uuid4().hex).write_bytes(b"half a part")
    else:
        s3 = s3_admin(spec)
        upload_id = s3.create_multipart_upload(Bucket=spec.bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=spec.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"half a part")


def unfinished_writes(spec: StorageSpec) -> list[str]:
    if spec.kind == "file":
        assert spec.root is not None
        return sorted(path.name for path in (spec.root / ".incoming").iterdir())
    uploads = s3_admin(spec).list_multipart_uploads(Bucket=spec.bucket).get("Uploads", [])
    return sorted(upload["Key"] for upload in uploads)


def backdate_files(spec: StorageSpec, keys: list[str], seconds: int = OLD) -> None:
    """On disk, make stored keys and unfinished writes look ``seconds`` old (S3 dates cannot be set)."""
    then = time.time() - seconds
    assert spec.root is not None
    for path in [spec.root / key for key in keys] + list((spec.root / ".incoming").iterdir()):
        os.utime(path, (then, then))


def done(result: ReapResult) -> dict[str, int]:
    """The non-zero counts of a run, errors included."""
    return {name: count for name, count in {**result.work(), "errors": result.errors}.items() if count}


def new_reaper(db: Database, storage: Storage, clock=None, **settings) -> Reaper:
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    return Reaper(db, storage, completion, ReaperSettings(**settings), **({"clock": clock} if clock else {}))


@pytest.fixture
def reap(db, storage):
    """One reaper run on the test database and storage (``clock``: what it takes for now)."""
    return lambda clock=None, **settings: new_reaper(db, storage, clock, **settings).run()


# --- expiry -----------------------------------------------------------------------------------


def test_expire_stores_expired_on_overdue_open_sessions_only(app, auth, reap, database_url, storage):
    fresh = create(app, auth, size=10).json["id"]
    overdue_init = create(app, auth, size=10).json["id"]
    overdue_started, _ = uploaded_in_parts(app, auth)
    overdue_aborted = create(app, auth, size=10).json["id"]
    app.delete(f"/uploads/sessions/{overdue_aborted}", headers=auth, status=204)
    for session_id in (overdue_init, overdue_started, overdue_aborted):
        make_overdue(database_url, session_id)

    result = reap()

    # The two newly EXPIRED sessions are purged in the same run; the abort purged its own.
    assert done(result) == {"expired": 2, "ended_bytes_removed": 2}
    assert [status(database_url, s) for s in (fresh, overdue_init, overdue_started, overdue_aborted)] == [
        "INIT",
        "EXPIRED",
        "EXPIRED",
        "ABORTED",
    ]
    assert app.get(f"/uploads/sessions/{overdue_started}", headers=auth).json["status"] == "EXPIRED"
    assert stored(storage) == []
    assert done(reap()) == {}


def test_a_session_locked_by_a_request_is_skipped_not_waited_for(app, auth, reap, database_url):
    session_id = create(app, auth, size=10).json["id"]
    make_overdue(database_url, session_id)
    outcome: list[ReapResult] = []
    # A part upload recording its part holds the session's row lock like this.
    with psycopg.connect(database_url) as request:
        request.execute("SELECT 1 FROM upload_sessions WHERE id = %s FOR UPDATE", (session_id,))
        runner = threading.Thread(target=lambda: outcome.append(reap()))
        runner.start()
        runner.join(timeout=120)  # only to end a hang; skipping a locked row takes no time at all
        assert not runner.is_alive(), "the reaper waited for a row lock held by a request"
    assert done(outcome[0]) == {}
    assert done(reap()) == {"expired": 1, "ended_bytes_removed": 1}


# --- purging ----------------------------------------------------------------------------------


def test_purge_removes_what_each_ended_session_left(app, auth, reap, database_url, storage):
    aborted, _ = uploaded_in_parts(app, auth, seed=1)
    force_status(database_url, aborted, "ABORTED")  # the abort's own removal failed
    expired, _ = uploaded_in_parts(app, auth, seed=2)
    force_status(database_url, expired, "EXPIRED")
    failed, _ = uploaded_in_parts(app, auth, seed=3)
    force_status(database_url, failed, "FAILED")
    write(storage, layout.object_key(failed))  # the object of a failed assembly, not removed
    completed, data = uploaded_in_parts(app, auth, seed=4)
    complete(app, auth, completed)
    write(storage, part_keys(database_url, completed)[0])  # completion died before removing its parts

    result = reap()

    # The completed session loses its parts only; the others lose their object too.
    assert done(result) == {"ended_bytes_removed": 3, "completed_parts_removed": 1}
    assert stored(storage) == [layout.object_key(completed)]
    assert read(storage, layout.object_key(completed)) == data
    assert all(purged(database_url, s) for s in (aborted, expired, failed, completed))
    assert done(reap()) == {}


def test_an_abort_that_removed_its_bytes_is_not_purged_again(app, auth, reap, database_url, storage):
    session_id, _ = uploaded_in_parts(app, auth)
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert purged(database_url, session_id)
    assert done(reap()) == {}


# --- orphans and unfinished writes ------------------------------------------------------------


def test_orphans_are_removed_once_older_than_the_grace_period(app, auth, reap, database_url, storage):
    live, _ = uploaded_in_parts(app, auth, seed=1)  # still open: its recorded parts stay
    aborted = create(app, auth, size=10).json["id"]
    app.delete(f"/uploads/sessions/{aborted}", headers=auth, status=204)
    completed, data = uploaded_in_parts(app, auth, seed=2)
    complete(app, auth, completed)
    assert done(reap()) == {"completed_parts_removed": 1}  # the completed session: now nothing is pending
    ghost = uuid.uuid4()  # no such session
    orphans = [
        layout.part_key(ghost),
        layout.object_key(ghost),
        layout.part_key(aborted),  # a writer that outlived the abort
        layout.object_key(aborted),  # an assembler that outlived the abort
        layout.part_key(completed),
    ]
    unrecorded = layout.part_key(live)  # bytes kept when their record's outcome was unknown
    kept = [
        unrecorded,
        *part_keys(database_url, live),  # recorded: the session needs them
        f"{layout.PARTS}not-a-session/x",  # not a key chunksvc makes
    ]
    for key in orphans + kept:
        write(storage, key)
    before = stored(storage)

    assert done(reap(orphan_grace=3600)) == {}
    assert stored(storage) == before

    assert done(reap(orphan_grace=0)) == {"orphans_removed": len(orphans)}
    assert stored(storage) == sorted(set(before) - set(orphans))
    assert read(storage, layout.object_key(completed)) == data
    assert done(reap(orphan_grace=0)) == {}

    # A live session's unrecorded bytes go only once a day old, whatever the grace period: its
    # record might still be on its way.
    a_day_later = lambda: datetime.now(UTC) + timedelta(seconds=LIVE_KEY_MIN_AGE + 60)  # noqa: E731
    assert done(reap(clock=a_day_later, orphan_grace=0)) == {"orphans_removed": 1}
    assert stored(storage) == sorted(set(before) - {*orphans, unrecorded})
    assert set(part_keys(database_url, live)) <= set(stored(storage))


def test_unfinished_writes_are_swept_once_older_than_the_grace_period(reap, storage_spec, storage):
    leave_unfinished_write(storage_spec, layout.part_key(uuid.uuid4()))
    foreign = []
    if storage_spec.kind == "s3":
        foreign = ["backups/not-ours"]  # a multipart upload outside chunksvc's prefixes
        leave_unfinished_write(storage_spec, foreign[0])
    assert len(unfinished_writes(storage_spec)) == 1 + len(foreign)

    # A young one is left alone (radosgw dates an upload when it begins; moto dated all 2010-11-10).
    assert done(reap(orphan_grace=3600)) == {}
    assert len(unfinished_writes(storage_spec)) == 1 + len(foreign)

    assert done(reap(orphan_grace=0)) == {"incomplete_swept": 1}
    assert unfinished_writes(storage_spec) == foreign


# --- completions ------------------------------------------------------------------------------


def test_a_completion_whose_assembler_died_is_driven_to_the_end(app, auth, reap, db, database_url, storage):
    stuck, data = uploaded_in_parts(app, auth, parts=3, seed=1)
    stall_completion(database_url, stuck)
    recent, _ = uploaded_in_parts(app, auth, seed=2)
    force_status(database_url, recent, "COMPLETING")  # within the lease: its client may retry itself
    busy, _ = uploaded_in_parts(app, auth, seed=3)
    stall_completion(database_url, busy)

    hold_completion_lease(database_url, busy, 60)  # a live assembler holds the completion lease
    result = reap()

    assert done(result) == {"completions_redriven": 1, "completed_parts_removed": 1}
    session = app.get(f"/uploads/sessions/{stuck}", headers=auth).json
    assert session["status"] == "COMPLETED"
    assert (session["object"]["size"], session["object"]["sha256"]) == (len(data), sha(data))
    assert read(storage, session["object"]["key"]) == data
    assert stored(storage, layout.parts_prefix(stuck)) == []
    assert (status(database_url, recent), status(database_url, busy)) == ("COMPLETING", "COMPLETING")


def test_a_stuck_completion_whose_part_bytes_are_gone_is_reopened_for_the_client(
    app, auth, reap, database_url, storage
):
    stuck, data = uploaded_in_parts(app, auth, parts=3)
    stall_completion(database_url, stuck)
    lost = part_keys(database_url, stuck)[1]
    storage.delete([lost])

    assert done(reap()) == {"completions_reopened": 1}
    session = app.get(f"/uploads/sessions/{stuck}", headers=auth).json
    counts = (session["status"], session["received_parts"], session["received_bytes"])
    assert counts == ("IN_PROGRESS", 2, len(data) - PART)
    assert stored(storage, layout.parts_prefix(stuck)) == sorted(key for key in part_keys(database_url, stuck))
    assert lost not in part_keys(database_url, stuck)

    # The client's ordinary resume: complete lists the part, it is sent again, complete succeeds.
    missing = complete(app, auth, stuck, status=409).json
    assert (missing["code"], missing["missing_parts"], missing["missing_count"]) == ("parts_missing", [2], 1)
    put_part(app, auth, stuck, 2, split(data, PART)[1])
    assert complete(app, auth, stuck).json["status"] == "COMPLETED"
    assert read(storage, layout.object_key(stuck)) == data


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_reports_and_changes_nothing(app, auth, reap, database_url, storage_spec, storage):
    overdue, _ = uploaded_in_parts(app, auth, seed=1)
    make_overdue(database_url, overdue)
    aborted, _ = uploaded_in_parts(app, auth, seed=2)
    force_status(database_url, aborted, "ABORTED")
    stuck, _ = uploaded_in_parts(app, auth, seed=3)
    stall_completion(database_url, stuck)
    ghost = layout.part_key(uuid.uuid4())
    write(storage, ghost)
    unfinished = layout.part_key(uuid.uuid4())
    leave_unfinished_write(storage_spec, unfinished)

    def snapshot():
        sessions = query(database_url, "SELECT id, status, updated_at, purged_at FROM upload_sessions ORDER BY id")
        return sessions, stored(storage), unfinished_writes(storage_spec)

    before = snapshot()
    dry = reap(orphan_grace=0, dry_run=True)

    # Each phase is counted against the present state: the sessions this run would expire or
    # complete are not counted again as purged.
    assert done(dry) == {
        "expired": 1,
        "ended_bytes_removed": 1,
        "orphans_removed": 1,
        "incomplete_swept": 1,
        "completions_redriven": 1,
    }
    assert dry.summary().startswith(
        "reap (dry run, nothing changed), would be: 1 overdue session expired; stored parts removed for 1 ended"
        " session (0 completed, whose objects are kept; 1 aborted, expired or failed, with any object);"
    )
    assert snapshot() == before
    # What it would touch, by session id and storage key.
    assert dry.touched["expired"] == [overdue]
    assert dry.touched["completions_redriven"] == [stuck]
    assert dry.touched["ended_bytes_removed"] == [f"{aborted} ABORTED: {layout.parts_prefix(aborted)} (2 keys)"]
    assert dry.touched["orphans_removed"] == [ghost]
    [sweep] = dry.touched["incomplete_swept"]
    assert sweep.startswith(".incoming/" if storage_spec.kind == "file" else f"{unfinished} (multipart upload ")

    assert done(reap(orphan_grace=0)) == {
        "expired": 1,
        "ended_bytes_removed": 2,
        "completed_parts_removed": 1,
        "orphans_removed": 1,
        "incomplete_swept": 1,
        "completions_redriven": 1,
    }


def test_a_listing_names_the_first_items_of_each_kind_and_counts_the_rest():
    result = ReapResult(dry_run=True, expired=25, completed_parts_removed=1)
    for number in range(25):
        result.note("expired", f"session-{number}")
    result.note("completed_parts_removed", "s COMPLETED: parts/s/ (3 keys) (objects/s kept)")

    lines = result.listing()

    assert lines[0] == "expire (overdue INIT/IN_PROGRESS sessions): 25"
    assert lines[1 : LIST_LIMIT + 1] == [f"  session-{number}" for number in range(LIST_LIMIT)]
    assert lines[LIST_LIMIT + 1 :] == [
        f"  ... and {25 - LIST_LIMIT} more",
        "purge the stored parts of COMPLETED sessions (their object is kept): 1",
        "  s COMPLETED: parts/s/ (3 keys) (objects/s kept)",
    ]
    assert ReapResult(dry_run=True).listing() == []


# --- several reapers --------------------------------------------------------------------------


def test_two_reapers_at_once_do_each_piece_of_work_once(app, auth, db, database_url, storage_spec, storage):
    expiring = [uploaded_in_parts(app, auth, parts=1, seed=i)[0] for i in range(24)]
    aborted = [uploaded_in_parts(app, auth, parts=1, seed=100 + i)[0] for i in range(8)]
    stuck = [uploaded_in_parts(app, auth, parts=2, seed=200 + i) for i in range(4)]
    # An upload token on each: those of the ended sessions go (once), the completed ones' stay.
    for session_id in [*expiring, *aborted, *(session_id for session_id, _ in stuck)]:
        app.post(f"/uploads/sessions/{session_id}/tokens", headers=auth, status=201)
    for session_id in expiring:
        make_overdue(database_url, session_id)
    for session_id in aborted:
        force_status(database_url, session_id, "ABORTED")
    for session_id, _ in stuck:
        stall_completion(database_url, session_id)
    ghosts = [layout.part_key(uuid.uuid4()) for _ in range(10)]
    for key in ghosts:
        write(storage, key)
    for _ in range(5):
        leave_unfinished_write(storage_spec, layout.part_key(uuid.uuid4()))
    if storage_spec.kind == "file":
        # On disk the re-driven assemblies write through .incoming while the other reaper sweeps
        # it: the leftovers are made old and the grace period keeps the live writes safe.
        backdate_files(storage_spec, ghosts)
        grace = 3600
    else:
        grace = 0  # small assemblies on S3 are single PUTs: no multipart upload to sweep by mistake

    barrier = threading.Barrier(2)

    def one_reaper(_: int) -> ReapResult:
        db = Database(database_url, max_size=4)
        own_storage = open_storage(storage_spec)
        try:
            reaper = new_reaper(db, own_storage, batch_size=3, orphan_grace=grace)
            barrier.wait()
            return reaper.run()
        finally:
            own_storage.close()
            db.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one_reaper, range(2)))

    totals = {name: sum(done(result).get(name, 0) for result in results) for name in ("errors", *results[0].work())}
    assert totals == {
        "errors": 0,
        "expired": 24,
        "ended_bytes_removed": 24 + 8,
        "completed_parts_removed": 4,  # the re-driven sessions are purged after completing
        "orphans_removed": 10,
        "incomplete_swept": 5,
        "completions_redriven": 4,
        "completions_reopened": 0,
        "completions_failed": 0,
        "webhook_events_pruned": 0,  # no endpoints here: tests/test_webhooks_retention.py prunes events
        "tokens_removed": 24 + 8,
    }, [result.summary() for result in results]
    with psycopg.connect(database_url, autocommit=True) as conn:
        kept = {row[0] for row in conn.execute("SELECT session_id FROM upload_tokens")}
    assert kept == {uuid.UUID(session_id) for session_id, _ in stuck}
    assert stored(storage, layout.PARTS) == []
    assert stored(storage, layout.OBJECTS) == sorted(layout.object_key(session_id) for session_id, _ in stuck)
    assert all(read(storage, layout.object_key(session_id)) == data for session_id, data in stuck)
    assert unfinished_writes(storage_spec) == []
    assert query(
        database_url,
        "SELECT count(*) FILTER (WHERE status IN ('INIT', 'IN_PROGRESS', 'COMPLETING')),"
        " count(*) FILTER (WHERE purged_at IS NULL) FROM upload_sessions",
    ) == [(0, 0)]
    assert done(new_reaper(db, storage, orphan_grace=grace).run()) == {}


# --- failures ---------------------------------------------------------------------------------


def test_storage_failures_are_counted_and_left_for_the_next_run(db, database_url, keys, s3_retries_without_backoff):
    dead = make_s3_spec(f"127.0.0.1:{harness.free_port()}", create=False)  # nothing listens there
    storage = open_storage(dead)
    uploads = UploadService(db, storage, TEST_LIMITS, 64 * 1024)
    client = Authenticator(db).authenticate(f"Bearer {keys.create('alice')[0]}")
    session, _ = uploads.create_session(client, {"filename": "f.bin", "size": 10}, None)
    force_status(database_url, session.id, "ABORTED")

    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    result = Reaper(db, storage, completion, ReaperSettings(orphan_grace=0)).run()

    # The session's purge, the orphan sweep and the unfinished-write sweep each failed.
    assert done(result) == {"errors": 3}
    assert result.summary().endswith("; 3 errors")
    assert not purged(database_url, session.id)


# --- the command line -------------------------------------------------------------------------


def run_reap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunksvc", "reap", *args],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def file_app(database_url, db, file_spec):
    storage = open_storage(file_spec)
    config = Config(database_url=database_url, storage=file_spec, limits=TEST_LIMITS, block_size=64 * 1024)
    yield webtest.TestApp(create_app(config, db=db, storage=storage)), storage
    storage.close()


def test_cli_lists_a_dry_run_prints_one_line_and_exits_0_when_all_was_cleaned(file_app, auth, database_url, file_spec):
    app, storage = file_app
    overdue, _ = uploaded_in_parts(app, auth, seed=1)
    make_overdue(database_url, overdue)
    completed, data = uploaded_in_parts(app, auth, seed=2)
    complete(app, auth, completed)
    ghost = layout.part_key(uuid.uuid4())
    write(storage, ghost)
    env = {"DATABASE_URL": database_url, "CHUNKSVC_STORAGE_URL": f"file://{file_spec.root}"}

    dry = run_reap(env, "--dry-run", "--orphan-grace", "0")
    assert (dry.returncode, dry.stdout.splitlines()) == (
        0,
        [
            "reap --dry-run: what a pass would do now (nothing was changed)",
            "expire (overdue INIT/IN_PROGRESS sessions): 1",
            f"  {overdue}",
            "purge the stored parts of COMPLETED sessions (their object is kept): 1",
            f"  {completed} COMPLETED: {layout.parts_prefix(completed)} (0 keys) ({layout.object_key(completed)} kept)",
            "remove orphaned keys (no session needs them): 1",
            f"  {ghost}",
            "reap (dry run, nothing changed), would be: 1 overdue session expired; stored parts removed for 1 ended"
            " session (1 completed, whose objects are kept; 0 aborted, expired or failed, with any object);"
            " 1 orphaned key removed; 0 unfinished writes swept; 0 stalled completions re-driven;"
            " 0 completion events pruned; 0 errors",
        ],
    ), dry.stderr
    assert status(database_url, overdue) == "IN_PROGRESS"

    real = run_reap(env, "--orphan-grace", "0", "--batch-size", "1", "--completing-lease", "60")
    assert (real.returncode, real.stdout) == (
        0,
        (
            "reap: 1 overdue session expired; stored parts removed for 2 ended sessions (1 completed, whose objects"
            " are kept; 1 aborted, expired or failed, with any object); 1 orphaned key removed; 0 unfinished writes"
            " swept; stalled completions re-driven: 0 completed, 0 reopened for lost parts, 0 failed;"
            " 0 completion events pruned; 0 errors\n"
        ),
    ), real.stderr
    assert stored(storage) == [layout.object_key(completed)]
    assert read(storage, layout.object_key(completed)) == data
    assert status(database_url, overdue) == "EXPIRED"

    assert run_reap(env, "--batch-size", "0").returncode == 2  # refused by the argument parser


def test_cli_exits_1_when_something_could_not_be_cleaned(database_url):
    port = harness.free_port()  # nothing listens there
    env = {"DATABASE_URL": database_url, "CHUNKSVC_STORAGE_URL": f"s3+http://key:top-secret@127.0.0.1:{port}/chunks"}

    result = run_reap(env)

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("reap: 0 overdue sessions expired")
    assert result.stdout.endswith("; 2 errors\n")  # the two sweeps
    assert "unreachable" in result.stderr
    assert "top-secret" not in result.stdout + result.stderr


# --- the server's own reaper (CHUNKSVC_REAP_INTERVAL) ----------------------------------------


def test_reap_interval_setting():
    assert Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x"}).reap_interval == 300
    assert Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_REAP_INTERVAL": "0"}).reap_interval == 0
    with pytest.raises(ConfigError, match="CHUNKSVC_REAP_INTERVAL"):
        Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_REAP_INTERVAL": "-1"})


class BlockingReaper:
    """Stands in for a ``Reaper`` whose pass lasts until the test lets it end."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.finish = threading.Event()

    def run(self, stopping: Callable[[], bool] = lambda: False) -> ReapResult:
        self.running.set()
        assert self.finish.wait(60)
        return ReapResult()


def test_a_pass_cut_short_by_shutdown_is_not_counted_as_failed(database_url, storage):
    """worker_exit stops the reaper, then closes the pool under a pass still running: the phases
    that fail then are no fault to alert on (chunksvc_reaper_runs_total{outcome="failed"})."""
    closed = Database(database_url, max_size=1)
    closed.open()
    closed.close()  # as worker_exit leaves it

    def reap(stopping: Callable[[], bool]) -> tuple[int, tuple[float, float]]:
        metrics = Metrics(CollectorRegistry())
        completion = CompletionService(closed, storage, TEST_LIMITS, 64 * 1024)
        result = Reaper(closed, storage, completion, ReaperSettings(), events=metrics).run(stopping=stopping)
        return result.errors, tuple(metrics.reaper_runs.labels(o)._value.get() for o in ("succeeded", "failed"))

    asked = []
    # The shutdown comes while the first phase runs (and fails): the pass ends there, uncounted.
    assert reap(lambda: asked.append(1) or len(asked) > 1) == (1, (0, 0))
    # The same failures without a shutdown are a failed run.
    errors, runs = reap(lambda: False)
    assert errors >= 1 and runs == (0, 1)


def test_one_periodic_pass_at_a_time_across_processes_the_others_skip_their_turn(database_url):
    hosts = [Database(database_url, max_size=2) for _ in range(2)]  # two processes, each its own pool
    metrics = [Metrics(CollectorRegistry()) for _ in hosts]
    slow = BlockingReaper()
    first = PeriodicReaper(hosts[0], slow, 300, metrics[0])
    second = PeriodicReaper(hosts[1], BlockingReaper(), 300, metrics[1])
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(first.run_once)
            assert slow.running.wait(30)
            started = time.monotonic()
            assert second.run_once() is None  # skipped at once, not waited for
            assert time.monotonic() - started < 5
            slow.finish.set()
            assert running.result(timeout=30) == ReapResult()
    finally:
        for db in hosts:
            db.close()
    assert metrics[1].reaper_skips._value.get() == 1
    assert metrics[0].reaper_skips._value.get() == 0


def test_the_periodic_reaper_runs_passes_on_its_turns_and_counts_them(app, auth, db, database_url, storage):
    session_id, _ = uploaded_in_parts(app, auth)
    make_overdue(database_url, session_id)
    metrics = Metrics(CollectorRegistry())
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    periodic = PeriodicReaper(db, Reaper(db, storage, completion, ReaperSettings(), events=metrics), 1, metrics)
    runs = lambda outcome: metrics.reaper_runs.labels(outcome)._value.get()  # noqa: E731
    assert (runs("succeeded"), runs("failed")) == (0, 0)  # there from the start, as 0
    periodic.start()
    try:
        wait_for(lambda: runs("succeeded") >= 1, "a periodic reaper pass")
    finally:
        periodic.stop()
    assert status(database_url, session_id) == "EXPIRED"
    assert purged(database_url, session_id)
    assert metrics.reaper_work.labels("expired")._value.get() == 1
    assert metrics.reaper_work.labels("ended_bytes_removed")._value.get() == 1
    assert PeriodicReaper(db, BlockingReaper(), 0).start() is None  # 0: no thread, nothing runs


@pytest.fixture
def reaping_server(gunicorn_server, database_url, tmp_path):
    """gunicorn with three workers whose periodic reapers take a turn every second, on the test's
    database."""
    env = {
        "CHUNKSVC_WORKERS": "3",
        "CHUNKSVC_REAP_INTERVAL": "1",
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
        "CHUNKSVC_MIN_PART_SIZE": "1",
    }
    with gunicorn_server(
        StorageSpec(kind="file", root=tmp_path / "storage"),
        env,
        name="periodic",
        stderr_path=tmp_path / "gunicorn.log",
        database_url=database_url,
    ) as served:
        yield served.server, served.key


def test_the_servers_own_reaper_lands_in_metrics_and_does_each_piece_of_work_once(reaping_server, database_url):
    gunicorn, key = reaping_server
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    overdue = []
    for _ in range(3):
        code, _, body = gunicorn.request(
            "POST", "/uploads/sessions", json.dumps({"filename": "f", "size": 10}), headers
        )
        assert code == 201
        overdue.append(json.loads(body)["id"])
        make_overdue(database_url, overdue[-1])

    def scrape() -> dict:
        text = gunicorn.request("GET", "/metrics")[2].decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def work(samples: dict, kind: str) -> float:
        return samples.get(("chunksvc_reaper_work_total", (("kind", kind),)), 0)

    wait_for(
        lambda: all(status(database_url, s) == "EXPIRED" and purged(database_url, s) for s in overdue),
        "the server's reaper to expire and purge the sessions",
    )
    wait_for(lambda: work(scrape(), "ended_bytes_removed") >= 3, "the pass to be counted")
    time.sleep(2.5)  # a few more turns of three workers: none may do the work again
    samples = scrape()
    assert samples[("chunksvc_reaper_runs_total", (("outcome", "succeeded"),))] >= 2
    assert samples[("chunksvc_reaper_runs_total", (("outcome", "failed"),))] == 0
    assert (work(samples, "expired"), work(samples, "ended_bytes_removed")) == (3, 3)
    assert samples[("chunksvc_sessions_total", (("event", "expired"),))] == 3


# --- a worker killed mid-upload ----------------------------------------------------------------


def has_open(pid: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


@pytest.fixture
def server(gunicorn_server, database_url, tmp_path):
    """gunicorn as ops run it, one worker, file storage, writing in 4 KiB blocks, on the test's
    database."""
    root = tmp_path / "storage"
    env = {
        "CHUNKSVC_WORKERS": "1",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_BLOCK_SIZE": "4096",
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
    }
    with gunicorn_server(
        StorageSpec(kind="file", root=root),
        env,
        name="crash",
        stderr_path=tmp_path / "gunicorn.log",
        database_url=database_url,
        stop_signal=signal.SIGQUIT,  # quick shutdown: the test is over
    ) as served:
        yield {"gunicorn": served.server, "port": served.server.port, "key": served.key, "root": root}


def call(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
    status_code, response, data = server["gunicorn"].request(
        method,
        path,
        None if body is None else json.dumps(body),
        {"Authorization": f"Bearer {server['key']}", "Content-Type": "application/json"},
    )
    is_json = response.getheader("Content-Type", "").startswith(("application/json", "application/problem+json"))
    return status_code, (json.loads(data) if is_json else None)


def test_a_worker_killed_mid_upload_leaves_bytes_the_reaper_removes(server, db):
    status_code, session = call(
        server, "POST", "/uploads/sessions", {"filename": "c.bin", "size": 1_000_000, "part_size": 500_000}
    )
    assert status_code == 201
    incoming = server["root"] / ".incoming"

    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        sock.sendall(
            f"PUT /uploads/sessions/{session['id']}/parts/1 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server['key']}\r\nContent-Length: 500000\r\n\r\n".encode()
        )
        sock.sendall(payload(200_000))  # then nothing more: the worker waits for the rest
        [temp] = wait_for(lambda: [p for p in incoming.iterdir() if p.stat().st_size > 0], "the part's first bytes")
        [worker] = [pid for pid in server["gunicorn"].worker_pids() if has_open(pid, temp)]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: worker not in server["gunicorn"].worker_pids(), "the master to reap the killed worker")

    assert temp.exists()  # the killed worker could not clean up after itself
    server["gunicorn"].wait_until_serving()  # the replacement worker

    storage = open_storage(StorageSpec(kind="file", root=server["root"]))
    result = new_reaper(db, storage, orphan_grace=0).run()

    assert done(result) == {"incomplete_swept": 1}
    assert [path for path in server["root"].rglob("*") if path.is_file()] == []
    status_code, parts = call(server, "GET", f"/uploads/sessions/{session['id']}/parts")
    assert (status_code, parts["parts"]) == (200, [])
    status_code, state = call(server, "GET", f"/uploads/sessions/{session['id']}")
    assert (status_code, state["status"], state["received_parts"], state["received_bytes"]) == (200, "INIT", 0, 0)
