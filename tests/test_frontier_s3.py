"""The hash frontier on S3 (radosgw): parts are read back and hashed as they arrive, and a
completion by server-side compose takes the frontier's digest instead of reading the object back.
Also the native API's guarantee: a conflicting part keeps the first bytes, and the digest is theirs."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from chunksvc import hashstate
from chunksvc.config import Config
from chunksvc.services import layout
from tests.helpers import complete, create, payload, put_part, sha, split, wait_for

PART = 5 * 1024 * 1024  # S3's smallest part for a compose

pytestmark = pytest.mark.skipif(not hashstate.available(), reason="no libcrypto SHA-256 to save states with")


@pytest.fixture
def storage_spec(s3_spec):
    return s3_spec


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, in_place_min_part=1)


def _frontier_parts(database_url: str, session_id: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT frontier_parts FROM upload_sessions WHERE id = %s", (session_id,)).fetchone()
    assert row is not None
    return row[0]


def test_parts_are_hashed_as_they_arrive_and_the_compose_takes_that_digest(app, auth, database_url, storage):
    data = payload(2 * PART + 4321)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    for number in (3, 1, 2):  # out of order: the frontier waits for part 1, then runs to the end
        put_part(app, auth, session_id, number, parts[number - 1])
    wait_for(lambda: _frontier_parts(database_url, session_id) == 3, "the frontier to hash every part", 20)
    assert storage.in_place is None  # S3 objects are written whole: parts stay apart
    other = payload(PART, seed=3)
    assert put_part(app, auth, session_id, 2, other, status=409).json["code"] == "part_conflict"
    done = complete(app, auth, session_id).json
    assert done["status"] == "COMPLETED" and done["object"]["sha256"] == sha(data)
    with storage.open(layout.object_key(session_id)) as stored:
        assert stored.read() == data


def test_abort_while_the_frontier_reads_parts_back_leaves_nothing(app, auth, database_url, storage):
    data = payload(3 * PART)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART).json["id"]
    for number in (1, 2, 3):
        put_part(app, auth, session_id, number, parts[number - 1])
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []

    def given_back() -> bool:
        with psycopg.connect(database_url, autocommit=True) as conn:
            row = conn.execute("SELECT frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)).fetchone()
        return row is not None and row[0] is None

    wait_for(given_back, "the frontier lease to be given back", 20)
