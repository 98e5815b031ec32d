"""Upload tokens (contract v1.2): the owner mints one for a session; as a Bearer credential it
drives that session's upload (native parts, status, complete, abort; tus HEAD/PATCH/DELETE) and
nothing else: another session is 404, other calls 403, an expired token or an ended session 401.
Stored only hashed; dead ones are reaped. Real PostgreSQL and directory (webtest), then a real
gunicorn with tus-js-client resuming a backend-created session through ``uploadUrl`` and a token."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import StorageSpec
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from tests.conftest import TEST_LIMITS
from tests.helpers import complete, create, payload, put_part, sha, split
from tests.test_tus import SERVED_PART
from tools import tus_js as tus_js_client

TUS = {"Tus-Resumable": "1.0.0"}
PATCH_TYPE = {"Content-Type": "application/offset+octet-stream"}
PART = 1000


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    return file_spec  # tokens are the same whatever the storage


def _session(app, auth, size: int = 2500) -> str:
    return create(app, auth, size=size, part_size=PART).json["id"]


def _mint(app, auth, session_id: str, body=None, status: int = 201):
    if body is None:
        return app.post(f"/uploads/sessions/{session_id}/tokens", headers=auth, status=status)
    return app.post_json(f"/uploads/sessions/{session_id}/tokens", body, headers=auth, status=status)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(app, auth, session_id: str, **body) -> dict[str, str]:
    return _bearer(_mint(app, auth, session_id, body or None).json["token"])


def _sql(database_url: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _when(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# --- minting ----------------------------------------------------------------------------------


def test_the_owner_mints_a_token_stored_only_as_its_hash(app, auth, database_url):
    session_id = _session(app, auth)
    before = datetime.now(UTC).replace(microsecond=0)
    minted = _mint(app, auth, session_id)
    assert minted.headers["Cache-Control"] == "no-store"
    body = minted.json
    assert set(body) == {"token", "session_id", "expires_at"} and body["session_id"] == session_id
    assert body["token"].startswith("cst_") and len(body["token"]) == 4 + 43
    # The default lifetime, CHUNKSVC_TOKEN_TTL: an hour.
    assert before + timedelta(seconds=3599) <= _when(body["expires_at"]) <= before + timedelta(seconds=3601)

    rows = _sql(database_url, "SELECT token_hash, session_id, expires_at FROM upload_tokens")
    assert rows == [(hashlib.sha256(body["token"].encode()).digest(), uuid.UUID(session_id), _when(body["expires_at"]))]
    dump = str(_sql(database_url, "SELECT t::text FROM upload_tokens t"))
    assert body["token"] not in dump and body["token"][4:] not in dump


def test_a_ttl_is_honoured_but_never_past_the_sessions_own_expiry(app, auth):
    session_id = _session(app, auth)
    short = _mint(app, auth, session_id, {"ttl": 60}).json
    assert 58 <= (_when(short["expires_at"]) - datetime.now(UTC)).total_seconds() <= 61
    expires = _when(app.get(f"/uploads/sessions/{session_id}", headers=auth).json["expires_at"])
    # The test sessions live an hour (TEST_LIMITS); a day's token ends with its session.
    long = _mint(app, auth, session_id, {"ttl": 86400}).json
    assert _when(long["expires_at"]) == expires
    assert short["token"] != long["token"]


@pytest.mark.parametrize(
    "body", [{"ttl": 0}, {"ttl": -5}, {"ttl": 86401}, {"ttl": "60"}, {"ttl": True}, {"ttl": 1.5}, {"tll": 60}, [60]]
)
def test_a_bad_ttl_is_400_and_mints_nothing(app, auth, database_url, body):
    session_id = _session(app, auth)
    assert _mint(app, auth, session_id, body, status=400).json["code"] == "invalid_request"
    assert _sql(database_url, "SELECT count(*) FROM upload_tokens") == [(0,)]


@pytest.mark.parametrize("raw", [b"\r", b" ", b"\n\t"])
def test_a_body_of_white_space_alone_is_not_json_and_mints_nothing(app, auth, database_url, raw):
    # Found by the live OpenAPI fuzz: "\r" was taken for no body, and a token was minted.
    session_id = _session(app, auth)
    headers = {**auth, "Content-Type": "application/json"}
    response = app.post(f"/uploads/sessions/{session_id}/tokens", raw, headers=headers, status=400)
    assert response.json["code"] == "invalid_request"
    assert _sql(database_url, "SELECT count(*) FROM upload_tokens") == [(0,)]
    # Complete takes an optional body the same way.
    complete = app.post(f"/uploads/sessions/{session_id}/complete", raw, headers=headers, status=400)
    assert complete.json["code"] == "invalid_request"


def test_the_maximum_comes_from_the_configuration(config, db, storage, auth):
    strict = webtest.TestApp(
        create_app(dataclasses.replace(config, token_ttl=30, token_max_ttl=120), db=db, storage=storage)
    )
    session_id = _session(strict, auth)
    assert _mint(strict, auth, session_id, {"ttl": 121}, status=400).json["code"] == "invalid_request"
    default = _mint(strict, auth, session_id).json
    assert 28 <= (_when(default["expires_at"]) - datetime.now(UTC)).total_seconds() <= 31


def test_only_the_owner_of_a_live_session_mints(app, auth, other_auth, database_url):
    session_id = _session(app, auth)
    assert _mint(app, other_auth, session_id, status=404).json["code"] == "session_not_found"
    assert _mint(app, auth, str(uuid.uuid4()), status=404).json["code"] == "session_not_found"
    assert _mint(app, auth, "not-a-uuid", status=404).json["code"] == "session_not_found"
    assert _mint(app, {}, session_id, status=401).json["code"] == "unauthorized"
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert _mint(app, auth, session_id, status=409).json["code"] == "session_not_active"
    assert _sql(database_url, "SELECT count(*) FROM upload_tokens") == [(0,)]


# --- what a token may do ------------------------------------------------------------------------


def test_a_token_drives_its_sessions_native_upload_to_the_end(app, auth, storage):
    data = payload(2500, seed=1)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    token = _token(app, auth, session_id)
    for number, chunk in enumerate(split(data, PART), start=1):
        put_part(app, token, session_id, number, chunk)
    assert app.get(f"/uploads/sessions/{session_id}", headers=token).json["received_parts"] == 3
    parts = app.get(f"/uploads/sessions/{session_id}/parts", headers=token).json["parts"]
    assert [part["part_number"] for part in parts] == [1, 2, 3]
    done = complete(app, token, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    # A completed session did not end badly: its token still reads the result.
    assert app.get(f"/uploads/sessions/{session_id}", headers=token).json["status"] == "COMPLETED"
    with storage.open(done["object"]["key"]) as stream:
        assert stream.read() == data


def test_a_token_drives_a_backend_created_session_through_tus(app, auth, storage):
    data = payload(2500, seed=2)
    session_id = create(app, auth, size=len(data), part_size=PART).json["id"]
    token = _token(app, auth, session_id)
    described = app.head(f"/tus/{session_id}", headers={**token, **TUS}, status=200)
    assert described.headers["Upload-Offset"] == "0" and described.headers["Upload-Length"] == str(len(data))
    assert base64.b64decode(described.headers["Upload-Metadata"].split(" ")[1]) == b"file.bin"
    offset = 0
    for piece in (data[:777], data[777:2001], data[2001:]):  # unaligned with the parts
        patched = app.patch(
            f"/tus/{session_id}",
            params=piece,
            headers={**token, **TUS, **PATCH_TYPE, "Upload-Offset": str(offset)},
            status=204,
        )
        offset += len(piece)
        assert patched.headers["Upload-Offset"] == str(offset)
    finished = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert finished["status"] == "COMPLETED" and finished["object"]["sha256"] == sha(data)


def test_a_token_may_abort_its_session_and_then_it_is_dead(app, auth, database_url):
    session_id = _session(app, auth)
    token = _token(app, auth, session_id)
    app.delete(f"/uploads/sessions/{session_id}", headers=token, status=204)
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "ABORTED"
    refused = app.get(f"/uploads/sessions/{session_id}", headers=token, status=401)
    assert refused.json["code"] == "unauthorized" and "ended" in refused.json["detail"]
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")

    other = _session(app, auth)
    tus_token = _token(app, auth, other)
    app.delete(f"/tus/{other}", headers={**tus_token, **TUS}, status=204)
    assert app.head(f"/tus/{other}", headers={**tus_token, **TUS}, status=401)


def test_another_session_is_404_through_every_call_a_token_has(app, auth, other_auth):
    mine = _session(app, auth)
    token = _token(app, auth, mine)
    sibling = _session(app, auth)  # the same owner's: still not the token's
    strangers = _session(app, other_auth)
    for target in (sibling, strangers, str(uuid.uuid4()), "not-a-uuid"):
        calls = [
            app.get(f"/uploads/sessions/{target}", headers=token, status=404),
            app.get(f"/uploads/sessions/{target}/parts", headers=token, status=404),
            put_part(app, token, target, 1, b"x" * PART, status=404),
            app.post(f"/uploads/sessions/{target}/complete", headers=token, status=404),
            app.delete(f"/uploads/sessions/{target}", headers=token, status=404),
            app.head(f"/tus/{target}", headers={**token, **TUS}, status=404),
            app.patch(
                f"/tus/{target}",
                params=b"x",
                headers={**token, **TUS, **PATCH_TYPE, "Upload-Offset": "0"},
                status=404,
            ),
            app.delete(f"/tus/{target}", headers={**token, **TUS}, status=404),
        ]
        for refused in calls:
            if refused.body:  # HEAD answers carry no body
                assert refused.json["code"] == "session_not_found", refused
    # Nothing happened to the sibling.
    assert app.get(f"/uploads/sessions/{sibling}", headers=auth).json["received_parts"] == 0
    assert app.get(f"/uploads/sessions/{sibling}", headers=auth).json["status"] == "INIT"


def test_everything_else_is_403_for_a_token_and_does_nothing(app, auth, database_url):
    session_id = _session(app, auth)
    token = _token(app, auth, session_id)
    calls = [
        app.post_json("/uploads/sessions", {"filename": "x.bin", "size": 10}, headers=token, status=403),
        app.get("/uploads/sessions", headers=token, status=403),
        app.get("/uploads/limits", headers=token, status=403),
        _mint(app, token, session_id, status=403),
        _mint(app, token, session_id, {"ttl": 60}, status=403),
        app.post("/tus/", headers={**token, **TUS, "Upload-Length": "10"}, status=403),
    ]
    for refused in calls:
        assert refused.json["code"] == "forbidden", refused
    assert _sql(database_url, "SELECT count(*) FROM upload_sessions") == [(1,)]
    assert _sql(database_url, "SELECT count(*) FROM upload_tokens") == [(1,)]


def test_an_expired_token_is_401_on_every_path_the_part_path_too(app, auth, database_url):
    session_id = _session(app, auth)
    token = _token(app, auth, session_id)
    _sql(database_url, "UPDATE upload_tokens SET created_at = now() - interval '2 hours', expires_at = now()")
    calls = [
        app.get(f"/uploads/sessions/{session_id}", headers=token, status=401),
        put_part(app, token, session_id, 1, b"x" * PART, status=401),  # the fast path's own lookup
        app.patch(
            f"/tus/{session_id}", params=b"x", headers={**token, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}, status=401
        ),
        # 401 before 403 and 404: an expired token learns nothing else.
        app.get("/uploads/sessions", headers=token, status=401),
        app.get(f"/uploads/sessions/{uuid.uuid4()}", headers=token, status=401),
    ]
    for refused in calls:
        assert refused.json["code"] == "unauthorized"
        assert "expired" in refused.json["detail"]
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["received_parts"] == 0


@pytest.mark.parametrize("ending", ["EXPIRED", "FAILED"])
def test_a_token_whose_session_ended_otherwise_is_401_too(app, auth, database_url, ending):
    session_id = _session(app, auth)
    token = _token(app, auth, session_id)
    if ending == "EXPIRED":  # past its expiry, before the reaper stores it: the token goes by what clients see
        _sql(
            database_url,
            "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s",
            (session_id,),
        )
    else:
        _sql(database_url, "UPDATE upload_sessions SET status = 'FAILED' WHERE id = %s", (session_id,))
    assert app.get(f"/uploads/sessions/{session_id}", headers=token, status=401).json["code"] == "unauthorized"
    assert put_part(app, token, session_id, 1, b"x" * PART, status=401).json["code"] == "unauthorized"
    assert app.head(f"/tus/{session_id}", headers={**token, **TUS}, status=401)


@pytest.mark.parametrize(
    "credential",
    ["cst_" + "A" * 43, "cst_short", "cst_" + "A" * 42 + "!", "csk_" + "A" * 43],
)
def test_an_unknown_or_malformed_token_is_401(app, auth, credential):
    session_id = _session(app, auth)
    assert app.get(f"/uploads/sessions/{session_id}", headers=_bearer(credential), status=401)
    assert put_part(app, _bearer(credential), session_id, 1, b"x" * PART, status=401)


def test_the_api_key_keeps_every_right_beside_a_token(app, auth):
    session_id = _session(app, auth)
    _token(app, auth, session_id)
    assert app.get("/uploads/sessions", headers=auth).json["sessions"][0]["id"] == session_id
    assert app.get("/uploads/limits", headers=auth).status_int == 200


def test_the_reaper_removes_dead_tokens_and_keeps_live_ones(app, auth, db, storage, database_url):
    live = _session(app, auth)
    _token(app, auth, live)
    expired = _token(app, auth, live, ttl=60)
    aborted = _session(app, auth)
    _token(app, auth, aborted)
    app.delete(f"/uploads/sessions/{aborted}", headers=auth, status=204)
    _sql(
        database_url,
        "UPDATE upload_tokens SET created_at = now() - interval '2 minutes', expires_at = now() - interval '1 second'"
        " WHERE token_hash = %s",
        (hashlib.sha256(expired["Authorization"].split()[1].encode()).digest(),),
    )
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    dry = Reaper(db, storage, completion, ReaperSettings(dry_run=True)).run()
    assert dry.tokens_removed == 2
    assert _sql(database_url, "SELECT count(*) FROM upload_tokens") == [(3,)]
    result = Reaper(db, storage, completion, ReaperSettings()).run()
    assert result.tokens_removed == 2 and sorted(result.touched["tokens_removed"]) == sorted([live, aborted])
    assert "2 dead upload tokens removed" in result.summary()
    assert _sql(database_url, "SELECT session_id FROM upload_tokens") == [(uuid.UUID(live),)]
    assert Reaper(db, storage, completion, ReaperSettings()).run().tokens_removed == 0


# --- a real server and a real client ---------------------------------------------------------------


def test_tus_js_client_finishes_a_backend_created_session_with_upload_url_and_a_token(
    gunicorn_server, tmp_path, tus_js
):
    """What the browser example does: the backend creates the session with its API key and mints
    a token; the client gets the /tus/{id} URL and the token, never the key."""
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_DEFAULT_PART_SIZE": str(SERVED_PART),
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
    }
    data = payload(300_007, seed=9)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    with gunicorn_server(spec, env, name="tokens", client="backend") as served:
        server = served.server
        key = {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"}
        status, _, body = server.request(
            "POST",
            "/uploads/sessions",
            body=json.dumps({"filename": "u.bin", "size": len(data)}).encode(),
            headers=key,
        )
        assert status == 201, body
        session_id = json.loads(body)["id"]
        status, _, body = server.request("POST", f"/uploads/sessions/{session_id}/tokens", headers=key)
        assert status == 201, body
        token = json.loads(body)["token"]
        uploaded = tus_js_client.upload(
            tus_js,
            path,
            {
                "uploadUrl": f"{server.url}/tus/{session_id}",
                "headers": {"Authorization": f"Bearer {token}"},
                "chunkSize": 100_000,
            },
        )
        assert uploaded == f"{server.url}/tus/{session_id}"
        status, _, body = server.request("GET", f"/uploads/sessions/{session_id}", headers=key)
        found = json.loads(body)
        assert found["status"] == "COMPLETED" and found["object"]["sha256"] == sha(data)
        # The token is scoped: it cannot list the backend's sessions.
        status, _, body = server.request("GET", "/uploads/sessions", headers={"Authorization": f"Bearer {token}"})
        assert status == 403 and json.loads(body)["code"] == "forbidden"
