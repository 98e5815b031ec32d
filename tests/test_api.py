"""The HTTP contract end to end through the WSGI app (webtest), on a real PostgreSQL and on
both storages (local disk, and S3 over HTTP to radosgw)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import webtest

from chunksvc.services import layout
from chunksvc.storage import Storage
from tests.helpers import (
    ShortBody,
    complete,
    completion_lease_ran_out,
    content_digest,
    create,
    hold_completion_lease,
    payload,
    put_part,
    raw_put,
    run_out_completion_lease,
    sha,
    split,
)


def stored_part_keys(storage: Storage, session_id: str) -> list[str]:
    return [item.key for item in storage.list_keys(layout.parts_prefix(session_id))]


def read_object(storage: Storage, key: str) -> bytes:
    with storage.open(key) as handle:
        return handle.read()


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_int == status
    assert response.content_type == "application/problem+json"
    problem = response.json
    assert problem["status"] == status and problem["code"] == code
    assert problem["type"] and problem["title"] and "detail" in problem
    return problem


# --- the whole lifecycle ------------------------------------------------------------------------


def test_out_of_order_upload_assembles_byte_identical_object(app, auth, storage):
    data = payload(5 * 1000 + 123)
    session = create(app, auth, size=len(data), part_size=1000, sha256=sha(data), metadata={"a": "b"}).json
    assert session["status"] == "INIT" and session["total_parts"] == 6 and session["object"] is None
    parts = split(data, 1000)

    order = [5, 1, 6, 3, 2, 4]
    for count, number in enumerate(order, start=1):
        response = put_part(app, auth, session["id"], number, parts[number - 1])
        assert response.json == {
            "part_number": number,
            "size": len(parts[number - 1]),
            "sha256": sha(parts[number - 1]),
            "received_parts": count,
            "received_bytes": sum(len(parts[n - 1]) for n in order[:count]),
            "status": "IN_PROGRESS",
        }
        assert response.headers["ETag"] == f'"{sha(parts[number - 1])}"'

    done = complete(app, auth, session["id"]).json
    assert done["status"] == "COMPLETED"
    assert done["object"]["size"] == len(data) and done["object"]["sha256"] == sha(data)
    if storage.bucket is None:
        assert "bucket" not in done["object"]
    else:
        assert done["object"]["bucket"] == storage.bucket
    assert read_object(storage, done["object"]["key"]) == data
    assert session["filename"] not in done["object"]["key"]
    # The parts' bytes are removed once the object exists.
    assert stored_part_keys(storage, session["id"]) == []
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json == done


def test_single_part_upload_without_declared_digest(app, auth, storage):
    data = b"just one small part"
    session = create(app, auth, size=len(data)).json
    assert session["total_parts"] == 1 and session["part_size"] == 1024
    put_part(app, auth, session["id"], 1, data)
    done = complete(app, auth, session["id"], body={"sha256": sha(data)}).json
    assert done["sha256"] == sha(data) and done["object"]["sha256"] == sha(data)
    assert read_object(storage, done["object"]["key"]) == data


def test_session_object_fields(app, auth):
    response = create(app, auth, size=10, part_size=4, content_type="text/plain", metadata={"k": "v"})
    session = response.json
    assert response.headers["Location"] == f"/uploads/sessions/{session['id']}"
    assert set(session) == {
        "id",
        "status",
        "filename",
        "content_type",
        "size",
        "part_size",
        "total_parts",
        "received_parts",
        "received_bytes",
        "sha256",
        "metadata",
        "created_at",
        "updated_at",
        "expires_at",
        "object",
        "assembled_bytes",
    }
    assert session["assembled_bytes"] is None  # a number only while COMPLETING
    assert session["content_type"] == "text/plain" and session["metadata"] == {"k": "v"}
    assert session["created_at"].endswith("Z") and session["expires_at"] > session["created_at"]
    assert (session["received_parts"], session["received_bytes"], session["sha256"]) == (0, 0, None)


# --- part retries and conflicts -----------------------------------------------------------------


def test_same_part_again_is_200_and_counted_once(app, auth, storage):
    session = create(app, auth, size=8, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd", status=201)
    again = put_part(app, auth, session["id"], 1, b"abcd", status=200).json
    assert again["received_parts"] == 1 and again["received_bytes"] == 4
    assert len(stored_part_keys(storage, session["id"])) == 1
    status = app.get(f"/uploads/sessions/{session['id']}", headers=auth).json
    assert (status["received_parts"], status["received_bytes"]) == (1, 4)


def test_different_bytes_for_a_part_is_409_and_first_stays(app, auth, storage):
    session = create(app, auth, size=8, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    problem = assert_problem(put_part(app, auth, session["id"], 1, b"wxyz", status=409), 409, "part_conflict")
    assert problem["sha256"] == sha(b"abcd")
    assert len(stored_part_keys(storage, session["id"])) == 1
    put_part(app, auth, session["id"], 2, b"efgh")
    done = complete(app, auth, session["id"]).json
    assert read_object(storage, done["object"]["key"]) == b"abcdefgh"


def test_list_parts_pages_for_resuming(app, auth):
    session = create(app, auth, size=10, part_size=1).json
    for number in (7, 2, 9, 4):
        put_part(app, auth, session["id"], number, bytes([number]))
    first = app.get(f"/uploads/sessions/{session['id']}/parts?limit=3", headers=auth).json
    assert [p["part_number"] for p in first["parts"]] == [2, 4, 7]
    assert first["next_after"] == 7
    assert first["parts"][0] == {
        "part_number": 2,
        "size": 1,
        "sha256": sha(bytes([2])),
        "created_at": first["parts"][0]["created_at"],
    }
    rest = app.get(f"/uploads/sessions/{session['id']}/parts?after=7&limit=3", headers=auth).json
    assert [p["part_number"] for p in rest["parts"]] == [9] and rest["next_after"] is None
    bad = app.get(f"/uploads/sessions/{session['id']}/parts?limit=0", headers=auth, status=400)
    assert_problem(bad, 400, "invalid_request")


# --- part rejections, in the contract's order ---------------------------------------------------


def test_part_checks_run_in_contract_order(app, auth, other_auth):
    session = create(app, auth, size=10, part_size=4).json
    sid = session["id"]
    # 1. unauthorized beats everything (even a bad session and part number)
    response = app.put(f"/uploads/sessions/{uuid.uuid4()}/parts/0", params=b"x", status=401)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # 2. session not found beats a bad part number; another client's session is not found
    assert_problem(put_part(app, auth, uuid.uuid4(), 0, b"x", status=404), 404, "session_not_found")
    assert_problem(put_part(app, auth, "not-a-uuid", 1, b"x", status=404), 404, "session_not_found")
    assert_problem(put_part(app, other_auth, sid, 1, b"abcd", status=404), 404, "session_not_found")
    # 4. part number range, before any length check
    for number in (0, 4, "x", -1):
        assert_problem(put_part(app, auth, sid, number, b"toolongbody", status=400), 400, "invalid_part_number")
    # 5. no Content-Length
    assert_problem(raw_put(app, auth, sid, 1, ShortBody(b"abcd"), None, status=411), 411, "length_required")
    # 6. too large, then the exact-size rule (the last part is 2 bytes)
    assert_problem(put_part(app, auth, sid, 1, b"abcde", status=413), 413, "part_too_large")
    assert_problem(put_part(app, auth, sid, 1, b"abc", status=400), 400, "part_size_mismatch")
    assert_problem(put_part(app, auth, sid, 3, b"abcd", status=400), 400, "part_size_mismatch")
    # nothing was recorded by any of that
    assert app.get(f"/uploads/sessions/{sid}", headers=auth).json["received_parts"] == 0


def test_inactive_session_refuses_parts_before_part_number_check(app, auth):
    session = create(app, auth, size=4, part_size=4).json
    app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)
    response = put_part(app, auth, session["id"], 99, b"abcd", status=409)
    assert_problem(response, 409, "session_not_active")


def test_content_digest_checked(app, auth, storage):
    session = create(app, auth, size=8, part_size=4).json
    response = put_part(
        app, auth, session["id"], 1, b"abcd", status=400, headers={"Content-Digest": content_digest(b"abce")}
    )
    assert_problem(response, 400, "digest_mismatch")
    assert stored_part_keys(storage, session["id"]) == []
    malformed = put_part(app, auth, session["id"], 1, b"abcd", status=400, headers={"Content-Digest": "sha-256=x"})
    assert_problem(malformed, 400, "invalid_request")
    ok = put_part(app, auth, session["id"], 1, b"abcd", headers={"Content-Digest": content_digest(b"abcd")})
    assert ok.json["received_parts"] == 1


def test_client_disconnect_mid_body_records_nothing(app, auth, storage):
    session = create(app, auth, size=2000, part_size=1000).json
    response = raw_put(app, auth, session["id"], 1, ShortBody(payload(600)), 1000, status=400)
    assert_problem(response, 400, "incomplete_body")
    status = app.get(f"/uploads/sessions/{session['id']}", headers=auth).json
    assert (status["status"], status["received_parts"], status["received_bytes"]) == ("INIT", 0, 0)
    assert app.get(f"/uploads/sessions/{session['id']}/parts", headers=auth).json["parts"] == []
    assert stored_part_keys(storage, session["id"]) == []


def test_session_aborted_while_body_streams(app, auth, storage):
    session = create(app, auth, size=8, part_size=4).json

    def abort_now():
        app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)

    response = raw_put(app, auth, session["id"], 1, ShortBody(b"abcd", on_first_read=abort_now), 4, status=409)
    assert_problem(response, 409, "session_not_active")
    assert app.get(f"/uploads/sessions/{session['id']}/parts", headers=auth).json["parts"] == []
    assert stored_part_keys(storage, session["id"]) == []


def test_expired_session_reads_expired_and_refuses_work(app, auth, database_url):
    session = create(app, auth, size=8, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (session["id"],)
        )
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "EXPIRED"
    listed = app.get("/uploads/sessions?status=EXPIRED", headers=auth).json["sessions"]
    assert [s["id"] for s in listed] == [session["id"]]
    assert_problem(put_part(app, auth, session["id"], 2, b"efgh", status=409), 409, "session_not_active")
    assert_problem(complete(app, auth, session["id"], status=409), 409, "session_not_active")
    app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "ABORTED"


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer csk_00000000_" + "a" * 43, "Bearer garbage"],
)
def test_bad_credentials_are_401(app, header):
    headers = {"Authorization": header} if header else {}
    response = app.get("/uploads/sessions", headers=headers, status=401)
    assert_problem(response, 401, "unauthorized")


def test_401_comes_before_404_and_405_on_every_uploads_path(app, auth):
    """A request under /uploads without a valid key learns nothing of the routes: not whether the
    path exists, nor which methods it takes; the part route checks its key before all else too."""
    sid = uuid.uuid4()
    refused = [
        ("GET", "/uploads"),
        ("GET", "/uploads/"),
        ("GET", "/uploads/nope"),
        ("POST", f"/uploads/sessions/{sid}/complete/extra"),
        ("PATCH", "/uploads/sessions"),
        ("OPTIONS", "/uploads/sessions"),
        ("GET", f"/uploads/sessions/{sid}/parts/1"),
        ("PATCH", f"/uploads/sessions/{sid}/parts/1"),
        ("PUT", f"/uploads/sessions/{sid}/parts/1"),
    ]
    for method, path in refused:
        response = app.request(path, method=method, status=401)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # With a key, the same requests get their 404 or 405.
    assert_problem(app.get("/uploads/nope", headers=auth, status=404), 404, "not_found")
    assert_problem(app.get("/uploads", headers=auth, status=404), 404, "not_found")
    assert_problem(
        app.request(f"/uploads/sessions/{sid}/parts/1", method="PATCH", headers=auth, status=405),
        405,
        "method_not_allowed",
    )
    # Outside /uploads nothing asks for a key.
    assert_problem(app.get("/uploadsx", status=404), 404, "not_found")


def test_revoked_key_is_401(app, keys):
    key, prefix = keys.create("carol")
    headers = {"Authorization": f"Bearer {key}"}
    app.get("/uploads/sessions", headers=headers, status=200)
    assert [revoked.prefix for revoked in keys.revoke(prefix)] == [prefix]
    assert_problem(app.get("/uploads/sessions", headers=headers, status=401), 401, "unauthorized")


def test_other_clients_sessions_are_invisible(app, auth, other_auth):
    session = create(app, auth, size=4, part_size=4).json
    sid = session["id"]
    assert_problem(app.get(f"/uploads/sessions/{sid}", headers=other_auth, status=404), 404, "session_not_found")
    assert_problem(app.get(f"/uploads/sessions/{sid}/parts", headers=other_auth, status=404), 404, "session_not_found")
    assert_problem(complete(app, other_auth, sid, status=404), 404, "session_not_found")
    assert_problem(app.delete(f"/uploads/sessions/{sid}", headers=other_auth, status=404), 404, "session_not_found")
    assert app.get("/uploads/sessions", headers=other_auth).json["sessions"] == []
    assert app.get(f"/uploads/sessions/{sid}", headers=auth).json["status"] == "INIT"


# --- creating and listing sessions --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b'"x"',
        b'{"filename": "a", "size": 1, "extra": 1}',
        b'{"filename": "a", "size": NaN}',
        b'{"filename": "a"}',
        b"",
        b'{"filename": "a", "size": 1, "part_size": 0}',
    ],
)
def test_create_rejects_invalid_bodies(app, auth, raw):
    response = app.post(
        "/uploads/sessions", params=raw, headers={**auth, "Content-Type": "application/json"}, status=400
    )
    assert_problem(response, 400, "invalid_request")
    assert app.get("/uploads/sessions", headers=auth).json["sessions"] == []


def test_create_size_and_part_count_limits(app, auth):
    assert_problem(create(app, auth, size=10 * 1024**3 + 1, status=413), 413, "upload_too_large")
    assert_problem(create(app, auth, size=10_001, part_size=1, status=400), 400, "too_many_parts")
    raised = create(app, auth, size=20_000 * 1024).json  # default 1 KiB parts would be 20,000
    assert raised["total_parts"] <= 10_000 and raised["part_size"] > 1024


def test_idempotency_key(app, auth, other_auth):
    headers = {"Idempotency-Key": "create-1"}
    first = create(app, auth, size=10, headers=headers)
    again = create(app, auth, size=10, headers=headers, status=200)
    assert again.json == first.json
    assert_problem(create(app, auth, size=11, headers=headers, status=409), 409, "idempotency_key_reused")
    # Keys are per client: another client's identical key creates its own session.
    assert create(app, other_auth, size=10, headers=headers).json["id"] != first.json["id"]
    assert len(app.get("/uploads/sessions", headers=auth).json["sessions"]) == 1
    assert_problem(
        create(app, auth, size=10, headers={"Idempotency-Key": "x" * 256}, status=400), 400, "invalid_request"
    )


def test_list_sessions_newest_first_with_cursor(app, auth):
    ids = [create(app, auth, size=1, filename=f"f{i}").json["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        url = "/uploads/sessions?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = app.get(url, headers=auth).json
        seen += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    put_part(app, auth, ids[0], 1, b"x")
    in_progress = app.get("/uploads/sessions?status=IN_PROGRESS", headers=auth).json["sessions"]
    assert [s["id"] for s in in_progress] == [ids[0]]
    assert_problem(app.get("/uploads/sessions?status=DONE", headers=auth, status=400), 400, "invalid_request")
    assert_problem(app.get("/uploads/sessions?cursor=!!", headers=auth, status=400), 400, "invalid_request")
    assert_problem(app.get("/uploads/sessions?limit=1001", headers=auth, status=400), 400, "invalid_request")


# --- completion -----------------------------------------------------------------------------------


def test_complete_with_missing_parts(app, auth):
    session = create(app, auth, size=250, part_size=1).json
    put_part(app, auth, session["id"], 2, b"x")
    problem = assert_problem(complete(app, auth, session["id"], status=409), 409, "parts_missing")
    assert problem["missing_count"] == 249
    assert problem["missing_parts"] == [1, *range(3, 102)]
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "IN_PROGRESS"


def test_complete_twice_returns_the_same_result(app, auth):
    session = create(app, auth, size=4, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    first = complete(app, auth, session["id"]).json
    assert complete(app, auth, session["id"]).json == first
    assert_problem(put_part(app, auth, session["id"], 1, b"abcd", status=409), 409, "session_not_active")
    assert_problem(app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=409), 409, "session_completed")


def test_whole_file_digest_mismatch_fails_the_session(app, auth, storage):
    session = create(app, auth, size=8, part_size=4, sha256=sha(b"somethingelse")).json
    put_part(app, auth, session["id"], 1, b"abcd")
    put_part(app, auth, session["id"], 2, b"efgh")
    problem = assert_problem(complete(app, auth, session["id"], status=422), 422, "checksum_mismatch")
    assert problem["actual_sha256"] == sha(b"abcdefgh")
    failed = app.get(f"/uploads/sessions/{session['id']}", headers=auth).json
    assert failed["status"] == "FAILED" and failed["object"] is None
    assert list(storage.list_keys(layout.OBJECTS)) == []
    assert stored_part_keys(storage, session["id"]) == []
    assert_problem(complete(app, auth, session["id"], status=409), 409, "session_not_active")
    app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)


def test_digest_given_at_complete_is_checked(app, auth):
    session = create(app, auth, size=4, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    assert_problem(
        complete(app, auth, session["id"], body={"sha256": sha(b"nope")}, status=422), 422, "checksum_mismatch"
    )


def test_digest_disagreeing_with_creation_is_refused(app, auth):
    session = create(app, auth, size=4, part_size=4, sha256=sha(b"abcd")).json
    put_part(app, auth, session["id"], 1, b"abcd")
    for body in ({"sha256": sha(b"other")}, {"sha256": "zz"}, {"other": 1}):
        assert_problem(complete(app, auth, session["id"], body=body, status=400), 400, "invalid_request")
    assert complete(app, auth, session["id"], body={"sha256": sha(b"abcd")}).json["status"] == "COMPLETED"


def test_completion_in_progress_then_takeover_after_crash(app, auth, database_url, storage):
    """A COMPLETING session whose assembler is alive (its completion lease has not run out)
    answers 202 (poll GET); once the assembler is gone and its lease has run out, complete
    finishes it. Abort waits with 409 completion_in_progress."""
    session = create(app, auth, size=8, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    put_part(app, auth, session["id"], 2, b"efgh")
    # A live assembler, as the database sees it; it dies at once: nobody renews its lease.
    hold_completion_lease(database_url, session["id"], 3, status="COMPLETING")
    busy = complete(app, auth, session["id"], status=202)
    assert busy.json["status"] == "COMPLETING" and busy.headers["Retry-After"] == "2"
    assert_problem(
        app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=409), 409, "completion_in_progress"
    )
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "COMPLETING"
    assert not completion_lease_ran_out(database_url, session["id"])  # all of that within the lease
    run_out_completion_lease(database_url, session["id"])  # its time comes, without waiting the 3 s
    assert completion_lease_ran_out(database_url, session["id"])  # the dead assembler's lease ran out
    done = complete(app, auth, session["id"]).json
    assert done["status"] == "COMPLETED"
    assert read_object(storage, done["object"]["key"]) == b"abcdefgh"


# --- abort ----------------------------------------------------------------------------------------


def test_abort_removes_parts_and_is_repeatable(app, auth, storage):
    session = create(app, auth, size=8, part_size=4).json
    put_part(app, auth, session["id"], 1, b"abcd")
    assert len(stored_part_keys(storage, session["id"])) == 1
    response = app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)
    assert response.body == b""
    assert stored_part_keys(storage, session["id"]) == []
    assert app.get(f"/uploads/sessions/{session['id']}", headers=auth).json["status"] == "ABORTED"
    app.delete(f"/uploads/sessions/{session['id']}", headers=auth, status=204)
    assert_problem(complete(app, auth, session["id"], status=409), 409, "session_not_active")
    assert_problem(app.delete(f"/uploads/sessions/{uuid.uuid4()}", headers=auth, status=404), 404, "session_not_found")


# --- cross-cutting --------------------------------------------------------------------------------


def test_request_ids(app, auth):
    sane = app.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert sane.headers["X-Request-ID"] == "abc-123"
    insane = app.get("/uploads/sessions", headers={"X-Request-ID": "bad id\x01"}, status=401)
    assert insane.headers["X-Request-ID"] != "bad id\x01" and len(insane.headers["X-Request-ID"]) == 32


def test_unknown_route_and_method_are_problems(app, auth):
    assert_problem(app.get("/nope", status=404), 404, "not_found")
    assert_problem(app.patch("/uploads/sessions", headers=auth, status=405), 405, "method_not_allowed")


def test_health_and_readiness(app):
    assert app.get("/healthz").json == {"status": "ok"}
    assert app.get("/readyz").json == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}


def test_unexpected_errors_do_not_leak(wsgi_app):
    class Boom:
        def on_get(self, req, resp):
            raise RuntimeError("password=hunter2 at /secret/path")

    wsgi_app.add_route("/boom", Boom())
    response = webtest.TestApp(wsgi_app).get("/boom", status=500)
    problem = assert_problem(response, 500, "internal_error")
    assert "hunter2" not in response.text and "/secret/path" not in response.text
    assert problem["detail"]
