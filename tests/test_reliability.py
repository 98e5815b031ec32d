"""Bytes are never lost between storage and database; lost bytes are repaired, not fatal; a full
disk, strict ids and digests. Through the WSGI app on a real PostgreSQL and both storages (the
full disk is a real, small tmpfs). Faults between processes are in tests/test_faults.py."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import Config, StorageSpec
from chunksvc.services import layout
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.storage import open_storage
from tests.conftest import TEST_LIMITS
from tests.faults import fill, small_disk
from tests.helpers import ShortBody, complete, content_digest, create, payload, put_part, raw_put, sha, split, uploaded
from tests.test_api import assert_problem, read_object, stored_part_keys


def part_rows(database_url: str, session_id: str) -> dict[int, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (session_id,)
        ).fetchall()
    return dict(rows)


def uploaded_in_parts(app, auth, parts: int, part_size: int = 1000, seed: int = 0) -> tuple[str, bytes]:
    """A session of ``parts`` parts (the last one short), every part uploaded; ``(id, data)``."""
    return uploaded(app, auth, parts * part_size - 7, part_size=part_size, seed=seed)


# --- self-healing -------------------------------------------------------------------------------


def test_a_retried_part_whose_stored_bytes_are_gone_takes_the_new_bytes(app, auth, database_url, storage):
    session_id, data = uploaded_in_parts(app, auth, parts=3)
    lost = part_rows(database_url, session_id)[2]
    storage.delete([lost])

    retry = put_part(app, auth, session_id, 2, split(data, 1000)[1], status=200)

    assert (retry.json["received_parts"], retry.json["received_bytes"]) == (3, len(data))  # counted once
    healed = part_rows(database_url, session_id)[2]
    assert healed != lost and storage.exists(healed)
    assert sorted(stored_part_keys(storage, session_id)) == sorted(part_rows(database_url, session_id).values())
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and read_object(storage, done["object"]["key"]) == data


def test_a_retried_part_whose_bytes_are_there_leaves_one_copy(app, auth, database_url, storage):
    session_id, data = uploaded_in_parts(app, auth, parts=2)
    before = part_rows(database_url, session_id)
    put_part(app, auth, session_id, 1, split(data, 1000)[0], status=200)
    assert part_rows(database_url, session_id) == before
    assert sorted(stored_part_keys(storage, session_id)) == sorted(before.values())


def test_different_bytes_for_a_part_whose_bytes_are_gone_still_conflict(app, auth, database_url, storage):
    """The first accepted part stays the part's identity; complete asks for it again instead."""
    session_id, data = uploaded_in_parts(app, auth, parts=2)
    storage.delete([part_rows(database_url, session_id)[1]])
    conflict = put_part(app, auth, session_id, 1, payload(1000, seed=99), status=409)
    assert_problem(conflict, 409, "part_conflict")
    assert conflict.json["sha256"] == sha(split(data, 1000)[0])
    assert stored_part_keys(storage, session_id) == [part_rows(database_url, session_id)[2]]


def test_complete_drops_parts_whose_bytes_are_gone_and_asks_for_them(app, auth, database_url, storage):
    data = payload(5 * 1000 - 7)
    session_id = create(app, auth, size=len(data), part_size=1000, sha256=sha(data)).json["id"]
    chunks = split(data, 1000)
    for number in (1, 2, 3, 4):  # part 5 never sent
        put_part(app, auth, session_id, number, chunks[number - 1])
    rows = part_rows(database_url, session_id)
    assert_problem(complete(app, auth, session_id, status=409), 409, "parts_missing")
    storage.delete([rows[1], rows[3]])
    put_part(app, auth, session_id, 5, chunks[4])

    problem = assert_problem(complete(app, auth, session_id, status=409), 409, "parts_missing")

    assert (problem["missing_parts"], problem["missing_count"]) == ([1, 3], 2)
    session = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert (session["status"], session["received_parts"], session["received_bytes"]) == ("IN_PROGRESS", 3, 3 * 1000 - 7)
    listed = app.get(f"/uploads/sessions/{session_id}/parts", headers=auth).json["parts"]
    assert [part["part_number"] for part in listed] == [2, 4, 5]
    assert not storage.exists(layout.object_key(session_id))
    # The ordinary resume: send what is listed, complete again.
    for number in problem["missing_parts"]:
        assert put_part(app, auth, session_id, number, chunks[number - 1]).status_int == 201
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and read_object(storage, done["object"]["key"]) == data
    assert stored_part_keys(storage, session_id) == []


