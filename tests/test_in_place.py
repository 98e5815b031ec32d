"""Parts written in place and the hash frontier (local storage): each accepted part's bytes go to
their offset in the session's one file, which becomes the object by a link; the whole-file SHA-256
is carried on as parts arrive. The guarantees are the native API's: first accepted bytes stay,
conflicts get 409, lost bytes reopen the session, abort leaves nothing, a dead holder is taken
over from its last saved state. Every test runs on a real PostgreSQL and a real directory."""

from __future__ import annotations

import dataclasses
import io
import uuid

import psycopg
import pytest

from chunksvc import hashstate
from chunksvc.config import Config
from chunksvc.services import layout
from tests.helpers import complete, create, payload, put_part, put_part_aborted_midway, sha, split, wait_for

PART = 4096

pytestmark = pytest.mark.skipif(not hashstate.available(), reason="no libcrypto SHA-256 to save states with")


@pytest.fixture
def storage_spec(file_spec):
    return file_spec  # in place is a local file system's: S3 objects are written whole


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, in_place_min_part=1)  # every part of these tests in place


def _frontier(database_url: str, session_id: str) -> tuple[int, int, str | None]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT frontier_parts, frontier_bytes, frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _part_keys(database_url: str, session_id: str) -> dict[int, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (session_id,)
        ).fetchall()
    return dict(rows)


def _upload(app, auth, data: bytes, order=None) -> str:
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    parts = split(data, PART)
    for number in order or range(1, len(parts) + 1):
        put_part(app, auth, session_id, number, parts[number - 1])
    return session_id


def _stored(root, key: str) -> bytes:
    return (root / key).read_bytes()


def test_parts_in_order_land_in_one_file_that_becomes_the_object(app, auth, database_url, file_spec):
    data = payload(5 * PART + 123)
    session_id = _upload(app, auth, data)
    assembly = file_spec.root / layout.assembly_key(session_id)
    assert assembly.read_bytes() == data  # each part at its offset, before completion
    assert set(_part_keys(database_url, session_id).values()) == {layout.assembly_key(session_id)}
    # The frontier hashed the parts as they came: completion has (almost) nothing left.
    wait_for(lambda: _frontier(database_url, session_id)[0] == 6, "the frontier to reach the last part", 10)
    inode = assembly.stat().st_ino
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    stored = file_spec.root / layout.object_key(session_id)
    assert stored.read_bytes() == data
    assert stored.stat().st_ino == inode  # linked, not copied
    assert not assembly.exists()  # the parts' name goes with the completion


def test_parts_in_reverse_order(app, auth, database_url, file_spec):
    data = payload(7 * PART)
    session_id = _upload(app, auth, data, order=range(7, 0, -1))
    # The last part recorded (part 1) closes the gap: the frontier then runs to the end.
    wait_for(lambda: _frontier(database_url, session_id)[:2] == (7, len(data)), "the frontier", 10)
    done = complete(app, auth, session_id).json
    assert done["object"]["sha256"] == sha(data)
    assert _stored(file_spec.root, layout.object_key(session_id)) == data


def test_conflicting_bytes_for_a_placed_part_get_409_and_the_first_bytes_stay(app, auth, file_spec):
    data = payload(3 * PART)
    session_id = _upload(app, auth, data)
    other = payload(PART, seed=9)
    answer = put_part(app, auth, session_id, 2, other, status=409).json
    assert answer["code"] == "part_conflict"
    put_part(app, auth, session_id, 2, split(data, PART)[1], status=200)  # the same bytes: a retry
    assert (file_spec.root / layout.assembly_key(session_id)).read_bytes() == data
    assert complete(app, auth, session_id).json["object"]["sha256"] == sha(data)
    assert _stored(file_spec.root, layout.object_key(session_id)) == data


def test_a_part_whose_range_is_held_is_stored_apart_and_placed_at_completion(
    app, auth, database_url, storage, file_spec
):
    data = payload(4 * PART)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    key = layout.assembly_key(session_id)
    assert storage.in_place is not None
    # Another writer (a stalled request, say) holds part 3's range: the request does not wait.
    with storage.in_place.claim(key, 2 * PART, PART, len(data)) as held:
        assert held is not None
        put_part(app, auth, session_id, 3, parts[2])
    for number in (1, 2, 4):
        put_part(app, auth, session_id, number, parts[number - 1])
    keys = _part_keys(database_url, session_id)
    assert keys[3] != key and keys[3].startswith(layout.parts_prefix(session_id))
    assert {keys[n] for n in (1, 2, 4)} == {key}
    assert complete(app, auth, session_id).json["object"]["sha256"] == sha(data)
    assert _stored(file_spec.root, layout.object_key(session_id)) == data
    assert not (file_spec.root / keys[3]).exists()  # placed, then removed with the parts


