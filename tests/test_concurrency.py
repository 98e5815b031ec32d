"""Races on a real PostgreSQL: many threads, one app, one connection pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import webtest

from chunksvc.services import layout
from tests.helpers import complete, create, payload, sha, split

THREADS = 16


def race(wsgi_app, calls):
    """Run ``calls`` (functions of a TestApp) at the same moment; return their responses."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        client = webtest.TestApp(wsgi_app)
        barrier.wait()
        return call(client)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def put(session_id, number, data, auth):
    def call(client):
        return client.put(
            f"/uploads/sessions/{session_id}/parts/{number}", params=data, headers=auth, expect_errors=True
        )

    return call


def session_state(app, auth, session_id):
    return app.get(f"/uploads/sessions/{session_id}", headers=auth).json


def test_same_part_different_bytes_exactly_one_wins(wsgi_app, app, auth, storage):
    session = create(app, auth, size=2048, part_size=1024).json
    bodies = [payload(1024, seed=i) for i in range(THREADS)]
    responses = race(wsgi_app, [put(session["id"], 1, body, auth) for body in bodies])

    statuses = sorted(r.status_int for r in responses)
    assert statuses == [201] + [409] * (THREADS - 1)
    winner = next(r for r in responses if r.status_int == 201).json["sha256"]
    assert all(
        r.json["code"] == "part_conflict" and r.json["sha256"] == winner for r in responses if r.status_int == 409
    )
    state = session_state(app, auth, session["id"])
    assert (state["received_parts"], state["received_bytes"]) == (1, 1024)
    # Only the winner's bytes are stored.
    assert len(list(storage.list_keys(layout.parts_prefix(session["id"])))) == 1


def test_same_part_same_bytes_counted_once(wsgi_app, app, auth, storage):
    session = create(app, auth, size=2048, part_size=1024).json
    body = payload(1024)
    responses = race(wsgi_app, [put(session["id"], 1, body, auth) for _ in range(THREADS)])

    assert sorted(r.status_int for r in responses) == [200] * (THREADS - 1) + [201]
    assert {r.json["sha256"] for r in responses} == {sha(body)}
    assert all(r.json["received_parts"] == 1 for r in responses)
    state = session_state(app, auth, session["id"])
    assert (state["received_parts"], state["received_bytes"]) == (1, 1024)
    assert len(list(storage.list_keys(layout.parts_prefix(session["id"])))) == 1


def test_distinct_parts_at_once_keep_exact_counters(wsgi_app, app, auth, storage):
    parts_count = 48
    data = payload(parts_count * 512 - 100)
    session = create(app, auth, size=len(data), part_size=512, sha256=sha(data)).json
    parts = split(data, 512)
    responses = race(wsgi_app, [put(session["id"], n, parts[n - 1], auth) for n in range(1, parts_count + 1)])

    assert [r.status_int for r in responses] == [201] * parts_count
    assert sorted(r.json["received_parts"] for r in responses) == list(range(1, parts_count + 1))
    state = session_state(app, auth, session["id"])
    assert (state["received_parts"], state["received_bytes"], state["status"]) == (
        parts_count,
        len(data),
        "IN_PROGRESS",
    )
    done = complete(app, auth, session["id"]).json
    with storage.open(done["object"]["key"]) as handle:
        assert handle.read() == data


def test_concurrent_completes_assemble_once(wsgi_app, app, auth, storage):
    data = payload(4096)
    session = create(app, auth, size=len(data), part_size=1024).json
    for number, chunk in enumerate(split(data, 1024), start=1):
        app.put(f"/uploads/sessions/{session['id']}/parts/{number}", params=chunk, headers=auth)

    def finish(client):
        return client.post(f"/uploads/sessions/{session['id']}/complete", headers=auth, expect_errors=True)

    responses = race(wsgi_app, [finish] * 8)
    ok = [r for r in responses if r.status_int == 200]
    busy = [r for r in responses if r.status_int == 202]  # another request was assembling: poll GET
    assert ok and len(ok) + len(busy) == 8
    assert all(r.json["status"] == "COMPLETING" and r.headers["Retry-After"] for r in busy)
    assert {r.json["object"]["sha256"] for r in ok} == {sha(data)}
    assert session_state(app, auth, session["id"])["status"] == "COMPLETED"
