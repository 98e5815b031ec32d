"""Large uploads complete in the background: 202, assembled_bytes, the outcome through GET, abort
while assembling, a checksum mismatch found later, the cap on assemblies, and a killed assembling
worker whose work another picks up. Real PostgreSQL and both storages; gunicorn where a process
must die."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import webtest
from psycopg.conninfo import make_conninfo

from chunksvc import embedded
from chunksvc.app import build
from chunksvc.config import StorageSpec
from chunksvc.errors import CompletionInProgress, PartsMissing, SessionNotActive
from chunksvc.services import completion as completion_module
from chunksvc.services import layout
from chunksvc.services.assembler import BackgroundAssembler
from chunksvc.services.completion import CompletionService, _Lease
from chunksvc.services.events import UploadEvents
from chunksvc_client import Client
from tests.conftest import TEST_LIMITS
from tests.faults import FaultProxy
from tests.helpers import (
    complete,
    completion_lease_ran_out,
    create,
    hold_completion_lease,
    payload,
    put_part,
    run_out_completion_lease,
    sha,
    split,
    uploaded,
    wait_for,
)
from tests.test_api import assert_problem, read_object, stored_part_keys
from tests.test_faults import pg_socket
from tests.test_reliability import part_rows
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
SYNC_MAX = 2000  # bytes: anything larger completes in the background here


@pytest.fixture
def background(config, db, storage):
    """The app with a small synchronous limit, and its background assembler."""
    app, assembler, *_ = build(dataclasses.replace(config, sync_complete_max=SYNC_MAX), db=db, storage=storage)
    yield webtest.TestApp(app), assembler
    assembler.stop()


def test_a_large_upload_is_accepted_with_202_and_assembled_in_the_background(background, auth, storage):
    app, assembler = background
    session_id, data = uploaded(app, auth, 5000)

    accepted = complete(app, auth, session_id, status=202)

    assert accepted.headers["Retry-After"] == "2"
    assert accepted.json["status"] == "COMPLETING" and accepted.json["object"] is None
    assert isinstance(accepted.json["assembled_bytes"], int)
    assert assembler.wait_idle(30)
    done = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert done["status"] == "COMPLETED" and done["assembled_bytes"] is None
    assert read_object(storage, done["object"]["key"]) == data
    assert stored_part_keys(storage, session_id) == []
    again = complete(app, auth, session_id)  # idempotent: the same 200 once completed
    assert again.json["object"] == done["object"]


def test_prefer_wait_answers_200_once_the_background_assembly_is_verified(background, auth, storage):
    app, _ = background
    session_id, data = uploaded(app, auth, 5000)
    done = app.post(f"/uploads/sessions/{session_id}/complete", headers={**auth, "Prefer": "wait=10"}, status=200)
    assert done.headers["Preference-Applied"] == "wait=10"
    assert done.json["status"] == "COMPLETED" and read_object(storage, done.json["object"]["key"]) == data
    assert done.json["object"]["sha256"] == sha(data)


def test_prefer_wait_answers_the_failure_found_in_the_background(background, auth):
    app, _ = background
    session_id, _ = uploaded(app, auth, 5000, sha256=sha(b"not these bytes"))
    failed = app.post(f"/uploads/sessions/{session_id}/complete", headers={**auth, "Prefer": "wait=10"}, status=409)
    assert_problem(failed, 409, "session_not_active")
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "FAILED"


def test_prefer_wait_answers_202_after_the_wait_while_another_assembler_holds_it(background, auth, database_url):
    app, _ = background
    session_id, _ = uploaded(app, auth, 5000)
    hold_completion_lease(database_url, session_id, 30)  # a live assembler elsewhere that is slow
    started = time.monotonic()
    waited = app.post(f"/uploads/sessions/{session_id}/complete", headers={**auth, "Prefer": "wait=1"}, status=202)
    assert time.monotonic() - started >= 1.0
    assert waited.headers["Preference-Applied"] == "wait=1" and waited.headers["Retry-After"] == "2"
    assert waited.json["status"] == "COMPLETING"


def test_small_uploads_still_complete_in_the_request(background, auth):
    app, _ = background
    session_id, _ = uploaded(app, auth, SYNC_MAX)
    assert complete(app, auth, session_id, status=200).json["status"] == "COMPLETED"


def test_complete_on_an_accepted_session_answers_the_same_202(background, auth, database_url):
    app, assembler = background
    session_id, _ = uploaded(app, auth, 5000)
    # Stands in for a running assembler: its completion lease, which runs out in a few seconds.
    hold_completion_lease(database_url, session_id, 3)
    first = complete(app, auth, session_id, status=202)
    second = complete(app, auth, session_id, status=202)
    assert first.json["status"] == second.json["status"] == "COMPLETING"
    # Abort waits for the assembly, as the contract says.
    assert_problem(
        app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=409), 409, "completion_in_progress"
    )
    assert assembler.wait_idle(30)  # it tried, found the lease taken, and left it
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "COMPLETING"
    assert not completion_lease_ran_out(database_url, session_id)  # all of that within the lease
    with psycopg.connect(database_url) as conn:
        [(client_id,)] = conn.execute("SELECT id FROM clients WHERE name = 'alice'").fetchall()
    run_out_completion_lease(database_url, session_id)  # its time comes, without waiting the 3 s
    assert completion_lease_ran_out(database_url, session_id)  # the holder's lease ran out
    assembler.submit(uuid.UUID(session_id), client_id)  # the poller's offer, once the holder is gone
    assert assembler.wait_idle(30)
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "COMPLETED"


def test_a_checksum_mismatch_found_in_the_background_fails_the_session(background, auth, storage):
    app, assembler = background
    session_id, _ = uploaded(app, auth, 5000, sha256=sha(b"not these bytes"))
    complete(app, auth, session_id, status=202)
    assert assembler.wait_idle(30)
    failed = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert (failed["status"], failed["object"]) == ("FAILED", None)
    assert not storage.exists(layout.object_key(session_id)) and stored_part_keys(storage, session_id) == []


class CountingEvents(UploadEvents):
    def __init__(self) -> None:
        self.running = self.most = 0
        self.lock = threading.Lock()

    def assembly_running(self, change: int) -> None:
        with self.lock:
            self.running += change
            self.most = max(self.most, self.running)


def test_background_assemblies_are_capped_per_process(app, auth, db, storage, database_url):
    events = CountingEvents()
    completion = CompletionService(db, storage, TEST_LIMITS, 4096, events=events, sync_complete_max=SYNC_MAX)
    assembler = BackgroundAssembler(completion, db, threads=1)
    sessions = [uploaded(app, auth, 20_000, seed=i) for i in range(6)]
    with psycopg.connect(database_url, autocommit=True) as conn:  # six completions accepted at once
        [(client_id,)] = conn.execute("SELECT id FROM clients WHERE name = 'alice'").fetchall()
        conn.execute(
            "UPDATE upload_sessions SET status = 'COMPLETING' WHERE id = ANY(%s::uuid[])",
            ([session_id for session_id, _ in sessions],),
        )
    for session_id, _ in sessions:
        assembler.submit(uuid.UUID(session_id), client_id)
    try:
        assert assembler.wait_idle(60)
    finally:
        assembler.stop()
    assert events.most == 1  # one at a time, however many were accepted
    for session_id, data in sessions:
        assert read_object(storage, layout.object_key(session_id)) == data


def accepted_by_a_request_that_died(database_url: str, session_ids: list[str]) -> int:
    """Move the sessions to COMPLETING with no lease, as a request that accepted them and died
    leaves them; their client's id."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        [(client_id,)] = conn.execute("SELECT id FROM clients WHERE name = 'alice'").fetchall()
        conn.execute("UPDATE upload_sessions SET status = 'COMPLETING' WHERE id = ANY(%s::uuid[])", (session_ids,))
    return client_id