def test_a_completion_stuck_on_lost_bytes_is_reopened_by_complete_not_failed(app, auth, database_url, storage):
    """The v1 bug: COMPLETING, a part's bytes gone, every complete a 502. Now: 409 parts_missing."""
    session_id, data = uploaded_in_parts(app, auth, parts=2)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE upload_sessions SET status = 'COMPLETING' WHERE id = %s", (session_id,))
    storage.delete([part_rows(database_url, session_id)[2]])

    problem = assert_problem(complete(app, auth, session_id, status=409), 409, "parts_missing")

    assert problem["missing_parts"] == [2]
    put_part(app, auth, session_id, 2, split(data, 1000)[1])
    assert complete(app, auth, session_id).json["status"] == "COMPLETED"


# --- strict ids and part numbers ------------------------------------------------------------------


def other_spellings(session_id: str) -> list[str]:
    plain = uuid.UUID(session_id)
    return [session_id.upper(), plain.hex, f"{{{session_id}}}", plain.urn, session_id.replace("-", "", 1)]


def test_only_the_canonical_session_id_reaches_the_session(app, auth):
    session_id, _ = uploaded_in_parts(app, auth, parts=1)
    for spelling in other_spellings(session_id):
        for method, path in (
            ("GET", f"/uploads/sessions/{spelling}"),
            ("GET", f"/uploads/sessions/{spelling}/parts"),
            ("PUT", f"/uploads/sessions/{spelling}/parts/1"),
            ("POST", f"/uploads/sessions/{spelling}/complete"),
            ("DELETE", f"/uploads/sessions/{spelling}"),
        ):
            response = app.request(path, method=method, headers=auth, body=b"", expect_errors=True)
            assert_problem(response, 404, "session_not_found")
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["status"] == "IN_PROGRESS"


def test_part_numbers_with_leading_zeros_are_refused(app, auth):
    session_id = create(app, auth, size=2000, part_size=1000).json["id"]
    for spelling in ("01", "001", "+1"):
        assert_problem(put_part(app, auth, session_id, spelling, payload(1000), status=400), 400, "invalid_part_number")
    assert app.get(f"/uploads/sessions/{session_id}", headers=auth).json["received_parts"] == 0
    assert_problem(
        app.get(f"/uploads/sessions/{session_id}/parts?after=01", headers=auth, status=400), 400, "invalid_request"
    )


# --- Content-Digest -------------------------------------------------------------------------------


def sha512_digest(data: bytes) -> str:
    return "sha-512=:" + base64.b64encode(hashlib.sha512(data).digest()).decode() + ":"


def test_sha512_is_verified_like_sha256(app, auth, storage):
    session_id = create(app, auth, size=8, part_size=4).json["id"]
    wrong = put_part(app, auth, session_id, 1, b"abcd", status=400, headers={"Content-Digest": sha512_digest(b"abce")})
    assert_problem(wrong, 400, "digest_mismatch")
    one_wrong = f"{content_digest(b'abcd')}, {sha512_digest(b'abce')}"
    assert_problem(
        put_part(app, auth, session_id, 1, b"abcd", status=400, headers={"Content-Digest": one_wrong}),
        400,
        "digest_mismatch",
    )
    assert stored_part_keys(storage, session_id) == []
    both = f"{sha512_digest(b'abcd')}, {content_digest(b'abcd')}"
    assert put_part(app, auth, session_id, 1, b"abcd", headers={"Content-Digest": both}).json["received_parts"] == 1
    second = put_part(app, auth, session_id, 2, b"efgh", headers={"Content-Digest": sha512_digest(b"efgh")})
    assert second.status_int == 201


def test_a_digest_we_cannot_check_is_refused_before_the_body(app, auth, storage):
    session_id = create(app, auth, size=8, part_size=4).json["id"]

    def body_read():
        raise AssertionError("the body was read")

    response = raw_put(
        app,
        {**auth, "Content-Digest": "md5=:rL0Y20zC+Fzt72VPzMSk2A==:"},
        session_id,
        1,
        ShortBody(b"abcd", on_first_read=body_read),
        4,
        status=400,
    )
    assert_problem(response, 400, "unsupported_digest")
    assert response.headers["Want-Content-Digest"] == "sha-256=10, sha-512=3"
    assert stored_part_keys(storage, session_id) == []


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk_app(tmp_path, database_url, db, keys):
    """The app on local storage in a 4 MiB tmpfs: ``(app, auth, storage, disk)``."""
    with small_disk(tmp_path / "disk") as disk:
        spec = StorageSpec(kind="file", root=disk / "storage")
        storage = open_storage(spec)
        config = Config(
            database_url=database_url,
            storage=spec,
            limits=TEST_LIMITS,
            block_size=64 * 1024,
            storage_min_free=512 * 1024,
        )
        app = webtest.TestApp(create_app(config, db=db, storage=storage))
        yield app, {"Authorization": f"Bearer {keys.create('full')[0]}"}, storage, disk


