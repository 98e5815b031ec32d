"""Completion events (issue 12), the outbox: the trigger writes an event and a delivery per
endpoint in the transaction that ends a session, for every ending, and for no other change.
Real PostgreSQL; local-disk storage (the outbox does not depend on where the bytes are).
The receiver, fixtures and helpers are tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import dataclasses
import threading

import psycopg
import pytest
import webtest

from chunksvc.app import build
from chunksvc.config import StorageSpec
from tests.helpers import complete
from tests.webhook_fixtures import (
    aborted,
    completed,
    deliveries,
    drain,
    events,
    failed,
    get,
    make_overdue,
    query,
    reap,
    uploaded,
)


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


def test_a_state_change_commits_its_event_with_no_deliverer_running(app, auth, database_url, registry, receiver):
    endpoint, _ = registry.add("alice", receiver.url)
    session_id = completed(app, auth)

    [(event_id, kind, of_session)] = events(database_url)
    assert (kind, of_session) == ("session.completed", session_id)
    [delivery] = deliveries(database_url)
    assert delivery["endpoint_id"] == endpoint.id
    assert (delivery["event_id"], delivery["state"], delivery["attempts"]) == (event_id, "pending", 0)
    # The event keeps the session as the change left it.
    [(stored,)] = query(database_url, "SELECT session FROM webhook_events WHERE id = %s", (event_id,))
    assert stored["status"] == "COMPLETED" and stored["object_sha256"] == get(app, auth, session_id)["object"]["sha256"]
    assert receiver.received == []  # nobody delivered anything


def test_a_rolled_back_change_leaves_no_event(app, auth, database_url, registry, receiver):
    registry.add("alice", receiver.url)
    session_id = uploaded(app, auth)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE upload_sessions SET status = 'ABORTED' WHERE id = %s", (session_id,))
        # The trigger wrote it in this transaction ...
        assert conn.execute("SELECT count(*) FROM webhook_events").fetchone() == (1,)
        assert events(database_url) == []  # ... invisible to others until commit
        conn.rollback()
    assert events(database_url) == [] and deliveries(database_url) == []
    assert get(app, auth, session_id)["status"] == "IN_PROGRESS"


def test_only_a_change_to_an_ending_status_makes_an_event_and_only_with_an_endpoint(
    app, auth, other_auth, database_url, registry, receiver
):
    silent = completed(app, auth, seed=1)  # alice has no endpoint yet: no event
    registry.add("alice", receiver.url)
    open_session = uploaded(app, auth, seed=2)  # INIT -> IN_PROGRESS: no event
    completed(app, other_auth, seed=3)  # bob has no endpoint
    assert events(database_url) == []
    aborted(app, auth, open_session)
    aborted(app, auth, open_session)  # ABORTED again changes nothing: no second event
    query(database_url, "UPDATE upload_sessions SET updated_at = now() WHERE id = %s", (silent,))
    assert [(kind, s) for _, kind, s in events(database_url)] == [("session.aborted", open_session)]


def test_each_active_endpoint_of_the_client_gets_its_own_delivery(app, auth, database_url, registry, receivers):
    first, second, removed = (registry.add("alice", receivers().url)[0] for _ in range(3))
    registry.remove(removed.id)
    completed(app, auth)
    assert sorted(d["endpoint_id"] for d in deliveries(database_url)) == [first.id, second.id]


def test_abort_expiry_failure_and_a_background_completion_each_emit_their_event(
    config, db, storage, auth, database_url, registry, receiver, deliverers
):
    service = build(dataclasses.replace(config, sync_complete_max=2000), db=db, storage=storage)
    app = webtest.TestApp(service.app)
    try:
        registry.add("alice", receiver.url)
        to_abort = uploaded(app, auth, seed=1)
        aborted(app, auth, to_abort)
        to_expire = uploaded(app, auth, seed=2)
        make_overdue(database_url, to_expire)
        reap(db, storage)
        to_fail = failed(app, auth, seed=3)
        large = uploaded(app, auth, seed=4, size=5000)
        assert complete(app, auth, large, status=202).json["status"] == "COMPLETING"
        assert service.assembler.wait_idle(30)
    finally:
        service.assembler.stop()

    drain(deliverers(), database_url, "the four events")

    by_session = {r.event["session"]["id"]: r.event for r in receiver.received}
    assert len(receiver.received) == 4
    expected = {
        to_abort: ("session.aborted", "ABORTED"),
        to_expire: ("session.expired", "EXPIRED"),
        to_fail: ("session.failed", "FAILED"),
        large: ("session.completed", "COMPLETED"),
    }
    assert {s: (e["type"], e["session"]["status"]) for s, e in by_session.items()} == expected
    for session_id, event in by_session.items():
        assert event["session"] == get(app, auth, session_id)
    assert by_session[large]["session"]["object"]["size"] == 5000


def test_an_endpoint_removed_while_a_session_ends_is_left_no_delivery(app, auth, database_url, registry, receiver):
    """The trigger takes its endpoints FOR SHARE: a removal racing a session's ending either
    commits first (no delivery is made) or waits, then drops the delivery made meanwhile. Without
    the lock a delivery to a removed endpoint was left pending for ever."""
    endpoint, _ = registry.add("alice", receiver.url)
    session_id = uploaded(app, auth)
    ending = psycopg.connect(database_url)
    try:
        ending.execute("UPDATE upload_sessions SET status = 'ABORTED' WHERE id = %s", (session_id,))
        removed: list[int] = []
        remover = threading.Thread(target=lambda: removed.append(registry.remove(endpoint.id)))
        remover.start()
        remover.join(1.0)
        assert remover.is_alive()  # the removal waits for the ending's transaction
        ending.commit()
        remover.join(30)
        assert removed == [1]  # and then drops the delivery that transaction made
    finally:
        ending.close()
    assert query(database_url, "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'") == [(0,)]