def test_an_accepted_small_completion_nobody_runs_is_finished_by_the_poller(app, auth, db, storage, database_url):
    """Below the synchronous size, complete assembles in the request; if that request died (or
    answered 202 during a database outage) a client that only polls GET still sees it end."""
    session_id, data = uploaded(app, auth, 1500)
    accepted_by_a_request_that_died(database_url, [session_id])
    completion = CompletionService(db, storage, TEST_LIMITS, 4096, sync_complete_max=SYNC_MAX)
    assembler = BackgroundAssembler(completion, db, threads=1, poll_interval=0.2)
    assembler.start()
    try:
        wait_for(
            lambda: app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "COMPLETED",
            "the poller to finish the completion",
        )
    finally:
        assembler.stop()
    assert read_object(storage, layout.object_key(session_id)) == data


class GatedStorage:
    """The real storage, its ``assemble`` held until ``release`` is set: an assembly under way."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def assemble(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self._inner.assemble(*args, **kwargs)


def test_a_stopping_worker_gives_back_its_completion_leases(app, auth, db, storage, database_url):
    """A worker on its way out gives back the leases of its assemblies, so the next poll anywhere
    takes them over instead of waiting out the lease; the abandoned assembly records nothing."""
    gated = GatedStorage(storage)
    leaving = BackgroundAssembler(
        CompletionService(db, gated, TEST_LIMITS, 4096, sync_complete_max=SYNC_MAX, lease=60), db, threads=1
    )
    session_id, data = uploaded(app, auth, 5000)
    client_id = accepted_by_a_request_that_died(database_url, [session_id])
    leaving.submit(uuid.UUID(session_id), client_id)
    assert gated.entered.wait(10)
    assert not completion_lease_ran_out(database_url, session_id)  # held, for a minute

    leaving.stop()

    assert completion_lease_ran_out(database_url, session_id)  # given back at once
    gated.release.set()
    assert leaving.wait_idle(30)
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "COMPLETING"
    taking_over = BackgroundAssembler(
        CompletionService(db, storage, TEST_LIMITS, 4096, sync_complete_max=SYNC_MAX), db, threads=1
    )
    taking_over.submit(uuid.UUID(session_id), client_id)
    try:
        assert taking_over.wait_idle(30)
    finally:
        taking_over.stop()
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "COMPLETED"
    assert read_object(storage, layout.object_key(session_id)) == data


class SlowChecks:
    """The real storage, each existence check slowed: a stat, and each key a listing yields (S3's
    requests, thousands of them for a large upload, in miniature)."""

    def __init__(self, inner, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def exists(self, key):
        time.sleep(self._delay)
        return self._inner.exists(key)

    def list_keys(self, prefix):
        for listed in self._inner.list_keys(prefix):
            time.sleep(self._delay)
            yield listed


def test_lost_parts_are_looked_for_under_a_renewed_lease(app, auth, db, storage, database_url):
    """Finding which parts are lost may outlast the lease (S3: a request per part); the lease is
    renewed meanwhile, so the attempt that found them reopens the session, instead of being taken
    over by the next poll, whose own search is taken over in turn, and so on. The reviewer's probe:
    a 1 s lease, each check 0.6 s, 5 parts, an attempt offered every 0.7 s."""
    session_id, _ = uploaded(app, auth, 5000)  # 5 parts
    lost = part_rows(database_url, session_id)[4]
    storage.delete([lost])
    client_id = accepted_by_a_request_that_died(database_url, [session_id])
    completion = CompletionService(
        db, SlowChecks(storage, 0.6), TEST_LIMITS, 4096, sync_complete_max=SYNC_MAX, max_assemblies=8, lease=1
    )
    outcomes: dict[int, str] = {}

    def attempt(number: int) -> None:
        try:
            completion.resume(uuid.UUID(session_id), client_id)
            outcomes[number] = "completed"
        except PartsMissing:
            outcomes[number] = "reopened"
        except CompletionInProgress as exc:
            outcomes[number] = "taken over" if "took this completion over" in exc.detail else "in progress"
        except SessionNotActive:
            outcomes[number] = "ended"

    attempts = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        attempts.append(threading.Thread(target=attempt, args=(len(attempts),)))
        attempts[-1].start()
        time.sleep(0.7)
        if app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] != "COMPLETING":
            break
    for thread in attempts:
        thread.join(30)

    assert outcomes[0] == "reopened", outcomes
    assert set(outcomes.values()) - {"reopened"} <= {"in progress", "ended"}, outcomes
    assert len(attempts) < 10, outcomes  # reopened within about the time one search takes
    session = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert session["status"] == "IN_PROGRESS" and lost not in part_rows(database_url, session_id).values()


class ListsNothing(SlowChecks):
    """The real storage, its listings behind its writes: they show no key at all."""

    def list_keys(self, prefix):
        return iter(())


def test_only_parts_the_storage_reports_missing_are_dropped_not_those_a_listing_missed(
    app, auth, db, storage, database_url
):
    session_id, _ = uploaded(app, auth, 5000)
    storage.delete([part_rows(database_url, session_id)[2]])
    client_id = accepted_by_a_request_that_died(database_url, [session_id])
    completion = CompletionService(db, ListsNothing(storage, 0), TEST_LIMITS, 4096, sync_complete_max=SYNC_MAX)

    with pytest.raises(PartsMissing) as reopened:
        completion.resume(uuid.UUID(session_id), client_id)

    assert reopened.value.extra["missing_parts"] == [2]
    assert sorted(part_rows(database_url, session_id)) == [1, 3, 4, 5]


def test_a_stale_assembly_ending_leaves_the_lease_of_the_one_that_took_over_to_give_back() -> None:
    """Two assemblies of one session in one process: the first lost its lease to the second and
    ends while the second still runs. The lease a stopping worker gives back is the second's."""
    completion = CompletionService(None, None, TEST_LIMITS, 4096)  # type: ignore[arg-type]
    session = SimpleNamespace(id=uuid.uuid4())
    stale, fresh = _Lease.new(), _Lease.new()
    fresh_running, fresh_may_end = threading.Event(), threading.Event()

    def assemble(*args):
        lease = args[-1]
        if lease is fresh:
            fresh_running.set()
            fresh_may_end.wait(10)
        else:  # the stale one: taken over while it runs, and it ends first
            taking_over.start()
            assert fresh_running.wait(10)
        return []  # "no part is there": nothing assembled

    completion._assemble = assemble  # type: ignore[method-assign]
    # The session back, as the real one returns it (unused here): nothing is reopened.
    completion._reopen_lost_parts = lambda conn, client_id, session, lost, lease: session  # type: ignore[method-assign]
    taking_over = threading.Thread(target=completion._assemble_or_reopen, args=(None, 1, session, [], fresh))

    completion._assemble_or_reopen(None, 1, session, [], stale)  # type: ignore[arg-type]

    assert completion._held == {session.id: fresh.owner}
    fresh_may_end.set()
    taking_over.join(10)
    assert completion._held == {}