def test_a_range_is_exclusive_between_writers_and_free_again_after(storage, tmp_path):
    in_place = storage.in_place
    key = f"parts/{uuid.uuid4()}/assembly"
    with in_place.claim(key, 0, 10, 100) as first:
        assert first is not None
        with in_place.claim(key, 5, 10, 100) as overlapping, in_place.claim(key, 10, 10, 100) as beside:
            assert overlapping is None and beside is not None
        first.write(io.BytesIO(b"x" * 10), 10, 4)
    with in_place.claim(key, 5, 10, 100) as again:
        assert again is not None  # the first writer's hold went with its file
    assert b"".join(bytes(b) for b in in_place.read(key, 0, 10, 4)) == b"x" * 10


def test_lost_session_file_reopens_the_session_for_its_parts(app, auth, file_spec):
    data = payload(3 * PART)
    session_id = _upload(app, auth, data)
    (file_spec.root / layout.assembly_key(session_id)).unlink()  # gone behind the service's back
    answer = complete(app, auth, session_id, status=409).json
    assert answer["code"] == "parts_missing" and answer["missing_parts"] == [1, 2, 3]
    for number, part in enumerate(split(data, PART), 1):
        put_part(app, auth, session_id, number, part)
    assert complete(app, auth, session_id).json["object"]["sha256"] == sha(data)
    assert _stored(file_spec.root, layout.object_key(session_id)) == data


def test_a_killed_frontier_holder_is_taken_over_from_its_saved_state(app, auth, database_url, file_spec):
    data = payload(6 * PART)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    for number in (1, 2, 3):
        put_part(app, auth, session_id, number, parts[number - 1])
    wait_for(lambda: _frontier(database_url, session_id)[0] == 3, "the frontier to hash three parts", 10)
    # A holder killed with kill -9 mid-hash: its lease stays on the row until it runs out.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE upload_sessions SET frontier_owner = %s, frontier_lease_until = clock_timestamp() + interval"
            " '1 second' WHERE id = %s",
            (uuid.uuid4(), session_id),
        )
    for number in (4, 5, 6):
        put_part(app, auth, session_id, number, parts[number - 1])
    assert _frontier(database_url, session_id)[0] == 3  # held: no one else hashes meanwhile
    done = complete(app, auth, session_id).json  # waits the dead lease out, then resumes at part 4
    assert done["object"]["sha256"] == sha(data)
    assert _frontier(database_url, session_id)[:2] == (6, len(data))


def test_abort_while_the_frontier_runs_leaves_nothing(app, auth, database_url, file_spec):
    data = payload(8 * PART)
    session_id = _upload(app, auth, data, order=[2, 3, 4, 5, 6, 7, 8, 1])
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert not (file_spec.root / layout.parts_prefix(session_id)).exists()
    assert not (file_spec.root / layout.object_key(session_id)).exists()
    # Whatever the frontier was doing ends, its lease given back; an ended session's frontier is
    # not taken again (take_frontier refuses it).
    wait_for(lambda: _frontier(database_url, session_id)[2] is None, "the frontier lease to be given back", 10)


def test_a_digest_mismatch_leaves_the_range_free_for_the_next_writer(app, auth, file_spec):
    data = payload(2 * PART)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    wrong = {"Content-Digest": "sha-256=:" + "A" * 43 + "=:"}
    assert put_part(app, auth, session_id, 1, parts[0], status=400, headers=wrong).json["code"] == "digest_mismatch"
    put_part(app, auth, session_id, 1, parts[0])
    put_part(app, auth, session_id, 2, parts[1])
    assert complete(app, auth, session_id).json["object"]["sha256"] == sha(data)


def test_a_part_whose_session_is_aborted_while_it_is_written_in_place_is_refused_as_not_active(app, auth, file_spec):
    data = payload(3 * PART, seed=8)
    session_id = create(app, auth, size=len(data), part_size=PART).json["id"]
    put_part(app, auth, session_id, 1, data[:PART])
    response = put_part_aborted_midway(app, auth, session_id, 2, data[PART : 2 * PART], status=409)
    assert response.json["code"] == "session_not_active"
    assert not (file_spec.root / layout.parts_prefix(session_id)).exists()
