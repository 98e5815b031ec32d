"""Completion events (issue 12), the work shared: slots a hanging, failing or slow endpoint may
hold, the claim's cost, gunicorn servers on one database (two hosts, a worker killed
mid-delivery) and `deliver --once`. The receiver, fixtures and helpers are
tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from chunksvc.config import StorageSpec
from chunksvc.db import QUERIES
from chunksvc.services import webhook_deliverer, webhooks
from chunksvc_client import Client
from tests.helpers import payload, sha, wait_for
from tests.webhook_fixtures import (
    HANG,
    KEY,
    KEY_HEX,
    ROOT,
    TRICKLE,
    chunksvc,
    completed,
    deliveries,
    events,
    query,
    states,
)
from tools import harness


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


SERVER_ENV = {
    "CHUNKSVC_MIN_PART_SIZE": "1",
    "CHUNKSVC_ACCESS_LOG": "/dev/null",
    "CHUNKSVC_DB_POOL_MAX": "4",
    "CHUNKSVC_WEBHOOK_KEY": KEY_HEX,
    "CHUNKSVC_WEBHOOK_POLL": "1",
    "CHUNKSVC_REAP_INTERVAL": "0",
}


def test_a_hanging_endpoint_does_not_hold_back_another_clients(
    app, auth, other_auth, database_url, registry, receivers, deliverers
):
    """Alice's endpoint takes every attempt and never answers (within the 10 s timeout); Bob's
    events, made at the same time, are delivered while Alice's attempts still hang."""
    slow, fast = receivers(HANG).start(), receivers().start()
    slow_endpoint, _ = registry.add("alice", slow.url)
    fast_endpoint, _ = registry.add("bob", fast.url)
    for seed in range(6):
        completed(app, auth, seed)
    bobs = [completed(app, other_auth, seed) for seed in range(10, 16)]
    deliverer = deliverers(timeout=10.0, concurrency=4, per_endpoint=2)
    deliverer.start()

    wait_for(lambda: states(database_url, fast_endpoint.id)["delivered"] == 6, "bob's events")

    assert sorted(r.event["session"]["id"] for r in fast.received) == sorted(bobs)
    # Alice's: two attempts under way (per_endpoint), none ended: bob's did not wait for them.
    alices = deliveries(database_url, slow_endpoint.id)
    assert [d["state"] for d in alices] == ["pending"] * 6
    assert sum(d["attempts"] for d in alices) == 2 and all(d["last_error"] is None for d in alices)
    wait_for(lambda: slow.hanging == 2, "alice's receiver to hold both")
    assert slow.max_hanging == 2 and len(slow.received) == 2
    slow.released.set()


def test_failing_endpoints_share_at_most_half_of_the_attempts(
    app, auth, other_auth, database_url, registry, receivers, deliverers, monkeypatch
):
    """Four endpoints that hang could hold all four attempt slots of a process; once they have
    failed there, they hold at most two (``failing_share``), one attempt each, and another
    client's events go through the other two."""
    hanging, fast = receivers(HANG).start(), receivers().start()
    slow_ids = [registry.add("alice", f"{hanging.url}/{n}")[0].id for n in range(4)]
    fast_endpoint, _ = registry.add("bob", fast.url)
    for seed in range(2):
        completed(app, auth, seed)  # two events for each of alice's four endpoints
    running: collections.Counter[str] = collections.Counter()
    peak = {"slow": 0}
    lock = threading.Lock()
    real_post = webhooks.post

    def counting_post(url: str, *args, **kwargs):
        with lock:
            running[url] += 1
            slow_now = sum(n for u, n in running.items() if u.startswith(hanging.url))
            peak["slow"] = max(peak["slow"], slow_now)
        try:
            return real_post(url, *args, **kwargs)
        finally:
            with lock:
                running[url] -= 1

    monkeypatch.setattr(webhook_deliverer, "post", counting_post)  # where the deliverer looks it up
    deliverer = deliverers(timeout=0.5, concurrency=4, per_endpoint=2)
    deliverer.start()

    def attempts_each() -> list[int]:
        by_endpoint: collections.Counter[int] = collections.Counter()
        for d in deliveries(database_url):
            if d["endpoint_id"] in slow_ids and d["last_error"] is not None:
                by_endpoint[d["endpoint_id"]] += d["attempts"]
        return [by_endpoint[e] for e in slow_ids]

    wait_for(lambda: min(attempts_each()) >= 1, "each of alice's endpoints to have failed")
    before = sum(attempts_each())  # all four are failing here now: the share applies ...
    wait_for(lambda: sum(n for u, n in running.items() if u.startswith(hanging.url)) <= 2, "the share to apply")
    with lock:  # ... once the attempts begun before have timed out
        peak["slow"] = sum(n for u, n in running.items() if u.startswith(hanging.url))
    bobs = [completed(app, other_auth, seed) for seed in range(10, 14)]
    wait_for(lambda: states(database_url, fast_endpoint.id)["delivered"] == 4, "bob's events")
    wait_for(lambda: sum(attempts_each()) >= before + 6, "alice's endpoints to be tried again")

    assert peak["slow"] <= 2  # failing_share of concurrency 4
    assert sorted(r.event["session"]["id"] for r in fast.received) == sorted(bobs)
    assert all(states(database_url, e) == {"pending": 2} for e in slow_ids)
    hanging.released.set()


