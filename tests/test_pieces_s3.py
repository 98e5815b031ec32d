"""Parts sent straight into the session's staging (radosgw): each part's body goes up once, as an
UploadPart, from a local copy the hash frontier then reads (``services.staging``). The native API's
guarantees hold: the first accepted bytes stay, a conflict is refused, every request writes a
piece of its own, and whatever goes wrong (a local copy missing, the staging lost, an abort) ends
in the client's bytes or in nothing left behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import webtest

from chunksvc import hashstate
from chunksvc.app import create_app
from chunksvc.config import Config
from chunksvc.services import layout
from chunksvc.services.staging import Stager, sent_piece
from tests.helpers import (
    PART_S3,
    complete,
    completes_as,
    create,
    frontier_parts,
    payload,
    put_part,
    put_part_aborted_midway,
    query,
    sha,
    split,
    staging_of,
    stored_object,
    unfinished_uploads,
    upload_parts_in,
    wait_for,
)

pytestmark = pytest.mark.skipif(not hashstate.available(), reason="no libcrypto SHA-256 to save states with")


@pytest.fixture
def storage_spec(s3_spec):
    return s3_spec


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def config(config: Config, spill_dir: Path) -> Config:
    return dataclasses.replace(config, in_place_min_part=1, spill_dir=spill_dir)


def _part_keys(database_url: str, session_id: str) -> dict[int, str]:
    return dict(
        query(database_url, "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (session_id,))
    )


def _copies(spill_dir: Path, session_id: str) -> list[str]:
    session = spill_dir / layout.parts_prefix(session_id)
    return sorted(path.name for path in session.iterdir()) if session.is_dir() else []


def test_parts_in_order_go_up_once_and_the_staging_becomes_the_object(app, auth, database_url, storage, spill_dir):
    data = payload(3 * PART_S3 + 999)
    session_id = upload_parts_in(app, auth, data, (1, 2, 3, 4))
    keys = _part_keys(database_url, session_id)
    # Each part's row names its piece: the first request's number in the part's range.
    assert keys == {n: layout.piece_key(session_id, sent_piece(n, 1, 4)) for n in (1, 2, 3, 4)}
    # No part has an object of its own: nothing was PUT, so nothing is read back or copied.
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []
    staged_id, _ = staging_of(database_url, session_id)
    held = storage.staged.placed(layout.object_key(session_id), staged_id)
    sizes = {1: PART_S3, 2: PART_S3, 3: PART_S3, 4: 999}
    assert {number: piece.size for number, piece in held.items()} == {
        sent_piece(n, 1, 4): size for n, size in sizes.items()
    }
    wait_for(lambda: frontier_parts(database_url, session_id) == 4, "the frontier to hash every part", 30)
    wait_for(lambda: _copies(spill_dir, session_id) == [], "the local copies to go once hashed", 10)
    completes_as(app, auth, storage, session_id, data)
    assert unfinished_uploads(storage) == 0


def test_parts_in_reverse_order_are_in_place_before_the_first_arrives(app, auth, database_url, storage, spill_dir):
    data = payload(3 * PART_S3, seed=1)
    session_id = upload_parts_in(app, auth, data, (3, 2))
    staged_id, _ = staging_of(database_url, session_id)
    held = storage.staged.placed(layout.object_key(session_id), staged_id)
    assert sorted(held) == [sent_piece(2, 1, 3), sent_piece(3, 1, 3)]
    assert frontier_parts(database_url, session_id) == 0  # waits at the gap, with the copies kept
    assert len(_copies(spill_dir, session_id)) == 2
    put_part(app, auth, session_id, 1, data[:PART_S3])
    completes_as(app, auth, storage, session_id, data)


def test_conflicting_bytes_for_a_part_in_place_are_refused_and_the_first_stay(app, auth, database_url, storage):
    data = payload(2 * PART_S3, seed=2)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    before = _part_keys(database_url, session_id)
    other = payload(PART_S3, seed=9)
    assert put_part(app, auth, session_id, 1, other, status=409).json["code"] == "part_conflict"
    # The same bytes again: accepted as the part it is, and the row still names the first piece.
    assert put_part(app, auth, session_id, 2, data[PART_S3:], status=200).json["sha256"] == sha(data[PART_S3:])
    assert _part_keys(database_url, session_id) == before
    # The retries went the usual way (an object of their own), compared and removed.
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []
    completes_as(app, auth, storage, session_id, data)


def test_every_request_for_a_part_writes_a_piece_of_its_own(db, app, auth, database_url, storage):
    """Two requests for one part at once, or a retry after a writer that was killed mid-request:
    never the same piece number, so a late UploadPart cannot replace accepted bytes."""
    data = payload(2 * PART_S3, seed=3)
    session_id = upload_parts_in(app, auth, data, (2,))
    stager = Stager(db, storage.staged)
    first = stager.take_piece(session_id, 1, 2)
    second = stager.take_piece(session_id, 1, 2)
    assert first is not None and second is not None
    assert first[0] != second[0] and first[1] == second[1]  # one staging, two numbers
    assert stager.take_piece(session_id, 2, 2) is None  # recorded already: the usual way
    put_part(app, auth, session_id, 1, data[:PART_S3])
    assert _part_keys(database_url, session_id)[1] == layout.piece_key(session_id, sent_piece(1, 3, 2))
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)


def test_a_local_copy_missing_is_made_up_by_reading_the_object_back(app, auth, database_url, storage, spill_dir):
    """What a part taken by another host leaves: the frontier cannot pass it here."""
    data = payload(3 * PART_S3, seed=4)
    session_id = upload_parts_in(app, auth, data, (3, 2))
    copy = spill_dir / layout.piece_key(session_id, sent_piece(2, 1, 3))
    copy.unlink()
    put_part(app, auth, session_id, 1, data[:PART_S3])
    wait_for(lambda: frontier_parts(database_url, session_id) == 1, "the frontier to stop at part 2", 30)
    completes_as(app, auth, storage, session_id, data)


def test_a_local_copy_that_differs_is_not_hashed(app, auth, database_url, storage, spill_dir):
    data = payload(2 * PART_S3, seed=5)
    session_id = upload_parts_in(app, auth, data, (2,))
    copy = spill_dir / layout.piece_key(session_id, sent_piece(2, 1, 2))
    copy.write_bytes(payload(PART_S3, seed=8))  # the piece in the store still holds the part's bytes
    put_part(app, auth, session_id, 1, data[:PART_S3])
    completes_as(app, auth, storage, session_id, data)


def test_a_staging_lost_asks_the_client_for_its_parts_again(app, auth, database_url, storage):
    data = payload(2 * PART_S3, seed=6)
    parts = split(data, PART_S3)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    staged_id, _ = staging_of(database_url, session_id)
    assert storage.staged.abandon(layout.object_key(session_id), staged_id)  # an operator's cleanup, say
    missing = complete(app, auth, session_id, status=409).json
    assert missing["code"] == "parts_missing" and missing["missing_parts"] == [1, 2]
    for number in (1, 2):
        put_part(app, auth, session_id, number, parts[number - 1])
    completes_as(app, auth, storage, session_id, data)
    assert unfinished_uploads(storage) == 0


def test_abort_leaves_no_piece_no_copy_and_no_object(app, auth, database_url, storage, spill_dir):
    data = payload(3 * PART_S3, seed=7)
    session_id = upload_parts_in(app, auth, data, (3, 2))
    assert _copies(spill_dir, session_id)
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert unfinished_uploads(storage) == 0
    assert _copies(spill_dir, session_id) == []
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []
    assert not storage.exists(layout.object_key(session_id))


def test_a_truncated_local_copy_is_made_up_by_reading_the_object_back(app, auth, database_url, storage, spill_dir):
    """What a machine restart can leave: Spill.write renames without fsync, so after a crash the
    copy may be there but short (ext4's zero-length file after rename). The docs promise it only
    costs a read-back; the frontier must treat it as a copy that differs, not fail the completion."""
    data = payload(2 * PART_S3, seed=11)
    session_id = upload_parts_in(app, auth, data, (2,))
    copy = spill_dir / layout.piece_key(session_id, sent_piece(2, 1, 2))
    copy.write_bytes(data[PART_S3 : PART_S3 + 100])  # a short copy; the piece in the store is whole
    put_part(app, auth, session_id, 1, data[:PART_S3])
    completes_as(app, auth, storage, session_id, data)


def test_a_piece_refused_for_want_of_room_leaves_no_local_copy(app, auth, storage, spill_dir, radosgw_gateway):
    """A full store (radosgw's bucket quota: 403 QuotaExceeded, StorageFull) refuses the piece
    with 507; the copy of a part nobody recorded goes at once, not after the reaper's orphan
    grace, on a disk that may be under pressure too."""
    data = payload(2 * PART_S3, seed=13)
    session_id = upload_parts_in(app, auth, data, (1,))
    wait_for(lambda: _copies(spill_dir, session_id) == [], "the frontier to pass part 1", 30)
    bucket = f"--bucket={storage.bucket}"
    radosgw_gateway.admin("quota", "set", "--quota-scope=bucket", bucket, "--max-size=1024")
    radosgw_gateway.admin("quota", "enable", "--quota-scope=bucket", bucket)
    try:
        assert put_part(app, auth, session_id, 2, data[PART_S3:], status=507).json["code"] == "storage_full"
    finally:
        radosgw_gateway.admin("quota", "disable", "--quota-scope=bucket", bucket)
    assert _copies(spill_dir, session_id) == []


def test_a_spill_without_room_sends_parts_the_usual_way(config, db, storage, auth, database_url, spill_dir):
    """Copies stay until the frontier passes them, so one session can fill the spill's disk. Past
    its margin (CHUNKSVC_STORAGE_MIN_FREE: here more than any disk has), parts go up under keys of
    their own and are copied in: slower, never refused."""
    crowded = webtest.TestApp(create_app(dataclasses.replace(config, storage_min_free=1 << 62), db=db, storage=storage))
    data = payload(2 * PART_S3 + 10, seed=14)
    session_id = upload_parts_in(crowded, auth, data, (1, 2, 3))
    keys = _part_keys(database_url, session_id)
    assert all(layout.piece_number(key) is None for key in keys.values())  # no part sent as a piece
    assert _copies(spill_dir, session_id) == []
    completes_as(crowded, auth, storage, session_id, data)


def test_a_part_whose_session_is_aborted_while_it_streams_is_refused_as_not_active(app, auth, spill_dir):
    """The abort drops the staging (S3's NoSuchUpload on the piece): the part is told the session
    ended (409), not to send it again (503), and its copy goes."""
    data = payload(2 * PART_S3, seed=15)
    session_id = upload_parts_in(app, auth, data, (1,))
    response = put_part_aborted_midway(app, auth, session_id, 2, data[PART_S3:], status=409)
    assert response.json["code"] == "session_not_active"
    assert _copies(spill_dir, session_id) == []


def test_a_staging_that_became_the_object_unrecorded_is_taken_with_no_digest_to_check(
    app, auth, database_url, storage, spill_dir
):
    """A completion killed after CompleteMultipartUpload and before COMPLETED leaves the object and
    no staging. Here the frontier has no digest either (a local copy was not on this host) and the
    client declared none: the object is taken as it reads back, not asked for part by part again."""
    data = payload(3 * PART_S3, seed=16)
    parts = split(data, PART_S3)
    session_id = create(app, auth, size=len(data), part_size=PART_S3).json["id"]  # no sha256
    for number in (3, 2):
        put_part(app, auth, session_id, number, parts[number - 1])
    (spill_dir / layout.piece_key(session_id, sent_piece(2, 1, 3))).unlink()
    put_part(app, auth, session_id, 1, parts[0])
    wait_for(lambda: frontier_parts(database_url, session_id) == 1, "the frontier to stop at part 2", 30)
    # What the killed completion did: the staging completed with the recorded pieces, in order.
    key, (staged_id, _) = layout.object_key(session_id), staging_of(database_url, session_id)
    held = storage.staged.placed(key, staged_id)
    numbers = [layout.piece_number(k) for _, k in sorted(_part_keys(database_url, session_id).items())]
    assert storage.staged.finish(key, staged_id, [(n, held[n].token) for n in numbers]) == len(data)
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    assert stored_object(storage, session_id) == data


def test_a_staging_begun_again_after_the_object_was_made_does_not_lose_it(app, auth, database_url, storage):
    """A completion killed after CompleteMultipartUpload, then a frontier elsewhere that found the
    staging gone and began another: the pieces are not in the new one, but the object they made
    is there, and it reads back as the client's SHA-256."""
    data = payload(2 * PART_S3, seed=17)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    wait_for(lambda: frontier_parts(database_url, session_id) == 2, "the frontier to hash both parts", 30)
    key, (staged_id, _) = layout.object_key(session_id), staging_of(database_url, session_id)
    held = storage.staged.placed(key, staged_id)
    numbers = [layout.piece_number(k) for _, k in sorted(_part_keys(database_url, session_id).items())]
    storage.staged.finish(key, staged_id, [(n, held[n].token) for n in numbers])
    again = storage.staged.begin(key)
    query(database_url, "UPDATE upload_sessions SET staged_id = %s WHERE id = %s", (again, session_id))
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    assert stored_object(storage, session_id) == data
    storage.staged.abandon(key, again)