def leftovers(disk: Path) -> list[str]:
    root = disk / "storage"
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_a_full_disk_is_507_storage_full_and_keeps_nothing(full_disk_app, database_url):
    app, auth, _storage, disk = full_disk_app
    data = payload(3 * 256 * 1024)
    session_id = create(app, auth, size=len(data), part_size=256 * 1024).json["id"]
    put_part(app, auth, session_id, 1, split(data, 256 * 1024)[0])
    assert app.get("/readyz").status_int == 200
    filler = fill(disk, leave=100 * 1024)  # room for less than a part

    response = put_part(app, auth, session_id, 2, split(data, 256 * 1024)[1], status=507)

    assert_problem(response, 507, "storage_full")
    session = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert (session["received_parts"], session["received_bytes"]) == (1, 256 * 1024)
    assert leftovers(disk) == [part_rows(database_url, session_id)[1]]  # and nothing in .incoming
    ready = app.get("/readyz", status=503).json
    assert ready["checks"]["storage"].startswith("storage is nearly full")

    filler.unlink()  # the operator frees space; the client's retry goes through
    assert app.get("/readyz").status_int == 200
    put_part(app, auth, session_id, 2, split(data, 256 * 1024)[1])
    put_part(app, auth, session_id, 3, split(data, 256 * 1024)[2])
    assert complete(app, auth, session_id).json["status"] == "COMPLETED"


def test_a_completion_on_a_full_disk_finishes_by_itself_once_space_returns(full_disk_app, database_url, db):
    app, auth, storage, disk = full_disk_app
    data = payload(6 * 256 * 1024)  # 1.5 MiB of parts; the object needs as much again
    session_id = create(app, auth, size=len(data), part_size=256 * 1024, sha256=sha(data)).json["id"]
    for number, chunk in enumerate(split(data, 256 * 1024), start=1):
        put_part(app, auth, session_id, number, chunk)
    filler = fill(disk, leave=1024 * 1024)  # room for the parts' copies? no: 1 MiB < 1.5 MiB

    assert_problem(complete(app, auth, session_id, status=507), 507, "storage_full")

    session = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert (session["status"], session["received_parts"]) == ("COMPLETING", 6)
    assert leftovers(disk) == sorted(part_rows(database_url, session_id).values())  # no half object
    filler.unlink()
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    result = Reaper(db, storage, completion, ReaperSettings(completing_lease=0)).run()  # cron's next run

    assert (result.completions_redriven, result.errors) == (1, 0)
    done = app.get(f"/uploads/sessions/{session_id}", headers=auth).json
    assert done["status"] == "COMPLETED" and read_object(storage, done["object"]["key"]) == data


def test_storage_full_maps_from_s3s_insufficient_storage():
    """MinIO answers a full drive with 507 XMinioStorageFull; the S3 adapter's one error boundary
    turns that answer into StorageFull. Built by hand: MinIO's server cannot be installed here, and
    neither radosgw nor moto ever answers 507 (radosgw's full quota, 403 QuotaExceeded, is proven on
    radosgw in tests/test_storage_contract.py)."""
    from minio.error import S3Error

    from chunksvc.errors import StorageFull
    from chunksvc.storage.s3 import _boundary

    class Response:
        status = 507

    with pytest.raises(StorageFull), _boundary("write parts/x", "minio"):
        raise S3Error(
            Response(),
            "XMinioStorageFull",
            "Storage backend has reached its minimum free drive threshold.",
            "/bucket/parts/x",
            "req",
            "host",
        )


def test_bytes_that_were_only_out_of_sight_are_never_swept(app, auth, database_url, db, storage):
    """complete found no bytes (an unmounted disk, a wrong bucket) and dropped the parts; when the
    bytes come back, the orphan sweep must not take them for bytes no record needs."""
    session_id, _ = uploaded_in_parts(app, auth, parts=2)
    keys = part_rows(database_url, session_id)
    saved = {key: read_object(storage, key) for key in keys.values()}
    storage.delete(list(saved))  # out of sight
    assert_problem(complete(app, auth, session_id, status=409), 409, "parts_missing")
    for key, content in saved.items():  # back again
        storage.write(key, io.BytesIO(content), len(content), 4096)

    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    much_later = lambda: datetime.now(UTC) + timedelta(days=30)  # noqa: E731
    result = Reaper(db, storage, completion, ReaperSettings(orphan_grace=0), clock=much_later).run()

    assert (result.orphans_removed, result.errors) == (0, 0)
    assert sorted(stored_part_keys(storage, session_id)) == sorted(saved)
