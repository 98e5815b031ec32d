"""The tus 1.0 endpoint (contract v1.2): the protocol's rules directly (webtest), then real clients.

A tus upload is a chunksvc session, so each test also looks at it through the native API.
The protocol tests run on disk (``storage_spec`` below); the real-client tests say where they run.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import Config, Quotas, StorageSpec
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.services.tus import SpoolMemory, _Spool
from chunksvc.services.webhooks import SigningKey, WebhookRegistry
from tests.conftest import TEST_LIMITS
from tests.helpers import ShortBody, payload, query, sha, wait_for
from tests.storage_fixtures import drop_bucket, make_s3_spec
from tools import tus_js as tus_js_client

ROOT = Path(__file__).resolve().parents[1]

TUS = {"Tus-Resumable": "1.0.0"}
PATCH_TYPE = {"Content-Type": "application/offset+octet-stream"}
PART = 1024  # TEST_LIMITS.default_part_size: a tus upload's parts


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    return file_spec


@pytest.fixture(params=["spooled", "in-place"])
def config(config: Config, request: pytest.FixtureRequest) -> Config:
    # Every API test of tus both ways: a PATCH's whole parts spooled, then stored under keys of
    # their own; and (on local disk) written in place, where a native PUT writes its parts.
    return dataclasses.replace(config, in_place_min_part=1) if request.param == "in-place" else config


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def create(app, auth, length: int, status: int = 201, headers: dict | None = None, **kwargs):
    return app.post(
        "/tus/", headers={**auth, **TUS, "Upload-Length": str(length), **(headers or {})}, status=status, **kwargs
    )


def upload_id(response) -> str:
    return response.headers["Location"].rsplit("/", 1)[1]


def patch(app, auth, uid: str, offset: int, data: bytes, status: int = 204, headers: dict | None = None):
    return app.patch(
        f"/tus/{uid}",
        params=data,
        headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": str(offset), **(headers or {})},
        status=status,
    )


def head(app, auth, uid: str, status: int = 200):
    return app.head(f"/tus/{uid}", headers={**auth, **TUS}, status=status)


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def session(app, auth, uid: str) -> dict:
    return app.get(f"/uploads/sessions/{uid}", headers=auth).json


def stored_object(storage, session_json: dict) -> bytes:
    with storage.open(session_json["object"]["key"]) as stream:
        return stream.read()


@pytest.mark.parametrize("memory", [0, 100, 10_000], ids=["file", "memory-then-file", "memory"])
def test_a_spool_holds_a_piece_in_memory_as_far_as_granted_then_in_a_file(memory):
    budget = SpoolMemory(memory)
    data = payload(5000)
    with _Spool(budget, len(data)) as spool:
        left = max(0, memory - len(data))
        assert budget.take(10_000) == left  # the spool took what it needs, or all there was
        budget.give_back(left)
        assert spool.fill(io.BytesIO(data), len(data), None, 1024) is None
        assert spool.read(10_000) == data
        on_disk = getattr(spool._file, "_rolled", True)  # a SpooledTemporaryFile that rolled over, or a file
        assert on_disk == (memory < len(data))
    assert budget.take(10_000) == memory  # given back on close


# --- discovery and the version rule -----------------------------------------------------------


def test_options_needs_no_credentials_and_lists_what_the_contract_names(app):
    response = app.options("/tus/", status=204)
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    extensions = set(response.headers["Tus-Extension"].split(","))
    assert {"creation", "creation-with-upload", "termination", "expiration", "checksum", "concatenation"} <= extensions
    assert {"sha256", "sha1"} <= set(response.headers["Tus-Checksum-Algorithm"].split(","))
    assert int(response.headers["Tus-Max-Size"]) == 10 * 1024 * 1024 * 1024


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0"])
def test_another_tus_version_is_412_with_tus_version(app, auth, version):
    headers = {**auth, "Upload-Length": "10"}
    if version is not None:
        headers["Tus-Resumable"] = version
    response = app.post("/tus/", headers=headers, status=412)
    assert response.headers["Tus-Version"] == "1.0.0"
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.json["code"] == "unsupported_version"
    assert app.get("/uploads/sessions", headers=auth).json["sessions"] == []


def test_no_credentials_is_401_before_anything_else(app):
    response = app.post("/tus/", headers={"Upload-Length": "10"}, status=401)
    assert response.json["code"] == "unauthorized"
    assert response.headers["Tus-Resumable"] == "1.0.0"


# --- creation and HEAD ------------------------------------------------------------------------


def test_creation_makes_an_ordinary_session_with_the_metadata(app, auth):
    metadata = f"filename {b64('report.pdf')},filetype {b64('application/pdf')},owner {b64('ünïcode')},flag"
    response = create(app, auth, 3000, headers={"Upload-Metadata": metadata})
    assert response.headers["Location"].startswith("/tus/")
    uid = upload_id(response)
    found = session(app, auth, uid)
    assert found["filename"] == "report.pdf"
    assert found["content_type"] == "application/pdf"
    assert found["metadata"] == {"owner": "ünïcode", "flag": ""}
    assert found["size"] == 3000 and found["status"] == "INIT" and found["part_size"] == PART
    described = head(app, auth, uid)
    assert described.headers["Upload-Offset"] == "0"
    assert described.headers["Upload-Length"] == "3000"
    assert described.headers["Upload-Metadata"] == metadata
    assert described.headers["Cache-Control"] == "no-store"
    assert described.headers["Upload-Expires"].endswith(" GMT")


def test_an_empty_upload_metadata_header_is_no_metadata(app, auth):
    uid = upload_id(create(app, auth, 10, headers={"Upload-Metadata": ""}))
    found = session(app, auth, uid)
    assert found["metadata"] == {} and found["filename"] == "upload"
    assert "Upload-Metadata" not in head(app, auth, uid).headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Upload-Length": "-1"},
        {"Upload-Length": "ten"},
        {"Upload-Metadata": "filename not*base64"},
        {"Upload-Metadata": f"a {b64('x')},a {b64('y')}"},
        {"Upload-Defer-Length": "1"},
        {"Upload-Concat": "sideways"},
    ],
)
def test_bad_creation_headers_are_400_and_create_nothing(app, auth, headers):
    response = create(app, auth, 10, status=400, headers=headers)
    assert response.json["code"] == "invalid_request"
    assert app.get("/uploads/sessions", headers=auth).json["sessions"] == []


def test_an_upload_above_tus_max_size_is_413(app, auth):
    assert create(app, auth, 10 * 1024**3 + 1, status=413).json["code"] == "upload_too_large"


def test_another_clients_upload_is_404_and_an_unknown_one_too(app, auth, other_auth):
    uid = upload_id(create(app, auth, 10))
    head(app, other_auth, uid, status=404)
    assert patch(app, other_auth, uid, 0, b"x" * 10, status=404).json["code"] == "session_not_found"
    app.delete(f"/tus/{uid}", headers={**other_auth, **TUS}, status=404)
    head(app, auth, "00000000-0000-4000-8000-000000000000", status=404)
    head(app, auth, "not-an-id", status=404)
    assert head(app, auth, uid).headers["Upload-Offset"] == "0"


# --- PATCH ------------------------------------------------------------------------------------


def test_unaligned_patches_become_parts_and_the_upload_completes(app, auth, storage):
    data = payload(5 * PART + 123)
    uid = upload_id(create(app, auth, len(data)))
    offset = 0
    for size in (100, 1500, 1, 2047, len(data)):  # across part boundaries, never on them
        chunk = data[offset : offset + size]
        response = patch(app, auth, uid, offset, chunk)
        offset += len(chunk)
        assert response.headers["Upload-Offset"] == str(offset)
        assert head(app, auth, uid).headers["Upload-Offset"] == str(offset)
        if offset == len(data):
            break
    found = session(app, auth, uid)
    assert found["status"] == "COMPLETED"
    assert found["object"]["sha256"] == sha(data) and found["object"]["size"] == len(data)
    assert stored_object(storage, found) == data
    parts = app.get(f"/uploads/sessions/{uid}/parts", headers=auth).json["parts"]
    assert [part["size"] for part in parts] == [PART] * 5 + [123]
    assert [part["sha256"] for part in parts] == [sha(data[i : i + PART]) for i in range(0, len(data), PART)]


def test_small_patches_write_only_their_own_bytes_until_the_part_is_full(app, auth, storage):
    data = payload(3000)
    uid = upload_id(create(app, auth, len(data)))

    def stored_sizes() -> list[int]:
        sizes = []
        for listed in storage.list_keys(f"parts/{uid}/"):
            with storage.open(listed.key) as stream:
                sizes.append(len(stream.read()))
        return sorted(sizes)

    offset = 0
    for size in (100, 200, 300):
        patch(app, auth, uid, offset, data[offset : offset + size])
        offset += size
    assert stored_sizes() == [100, 200, 300]  # one piece per PATCH, nothing rewritten
    patch(app, auth, uid, offset, data[offset : offset + 500])  # fills part 1 (424 bytes), 76 over
    assert stored_sizes() == [76, PART]
    assert app.get(f"/uploads/sessions/{uid}/parts", headers=auth).json["parts"][0]["sha256"] == sha(data[:PART])


def test_whole_parts_of_a_patch_go_where_native_parts_go(app, auth, storage, config, database_url):
    data = payload(6 * PART, seed=3)
    uid = upload_id(create(app, auth, len(data)))
    patch(app, auth, uid, 0, data[:100])  # part 1 in the making
    patch(app, auth, uid, 100, data[100 : 4 * PART])  # fills part 1 from its pieces, then parts 2-4 whole
    keys = dict(query(database_url, "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (uid,)))
    assembly = f"parts/{uid}/assembly"
    if config.in_place_min_part == 1:
        assert keys[1] != assembly and [keys[n] for n in (2, 3, 4)] == [assembly] * 3
    else:
        assert len(set(keys.values())) == 4 and assembly not in keys.values()
    patch(app, auth, uid, 4 * PART, data[4 * PART :])
    found = session(app, auth, uid)
    assert found["status"] == "COMPLETED" and found["object"]["sha256"] == sha(data)
    assert stored_object(storage, found) == data


def test_offset_mismatch_is_409_and_changes_nothing(app, auth):
    uid = upload_id(create(app, auth, 3000))
    patch(app, auth, uid, 0, b"a" * 700)
    response = patch(app, auth, uid, 600, b"b" * 10, status=409)
    assert response.json["code"] == "offset_mismatch" and response.json["offset"] == 700
    patch(app, auth, uid, 800, b"b" * 10, status=409)
    assert head(app, auth, uid).headers["Upload-Offset"] == "700"


def test_a_patch_needs_the_tus_content_type_and_an_offset(app, auth):
    uid = upload_id(create(app, auth, 100))
    response = app.patch(
        f"/tus/{uid}",
        params=b"x",
        headers={**auth, **TUS, "Content-Type": "application/octet-stream", "Upload-Offset": "0"},
        status=415,
    )
    assert response.json["code"] == "unsupported_media_type"
    app.patch(f"/tus/{uid}", params=b"x", headers={**auth, **TUS, **PATCH_TYPE}, status=400)
    assert patch(app, auth, uid, 0, b"x" * 101, status=413).json["code"] == "upload_too_large"
    assert head(app, auth, uid).headers["Upload-Offset"] == "0"


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_upload_checksum_is_verified_460_on_mismatch_and_the_offset_stays(app, auth, algorithm):
    data = payload(2500)
    uid = upload_id(create(app, auth, len(data)))
    patch(app, auth, uid, 0, data[:900], headers={"Upload-Checksum": checksum(algorithm, data[:900])})
    wrong = checksum(algorithm, b"other bytes")
    response = patch(app, auth, uid, 900, data[900:2000], status=460, headers={"Upload-Checksum": wrong})
    assert response.status == "460 Checksum Mismatch"
    assert response.json["code"] == "upload_checksum_mismatch"
    assert head(app, auth, uid).headers["Upload-Offset"] == "900"
    assert session(app, auth, uid)["received_parts"] == 0  # the full part the bad body held is not recorded
    patch(app, auth, uid, 900, data[900:], headers={"Upload-Checksum": checksum(algorithm, data[900:])})
    assert session(app, auth, uid)["object"]["sha256"] == sha(data)


@pytest.mark.parametrize("header", ["md5 AAAA", "crc32 AAAA", "sha256 not-base64!", "sha256 " + b64("short")])
def test_an_unknown_checksum_algorithm_or_bad_digest_is_400(app, auth, header):
    uid = upload_id(create(app, auth, 10))
    assert patch(app, auth, uid, 0, b"x" * 10, status=400, headers={"Upload-Checksum": header}).json["code"] == (
        "invalid_request"
    )
    assert head(app, auth, uid).headers["Upload-Offset"] == "0"


def test_a_body_cut_off_midway_keeps_what_arrived(app, auth, storage):
    data = payload(4000)
    uid = upload_id(create(app, auth, len(data)))
    request = webtest.TestRequest.blank(
        f"/tus/{uid}", method="PATCH", headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}
    )
    arrived = data[: 2 * PART + 300]  # two parts and some: then the client is gone
    request.environ["wsgi.input"] = ShortBody(arrived)
    request.environ["CONTENT_LENGTH"] = str(len(data))
    app.do_request(request, status=400)
    assert head(app, auth, uid).headers["Upload-Offset"] == str(len(arrived))
    assert session(app, auth, uid)["received_parts"] == 2
    patch(app, auth, uid, len(arrived), data[len(arrived) :])
    found = session(app, auth, uid)
    assert found["status"] == "COMPLETED" and stored_object(storage, found) == data


def test_creation_with_upload(app, auth, storage):
    data = payload(1500)
    first = data[:1200]
    with_body = {**PATCH_TYPE, "Upload-Checksum": checksum("sha1", first)}
    response = create(app, auth, len(data), headers=with_body, params=first)
    uid = upload_id(response)
    assert response.headers["Upload-Offset"] == "1200"
    patch(app, auth, uid, 1200, data[1200:])
    assert stored_object(storage, session(app, auth, uid)) == data


def test_x_http_method_override_turns_a_post_into_a_patch(app, auth):
    uid = upload_id(create(app, auth, 100))
    response = app.post(
        f"/tus/{uid}",
        params=b"x" * 40,
        headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"},
        status=204,
    )
    assert response.headers["Upload-Offset"] == "40"


# --- ends: completed, terminated, expired -------------------------------------------------------


def test_a_patch_to_a_completed_upload_is_409(app, auth):
    uid = upload_id(create(app, auth, 10))
    patch(app, auth, uid, 0, b"0123456789")
    assert session(app, auth, uid)["status"] == "COMPLETED"
    assert head(app, auth, uid).headers["Upload-Offset"] == "10"
    assert patch(app, auth, uid, 10, b"", status=409).json["code"] == "session_completed"


def test_termination_aborts_the_session_and_then_it_is_gone(app, auth):
    uid = upload_id(create(app, auth, 3000))
    patch(app, auth, uid, 0, b"x" * 1500)
    app.delete(f"/tus/{uid}", headers={**auth, **TUS}, status=204)
    assert session(app, auth, uid)["status"] == "ABORTED"
    head(app, auth, uid, status=410)
    assert patch(app, auth, uid, 1500, b"x", status=410).json["code"] == "session_gone"
    app.delete(f"/tus/{uid}", headers={**auth, **TUS}, status=410)


def test_a_termination_while_a_patch_streams_makes_the_patch_410(app, auth, storage):
    data = payload(3 * PART, seed=6)
    uid = upload_id(create(app, auth, len(data)))

    def terminate_meanwhile():
        app.delete(f"/tus/{uid}", headers={**auth, **TUS}, status=204)

    request = webtest.TestRequest.blank(
        f"/tus/{uid}", method="PATCH", headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}
    )
    request.environ["wsgi.input"] = ShortBody(data, on_first_read=terminate_meanwhile)
    request.environ["CONTENT_LENGTH"] = str(len(data))
    assert app.do_request(request, status=410).json["code"] == "session_gone"
    assert list(storage.list_keys(f"parts/{uid}/")) == []


def test_an_expired_upload_is_410(app, auth, database_url):
    uid = upload_id(create(app, auth, 3000))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (uid,))
    head(app, auth, uid, status=410)
    patch(app, auth, uid, 0, b"x", status=410)


def test_a_native_session_can_be_driven_through_tus(app, auth, storage):
    data = payload(2100)
    created = app.post_json("/uploads/sessions", {"filename": "n.bin", "size": len(data)}, headers=auth).json
    described = head(app, auth, created["id"])
    assert base64.b64decode(described.headers["Upload-Metadata"].split(",")[0].split(" ")[1]) == b"n.bin"
    patch(app, auth, created["id"], 0, data)
    assert stored_object(storage, session(app, auth, created["id"])) == data


# --- concatenation ----------------------------------------------------------------------------


def test_concatenation_final_is_the_partials_in_order_and_only_it_is_visible(app, auth, storage):
    data = payload(3 * PART + 700)
    slices = [data[:1500], data[1500:1501], data[1501:]]
    partials = []
    for piece in slices:
        uid = upload_id(create(app, auth, len(piece), headers={"Upload-Concat": "partial"}))
        patch(app, auth, uid, 0, piece[: len(piece) // 2])
        patch(app, auth, uid, len(piece) // 2, piece[len(piece) // 2 :])
        assert head(app, auth, uid).headers["Upload-Concat"] == "partial"
        partials.append(uid)
    final = app.post(
        "/tus/",
        headers={
            **auth,
            **TUS,
            "Upload-Concat": "final;" + " ".join(f"http://example.com/tus/{p}" for p in partials),
            "Upload-Metadata": f"filename {b64('joined.bin')}",
        },
        status=201,
    )
    final_id = upload_id(final)
    found = session(app, auth, final_id)
    assert found["status"] == "COMPLETED" and found["filename"] == "joined.bin"
    assert found["size"] == len(data) and stored_object(storage, found) == data
    listed = app.get("/uploads/sessions", headers=auth).json["sessions"]
    assert [s["id"] for s in listed] == [final_id]
    assert head(app, auth, final_id).headers["Upload-Concat"] == "final;" + " ".join(f"/tus/{p}" for p in partials)
    assert patch(app, auth, final_id, len(data), b"", status=403).json["code"] == "forbidden"
    for uid in partials:  # ended with their final, silently
        assert session(app, auth, uid)["status"] == "ABORTED"


def test_a_final_may_come_before_its_partials_are_done(app, auth, storage):
    data = payload(2 * PART)
    first = upload_id(create(app, auth, PART, headers={"Upload-Concat": "partial"}))
    second = upload_id(create(app, auth, PART, headers={"Upload-Concat": "partial"}))
    patch(app, auth, first, 0, data[:PART])
    final_id = upload_id(
        app.post("/tus/", headers={**auth, **TUS, "Upload-Concat": f"final;/tus/{first} /tus/{second}"}, status=201)
    )
    assert session(app, auth, final_id)["status"] == "INIT"
    patch(app, auth, second, 0, data[PART:])
    found = session(app, auth, final_id)
    assert found["status"] == "COMPLETED" and stored_object(storage, found) == data


def test_a_partial_goes_into_one_final_only_and_must_be_a_partial(app, auth, other_auth):
    partial = upload_id(create(app, auth, 10, headers={"Upload-Concat": "partial"}))
    plain = upload_id(create(app, auth, 10))
    final = {**auth, **TUS, "Upload-Concat": f"final;/tus/{partial}"}
    app.post("/tus/", headers={**other_auth, **TUS, "Upload-Concat": f"final;/tus/{partial}"}, status=404)
    app.post("/tus/", headers={**auth, **TUS, "Upload-Concat": f"final;/tus/{plain}"}, status=400)
    app.post("/tus/", headers=final, status=201)
    assert app.post("/tus/", headers=final, status=409).json["code"] == "session_not_active"


# --- the same sessions: quotas, the reaper, webhooks, races ----------------------------------------


def test_tus_creation_obeys_the_quotas(config, db, storage, auth):
    limited = webtest.TestApp(
        create_app(dataclasses.replace(config, quotas=Quotas(sessions=1, bytes=100)), db=db, storage=storage)
    )
    create(limited, auth, 60)
    refused = create(limited, auth, 10, status=429).json
    assert refused["code"] == "quota_exceeded" and (refused["limit"], refused["used"]) == (1, 1)
    assert len(limited.get("/uploads/sessions", headers=auth).json["sessions"]) == 1


def test_the_reaper_keeps_an_incomplete_part_and_purges_an_ended_upload(app, auth, db, storage, database_url):
    data = payload(2500)
    kept = upload_id(create(app, auth, len(data)))
    patch(app, auth, kept, 0, data[:1300])  # one part and 276 bytes in the making
    ended = upload_id(create(app, auth, 3000))
    patch(app, auth, ended, 0, b"x" * 1500)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (ended,))
    completion = CompletionService(db, storage, TEST_LIMITS, 4096)
    # A day on (past every grace): a key of a live upload that nothing names would be swept now.
    later = datetime.now(UTC) + timedelta(days=2)
    result = Reaper(db, storage, completion, ReaperSettings(orphan_grace=0), clock=lambda: later).run()
    assert result.errors == 0 and result.orphans_removed == 0
    assert head(app, auth, kept).headers["Upload-Offset"] == "1300"
    assert list(storage.list_keys(f"parts/{ended}/")) == []
    patch(app, auth, kept, 1300, data[1300:])
    assert stored_object(storage, session(app, auth, kept)) == data


def test_only_the_final_upload_sends_a_webhook_event(app, auth, db, database_url):
    WebhookRegistry(db, SigningKey(b"k" * 32)).add("alice", "http://127.0.0.1:9/events")
    partials = []
    for piece in (b"a" * 1100, b"b" * 50):
        uid = upload_id(create(app, auth, len(piece), headers={"Upload-Concat": "partial"}))
        patch(app, auth, uid, 0, piece)
        partials.append(uid)
    final_id = upload_id(
        app.post("/tus/", headers={**auth, **TUS, "Upload-Concat": "final;" + " ".join(f"/tus/{p}" for p in partials)})
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        events = conn.execute("SELECT session_id::text, type FROM webhook_events ORDER BY seq").fetchall()
    assert events == [(final_id, "session.completed")]


def test_of_two_patches_of_whole_parts_at_the_same_offset_the_one_recorded_first_counts(app, auth, storage):
    first, second, rest = payload(2 * PART, seed=1), payload(2 * PART, seed=2), payload(PART, seed=3)
    uid = upload_id(create(app, auth, 3 * PART))
    second_offsets = []

    def second_patch_meanwhile():
        # The first holds part 1's range of the file while its body streams: the second is spooled.
        second_offsets.append(patch(app, auth, uid, 0, second).headers["Upload-Offset"])

    request = webtest.TestRequest.blank(
        f"/tus/{uid}", method="PATCH", headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}
    )
    request.environ["wsgi.input"] = ShortBody(first, on_first_read=second_patch_meanwhile)
    request.environ["CONTENT_LENGTH"] = str(len(first))
    response = app.do_request(request, status=409)
    assert response.json["code"] == "offset_mismatch" and second_offsets == [str(2 * PART)]
    parts = app.get(f"/uploads/sessions/{uid}/parts", headers=auth).json["parts"]
    assert [part["sha256"] for part in parts] == [sha(second[:PART]), sha(second[PART:])]
    patch(app, auth, uid, 2 * PART, rest)
    found = session(app, auth, uid)
    assert found["status"] == "COMPLETED" and stored_object(storage, found) == second + rest


def test_of_two_patches_at_the_same_offset_one_counts(app, auth, wsgi_app):
    uid = upload_id(create(app, auth, 3000))
    first_arrived = []

    def second_patch_meanwhile():
        # While the first body streams, another PATCH at the same offset is recorded first.
        first_arrived.append(patch(app, auth, uid, 0, b"b" * 700).headers["Upload-Offset"])

    request = webtest.TestRequest.blank(
        f"/tus/{uid}", method="PATCH", headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}
    )
    request.environ["wsgi.input"] = ShortBody(b"a" * 500, on_first_read=second_patch_meanwhile)
    request.environ["CONTENT_LENGTH"] = "500"
    response = app.do_request(request, status=409)
    assert response.json["code"] == "offset_mismatch" and first_arrived == ["700"]
    assert head(app, auth, uid).headers["Upload-Offset"] == "700"


# --- real clients against a real gunicorn -----------------------------------------------------

SERVED_PART = 65536  # the served upload's part size: the clients' chunks are never aligned to it


@contextlib.contextmanager
def served(gunicorn_server, spec: StorageSpec, **env: str):
    """gunicorn (gunicorn.conf.py, chunksvc.wsgi:app) on a database of its own, with a key."""
    settings = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_DEFAULT_PART_SIZE": str(SERVED_PART),
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
        **env,
    }
    with gunicorn_server(spec, settings, name="tus", client="tus-client") as running:
        yield running.server, running.key


@pytest.fixture(scope="module")
def disk_server(gunicorn_server, tmp_path_factory):
    spec = StorageSpec(kind="file", root=tmp_path_factory.mktemp("tus") / "storage")
    # Uploads above 500,000 bytes complete in the background (the 1 MB ones below), smaller ones
    # in their last PATCH: both paths of "complete as POST .../complete would".
    # Whole parts of a PATCH are written in place, as native parts are (the spooled way is the API
    # tests' other half, and the S3 server's).
    with served(gunicorn_server, spec, CHUNKSVC_SYNC_COMPLETE_MAX="500000", CHUNKSVC_IN_PLACE_MIN_PART="1") as running:
        yield running


@pytest.fixture(scope="module")
def s3_server(gunicorn_server, radosgw_server):
    spec = make_s3_spec(radosgw_server)
    try:
        with served(gunicorn_server, spec) as running:
            yield running
    finally:
        drop_bucket(spec)


@pytest.fixture(params=["file", "s3"])
def server(request):
    return request.getfixturevalue(f"{'disk' if request.param == 'file' else 's3'}_server")


def native_session(server, key: str, uid: str) -> dict:
    status, _, body = server.request("GET", f"/uploads/sessions/{uid}", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, body
    return json.loads(body)


def wait_completed(server, key: str, uid: str) -> dict:
    return wait_for(
        lambda: (found := native_session(server, key, uid))["status"] == "COMPLETED" and found,
        f"session {uid} to complete",
        timeout=60,
        interval=0.1,
    )


def test_tuspy_unaligned_chunks_with_checksums_and_a_resume_from_a_new_client(server):
    from tusclient.client import TusClient

    gunicorn, key = server
    data = payload(1_000_000 + 17, seed=1)
    headers = {"Authorization": f"Bearer {key}"}
    first = TusClient(f"{gunicorn.url}/tus/", headers=headers).uploader(
        file_stream=io.BytesIO(data), chunk_size=100_003, upload_checksum=True, metadata={"filename": "py.bin"}
    )
    first.upload(stop_at=450_000)  # then this client is gone
    uid = first.url.rsplit("/", 1)[1]
    assert native_session(gunicorn, key, uid)["status"] == "IN_PROGRESS"
    # Another client, knowing only the URL (as on another host): it asks for the offset and goes on.
    second = TusClient(f"{gunicorn.url}/tus/", headers=headers).uploader(
        file_stream=io.BytesIO(data), url=first.url, chunk_size=77_777, upload_checksum=True
    )
    assert second.offset == first.offset == 450_000
    second.upload()
    found = wait_completed(gunicorn, key, uid)
    assert found["filename"] == "py.bin" and found["size"] == len(data)
    assert found["sha256"] is None and found["object"]["sha256"] == sha(data)


def test_tuspy_sends_an_empty_metadata_header_and_is_served(disk_server):
    from tusclient.client import TusClient

    gunicorn, key = disk_server
    data = payload(70_000, seed=2)
    uploader = TusClient(f"{gunicorn.url}/tus/", headers={"Authorization": f"Bearer {key}"}).uploader(
        file_stream=io.BytesIO(data), chunk_size=30_000
    )
    uploader.upload()
    found = native_session(gunicorn, key, uploader.url.rsplit("/", 1)[1])  # completed in the last PATCH
    assert found["status"] == "COMPLETED" and found["metadata"] == {} and found["object"]["sha256"] == sha(data)


@pytest.mark.parametrize(
    "options",
    [{}, {"chunkSize": 100_001}, {"chunkSize": 150_000, "parallelUploads": 3}],
    ids=["one-patch", "sequential", "parallel-3"],
)
def test_tus_js_client(server, tus_js, tmp_path, options):
    """On S3 too: the partials' last parts are below S3's 5 MiB compose minimum, so the final
    object is streamed together there, not composed."""
    gunicorn, key = server
    data = payload(1_000_003, seed=4)
    path = tmp_path / "js.bin"
    path.write_bytes(data)
    url = tus_js_client.upload(
        tus_js,
        path,
        {
            "endpoint": f"{gunicorn.url}/tus/",
            "headers": {"Authorization": f"Bearer {key}"},
            "metadata": {"filename": "js.bin", "filetype": "application/x-test"},
            **options,
        },
    )
    found = wait_completed(gunicorn, key, url.rsplit("/", 1)[1])
    assert found["object"]["sha256"] == sha(data) and found["size"] == len(data)
    assert (found["filename"], found["content_type"]) == ("js.bin", "application/x-test")
    _status, _, body = gunicorn.request(
        "GET", "/uploads/sessions?limit=1000", headers={"Authorization": f"Bearer {key}"}
    )
    listed = {session["id"] for session in json.loads(body)["sessions"]}
    assert found["id"] in listed  # and no partial upload is listed beside it
    if "parallelUploads" in options:
        with psycopg.connect(gunicorn_database(gunicorn), autocommit=True) as conn:
            partials = conn.execute("SELECT count(*) FROM tus_uploads WHERE final_id = %s", (found["id"],)).fetchone()
        assert partials == (3,)
        assert not listed & partial_ids(gunicorn, found["id"])


def gunicorn_database(gunicorn) -> str:
    return gunicorn_env(gunicorn)["DATABASE_URL"]


def gunicorn_env(gunicorn) -> dict[str, str]:
    environ = Path(f"/proc/{gunicorn.process.pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in environ if b"=" in item)


def partial_ids(gunicorn, final_id: str) -> set[str]:
    with psycopg.connect(gunicorn_database(gunicorn), autocommit=True) as conn:
        rows = conn.execute("SELECT session_id::text FROM tus_uploads WHERE final_id = %s", (final_id,)).fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize("in_place_min_part", ["1", str(1 << 20)], ids=["in-place", "spooled"])
def test_a_worker_killed_mid_patch_leaves_a_durable_prefix_and_the_upload_completes(
    gunicorn_server, tmp_path, in_place_min_part
):
    from tusclient.client import TusClient

    data = payload(1_000_000, seed=5)
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    settings = {"CHUNKSVC_WORKERS": "1", "CHUNKSVC_BLOCK_SIZE": "4096", "CHUNKSVC_IN_PLACE_MIN_PART": in_place_min_part}
    with served(gunicorn_server, spec, **settings) as (gunicorn, key):
        headers = {"Authorization": f"Bearer {key}", **TUS}
        status, response, _ = gunicorn.request("POST", "/tus/", headers={**headers, "Upload-Length": str(len(data))})
        assert status == 201
        uid = response.headers["Location"].rsplit("/", 1)[1]
        sent = 300_000  # four parts and some of a fifth; then the worker dies with the body half-sent
        with socket.create_connection(("127.0.0.1", gunicorn.port)) as sock:
            sock.sendall(
                f"PATCH /tus/{uid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
            )
            sock.sendall(data[:sent])
            wait_for(
                lambda: native_session(gunicorn, key, uid)["received_parts"] >= 4, "the first parts to be recorded"
            )
            [worker] = gunicorn.worker_pids()
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: worker not in gunicorn.worker_pids(), "the master to reap the killed worker")
        gunicorn.wait_until_serving()
        status, response, _ = gunicorn.request("HEAD", f"/tus/{uid}", headers=headers)
        offset = int(response.headers["Upload-Offset"])
        assert 4 * SERVED_PART <= offset <= sent
        # What the offset covers is durable and right: the recorded parts are the data's own.
        status, _, body = gunicorn.request("GET", f"/uploads/sessions/{uid}/parts", headers=headers)
        parts = json.loads(body)["parts"]
        assert [p["sha256"] for p in parts] == [
            sha(data[i * SERVED_PART : (i + 1) * SERVED_PART]) for i in range(len(parts))
        ]
        uploader = TusClient(f"{gunicorn.url}/tus/", headers={"Authorization": f"Bearer {key}"}).uploader(
            file_stream=io.BytesIO(data), url=f"{gunicorn.url}/tus/{uid}", chunk_size=123_457
        )
        assert uploader.offset == offset
        uploader.upload()
        found = wait_completed(gunicorn, key, uid)
        assert found["object"]["sha256"] == sha(data)
        with open(spec.root / found["object"]["key"], "rb") as stored:
            assert stored.read() == data


@pytest.mark.parametrize("config", ["in-place"], indirect=True)  # parts go in place only so
def test_a_termination_between_the_parts_of_a_patch_leaves_no_file_behind(app, auth, storage, config, monkeypatch):
    # Terminated after a PATCH's first whole part is recorded, before its second is claimed:
    # the second's claim must not make the session's file again (nothing would remove it).
    from chunksvc.services.uploads import UploadService

    data = payload(3 * PART, seed=12)
    uid = upload_id(create(app, auth, len(data)))
    real = UploadService.place_part
    calls = []

    def place_part(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            app.delete(f"/tus/{uid}", headers={**auth, **TUS}, status=204)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UploadService, "place_part", place_part)
    assert patch(app, auth, uid, 0, data, status=410).json["code"] == "session_gone"
    assert list(storage.list_keys(f"parts/{uid}/")) == []


def test_a_part_cut_in_place_then_finished_spooled_leaves_no_file_behind(app, auth, storage, config):
    # A one-part upload: the first PATCH is cut in place (what arrived is kept as a piece, read
    # back from the session's file); the rest fills the part the spooled way. No part row then
    # points at the session's file, so completion assembles from keys and removes those keys:
    # the file the cut writer made must not be left.
    data = payload(PART, seed=14)
    uid = upload_id(create(app, auth, len(data)))
    request = webtest.TestRequest.blank(
        f"/tus/{uid}", method="PATCH", headers={**auth, **TUS, **PATCH_TYPE, "Upload-Offset": "0"}
    )
    request.environ["wsgi.input"] = ShortBody(data[:300])
    request.environ["CONTENT_LENGTH"] = str(len(data))
    app.do_request(request, status=400)
    assert head(app, auth, uid).headers["Upload-Offset"] == "300"
    patch(app, auth, uid, 300, data[300:])
    found = session(app, auth, uid)
    assert found["status"] == "COMPLETED" and stored_object(storage, found) == data
    assert list(storage.list_keys(f"parts/{uid}/")) == []