# --- a killed assembling worker -------------------------------------------------------------------


def test_a_killed_assembling_worker_is_replaced_and_the_assembly_finished(pg_admin_url, template_db, tmp_path):
    name = f"chunksvc_bg_{uuid.uuid4().hex[:12]}"
    url = embedded.ensure_database(pg_admin_url, name, template=template_db)
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    env = {
        "CHUNKSVC_WORKERS": "1",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
        "CHUNKSVC_SYNC_COMPLETE_MAX": "1000000",
        "CHUNKSVC_ASSEMBLY_POLL": "1",
        "CHUNKSVC_LEASE": "2",  # the killed worker's lease runs out 2 s after its last renewal
    }
    data = payload(3 * 1024 * 1024 + 17, seed=9)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    try:
        with (
            FaultProxy(pg_socket(url)) as proxy,
            harness.gunicorn(
                make_conninfo(url, host="127.0.0.1", port=str(proxy.port)),
                spec,
                env=env,
                cwd=ROOT,
                stderr_path=tmp_path / "gunicorn.log",
            ) as server,
        ):
            key = harness.create_api_key(url, "bg")
            with Client(server.url, key) as client:
                session = client.create_session("big.bin", len(data), part_size=1024 * 1024)
                for number, chunk in enumerate(split(data, 1024 * 1024), start=1):
                    client.put_part(session["id"], number, chunk)
                # The assembler's recording of its outcome never reaches PostgreSQL: it hangs there.
                proxy.hold_after(b"SET status = 'COMPLETED'")
                accepted = client.complete(session["id"], sha(data), wait=False)
                assert accepted["status"] == "COMPLETING"
                wait_for(lambda: proxy.requests_held, "the assembler to record its outcome")
                [worker] = server.worker_pids()
                os.kill(worker, signal.SIGKILL)
                # The master starts a new worker; its poller finds the accepted completion (nobody
                # calls complete again: the client only reads).
                done = wait_for(
                    lambda: (s := client.get_session(session["id"]))["status"] == "COMPLETED" and s,
                    "the new worker to finish the assembly",
                )
        assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
        assert (spec.root / done["object"]["key"]).read_bytes() == data
    finally:
        embedded.drop_database(pg_admin_url, name)


def test_the_parts_of_a_completed_session_with_many_parts_are_removed_after_the_answer(
    app, auth, db, storage, monkeypatch
):
    """Above INLINE_PART_REMOVAL parts, complete answers once COMPLETED is committed and a thread
    removes the parts after it: the object is whole at once, the parts go soon after."""
    monkeypatch.setattr(completion_module, "INLINE_PART_REMOVAL", 3)
    data = payload(8 * 512, seed=7)
    session_id = create(app, auth, size=len(data), part_size=512, sha256=sha(data)).json["id"]
    for number, chunk in enumerate(split(data, 512), start=1):
        put_part(app, auth, session_id, number, chunk)
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED"
    assert read_object(storage, done["object"]["key"]) == data
    wait_for(lambda: stored_part_keys(storage, session_id) == [], "the parts to be removed in the background")