def test_an_endpoint_that_answers_slowly_shares_the_failing_endpoints_slots(app, auth, registry, receivers, deliverers):
    """A 2xx after half the timeout or more counts as slow: such endpoints share at most half of
    the slots, so a few slow ones cannot hold every thread."""
    slow = receivers(TRICKLE).start()  # a 200 whose head takes about 1.7 s
    endpoint, _ = registry.add("alice", slow.url)
    completed(app, auth)
    deliverer = deliverers(timeout=3.0)
    assert deliverer.deliver_due().delivered == 1
    assert endpoint.id in deliverer._failing


def test_a_claim_costs_a_probe_per_endpoint_not_a_scan_of_the_backlog(app, auth, database_url, db, registry):
    """A dead endpoint with a backlog of due deliveries: a claim reads one of them (the head of
    its endpoint), not all, whether that endpoint is busy or not."""
    down, _ = registry.add("alice", "http://127.0.0.1:9/hooks")
    session_id = completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # 3,000 more events, each of its own session
        conn.execute(
            "INSERT INTO upload_sessions (id, client_id, filename, content_type, size, part_size, total_parts,"
            " status, expires_at) SELECT gen_random_uuid(), client_id, 'f', 'application/octet-stream', 1, 1, 1,"
            " 'ABORTED', now() FROM upload_sessions, generate_series(1, 3000) WHERE id = %s",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO webhook_events (session_id, client_id, type, session) SELECT s.id, s.client_id,"
            " 'session.aborted', to_jsonb(s) FROM upload_sessions s WHERE s.id <> %s",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, session_id, event_seq)"
            " SELECT id, %s, session_id, seq FROM webhook_events WHERE id <> %s",
            (down.id, event_id),
        )
        conn.execute("ANALYZE webhook_deliveries")
        for busy in ([], [down.id]):
            with conn.transaction():  # EXPLAIN ANALYZE runs the claim's UPDATE: rolled back
                [(plan,)] = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_webhook_deliveries"],
                    {"limit": 8, "lease": 60, "busy_endpoints": busy, "key_id": KEY.key_id, "only_endpoints": None},
                ).fetchall()
                raise psycopg.Rollback()
            assert rows_read_from(plan[0]["Plan"], "webhook_deliveries") <= 3, plan


def rows_read_from(node: dict, table: str) -> int:
    """Rows the plan's scans of ``table`` returned, summed over every loop."""
    own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if node.get("Relation Name") == table else 0
    return own + sum(rows_read_from(child, table) for child in node.get("Plans", []))


def test_two_hosts_deliver_each_event_exactly_once(db, database_url, storage_spec, tmp_path, registry, receiver):
    """Two gunicorn servers (two workers each) on one database, 100 completions: each event is
    sent once (no double sends while all is well), and all are delivered."""
    key = harness.create_api_key(database_url, "alice")
    registry.add("alice", receiver.url)
    count = 100
    data = payload(100)
    with contextlib.ExitStack() as stack:
        hosts = [
            stack.enter_context(
                harness.gunicorn(
                    database_url,
                    storage_spec,
                    env={**SERVER_ENV, "CHUNKSVC_WORKERS": "2"},
                    cwd=ROOT,
                    stderr_path=tmp_path / f"host{index}.log",
                )
            )
            for index in range(2)
        ]
        clients = [stack.enter_context(Client(host.url, key)) for host in hosts]

        def one(index: int) -> str:
            client = clients[index % 2]
            session = client.create_session(f"f{index}", len(data), part_size=1024, sha256=sha(data))
            client.put_part(session["id"], 1, data)
            return client.complete(session["id"])["id"]

        with ThreadPoolExecutor(8) as pool:
            sessions = list(pool.map(one, range(count)))
        wait_for(lambda: len(set(receiver.ids())) == count, f"{count} events at the receiver")
        wait_for(lambda: states(database_url) == {"delivered": count}, "every delivery recorded")
    assert collections.Counter(receiver.ids()).most_common(1)[0][1] == 1  # none twice
    assert sorted(r.event["session"]["id"] for r in receiver.received) == sorted(sessions)
    assert {d["attempts"] for d in deliveries(database_url)} == {1}
    for index in range(2):
        log = (tmp_path / f"host{index}.log").read_text()
        assert "Traceback" not in log and "outcome not recorded" not in log, log[-2000:]


def upload_one_file(client: Client) -> dict:
    """A one-part upload through a running server, completed (its session)."""
    data = payload(100)
    session = client.create_session("f", len(data), sha256=sha(data))
    client.put_part(session["id"], 1, data)
    assert client.complete(session["id"])["status"] == "COMPLETED"
    return session


def kill_the_worker(server: harness.Server) -> None:
    """kill -9 the server's one worker, and wait for the master to start another."""
    [worker] = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: worker not in server.worker_pids() and server.worker_pids(), "a new worker")


def test_a_worker_killed_mid_delivery_leaves_it_to_the_next_deliverer(
    db, database_url, storage_spec, tmp_path, registry, receiver
):
    """kill -9 of the only worker while its deliverer waits on a hanging receiver: the delivery
    stays pending under its lease; once the lease has run out (set here: it is 60 s) the
    restarted worker delivers it, with the same event id."""
    key = harness.create_api_key(database_url, "alice")
    registry.add("alice", receiver.url)
    receiver.answer = HANG
    with (
        harness.gunicorn(
            database_url,
            storage_spec,
            env={**SERVER_ENV, "CHUNKSVC_WORKERS": "1"},
            cwd=ROOT,
            stderr_path=tmp_path / "gunicorn.log",
        ) as server,
        Client(server.url, key) as client,
    ):
        upload_one_file(client)
        wait_for(lambda: receiver.hanging == 1, "the worker's deliverer to be waiting on the receiver")
        kill_the_worker(server)
        [delivery] = deliveries(database_url)
        assert (delivery["state"], delivery["attempts"]) == ("pending", 1)  # the lease holds it

        receiver.answer = 204
        receiver.released.set()
        query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now()")  # the lease ran out
        wait_for(lambda: states(database_url) == {"delivered": 1}, "the new worker to deliver")
    [event_id] = set(receiver.ids())
    assert [r.answer for r in receiver.received] == [HANG, 204] and event_id == delivery["event_id"]
    assert receiver.received[-1].event["session"]["status"] == "COMPLETED"


def test_deliver_once_sends_what_a_killed_server_left_behind(database_url, storage_spec, tmp_path, registry, receivers):
    """A server with no signing key: uploads work, nothing is delivered, nothing crashes. Its
    worker is killed after a completion; `deliver --once` later sends the event."""
    key = harness.create_api_key(database_url, "alice")
    receiver = receivers().start()
    registry.add("alice", receiver.url)
    with (
        harness.gunicorn(
            database_url,
            storage_spec,
            env={**SERVER_ENV, "CHUNKSVC_WORKERS": "1", "CHUNKSVC_WEBHOOK_KEY_FILE": str(tmp_path / "absent.key")},
            unset=["CHUNKSVC_WEBHOOK_KEY"],
            cwd=ROOT,
            stderr_path=tmp_path / "gunicorn.log",
        ) as server,
        Client(server.url, key) as client,
    ):
        session = upload_one_file(client)
        kill_the_worker(server)
        assert server.request("GET", "/healthz")[0] == 200
    assert states(database_url) == {"pending": 1} and receiver.received == []

    done = chunksvc(database_url, tmp_path, "deliver", "--once")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("delivered 1, failed 0 (to be retried), dead 0")
    assert receiver.received[0].event["session"]["id"] == session["id"]
    assert states(database_url) == {"delivered": 1}


def test_deliver_once_exits_1_when_an_attempt_failed(database_url, tmp_path, app, auth, registry, receivers):
    good, bad = receivers().start(), receivers(500).start()
    registry.add("alice", good.url)
    registry.add("alice", bad.url)
    completed(app, auth)

    done = chunksvc(database_url, tmp_path, "deliver", "--once")

    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("delivered 1, failed 1 (to be retried), dead 0")
    assert len(good.received) == len(bad.received) == 1
    nothing = chunksvc(database_url, tmp_path, "deliver", "--once")  # the failed one is not due yet
    assert nothing.returncode == 0 and nothing.stdout.startswith("delivered 0, failed 0 (to be retried), dead 0")
    without_key = chunksvc(database_url, tmp_path, "deliver", "--once", CHUNKSVC_WEBHOOK_KEY="")
    assert without_key.returncode == 2 and "no webhook signing key" in without_key.stderr
