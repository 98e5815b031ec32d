"""The hash frontier on S3 (radosgw): parts are read back and hashed as they arrive, and the
completion takes the frontier's digest instead of reading the object back. The native API's
guarantee holds: a conflicting part keeps the first bytes, and the digest is theirs.

And the object staged while the parts arrive: the frontier copies each part it passes into the
session's multipart upload, so completing copies only what is left; every way the staging can go
wrong (a piece replaced, the staging lost, an abort, the reaper's sweep) still ends in the
client's bytes, or in nothing left behind."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from chunksvc import hashstate
from chunksvc.config import Config
from chunksvc.services import layout
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.services.staging import copy_piece
from chunksvc.storage.base import StagedPiece
from tests.conftest import TEST_LIMITS
from tests.helpers import (
    PART_S3,
    completes_as,
    create,
    frontier_parts,
    payload,
    put_part,
    query,
    sha,
    split,
    staging_of,
    unfinished_uploads,
    upload_parts_in,
    wait_for,
)

PART = PART_S3

pytestmark = pytest.mark.skipif(not hashstate.available(), reason="no libcrypto SHA-256 to save states with")


@pytest.fixture
def storage_spec(s3_spec):
    return s3_spec


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, in_place_min_part=1)


def test_parts_are_hashed_as_they_arrive_and_the_compose_takes_that_digest(app, auth, database_url, storage):
    data = payload(2 * PART + 4321)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    for number in (3, 1, 2):  # out of order: the frontier waits for part 1, then runs to the end
        put_part(app, auth, session_id, number, parts[number - 1])
    wait_for(lambda: frontier_parts(database_url, session_id) == 3, "the frontier to hash every part", 20)
    assert storage.in_place is None  # S3 objects are written whole: parts stay apart
    other = payload(PART, seed=3)
    assert put_part(app, auth, session_id, 2, other, status=409).json["code"] == "part_conflict"
    completes_as(app, auth, storage, session_id, data)


def test_abort_while_the_frontier_reads_parts_back_leaves_nothing(app, auth, database_url, storage):
    data = payload(3 * PART)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART).json["id"]
    for number in (1, 2, 3):
        put_part(app, auth, session_id, number, parts[number - 1])
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []

    def given_back() -> bool:
        return query(database_url, "SELECT frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)) == [
            (None,)
        ]

    wait_for(given_back, "the frontier lease to be given back", 20)


# --- the staged object ------------------------------------------------------------------------


def _all_staged(database_url: str, session_id: str, parts: int) -> bool:
    staged_id, tokens = staging_of(database_url, session_id)
    return staged_id is not None and len(tokens) == parts and None not in tokens.values()


def test_parts_are_copied_in_as_they_arrive_and_completion_finishes_what_is_there(app, auth, database_url, storage):
    data = payload(3 * PART + 999)
    session_id = upload_parts_in(app, auth, data, (1, 2, 3, 4))
    wait_for(lambda: _all_staged(database_url, session_id, 4), "the frontier to copy every part in", 30)
    staged_id, tokens = staging_of(database_url, session_id)
    assert staged_id is not None
    # Before any completion: the store holds every piece, each the one recorded.
    held = storage.staged.placed(layout.object_key(session_id), staged_id)
    sizes = {1: PART, 2: PART, 3: PART, 4: 999}
    assert held == {copy_piece(number, 4): StagedPiece(sizes[number], tokens[number]) for number in sizes}
    completes_as(app, auth, storage, session_id, data)
    assert staging_of(database_url, session_id)[0] == staged_id  # the staging became the object
    assert unfinished_uploads(storage) == 0
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []


def test_parts_in_reverse_order_are_staged_once_the_first_arrives(app, auth, database_url, storage):
    data = payload(3 * PART, seed=1)
    session_id = upload_parts_in(app, auth, data, (3, 2))
    # No part 1 yet: the frontier, and so the staging, waits at the gap.
    wait_for(
        lambda: query(database_url, "SELECT count(*) FROM upload_parts WHERE session_id = %s", (session_id,)) == [(2,)],
        "the parts to be recorded",
    )
    assert staging_of(database_url, session_id)[0] is None
    put_part(app, auth, session_id, 1, data[:PART])
    wait_for(lambda: _all_staged(database_url, session_id, 3), "the frontier to copy every part in", 30)
    completes_as(app, auth, storage, session_id, data)


def test_conflicting_bytes_for_a_staged_part_are_refused_and_the_first_stay(app, auth, database_url, storage):
    data = payload(2 * PART, seed=2)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    wait_for(lambda: _all_staged(database_url, session_id, 2), "the frontier to copy every part in", 30)
    before = staging_of(database_url, session_id)
    other = payload(PART, seed=9)
    assert put_part(app, auth, session_id, 1, other, status=409).json["code"] == "part_conflict"
    assert staging_of(database_url, session_id) == before  # nothing copied in for the refused bytes
    completes_as(app, auth, storage, session_id, data)


def test_a_piece_replaced_after_it_was_recorded_is_copied_again(app, auth, database_url, storage):
    """What a holder killed mid-copy can leave: its copy landing after another holder's. Here part
    1's bytes are placed as piece 2 behind the service's back, through the store's own API."""
    data = payload(2 * PART + 10, seed=3)
    session_id = upload_parts_in(app, auth, data, (1, 2, 3))
    wait_for(lambda: _all_staged(database_url, session_id, 3), "the frontier to copy every part in", 30)
    staged_id, tokens = staging_of(database_url, session_id)
    [(part_1_key,)] = query(
        database_url, "SELECT storage_key FROM upload_parts WHERE session_id = %s AND part_number = 1", (session_id,)
    )
    key = layout.object_key(session_id)
    late = storage.staged.place(key, staged_id, copy_piece(2, 3), part_1_key)
    assert late != tokens[2]  # the store holds other bytes as piece 2 now
    completes_as(app, auth, storage, session_id, data)
    # Piece 2 was copied again and the staging completed (made from the parts instead, it would
    # have been forgotten).
    assert staging_of(database_url, session_id)[0] == staged_id


def test_a_staging_lost_behind_the_services_back_is_made_from_the_parts(app, auth, database_url, storage):
    data = payload(2 * PART, seed=4)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    wait_for(lambda: _all_staged(database_url, session_id, 2), "the frontier to copy every part in", 30)
    staged_id, _ = staging_of(database_url, session_id)
    assert storage.staged.abandon(layout.object_key(session_id), staged_id)  # an operator's cleanup, say
    completes_as(app, auth, storage, session_id, data)
    assert staging_of(database_url, session_id) == (None, {1: None, 2: None})  # forgotten, tokens and all
    assert unfinished_uploads(storage) == 0


def test_abort_during_staging_leaves_no_unfinishedupload_parts_in(app, auth, database_url, storage):
    data = payload(3 * PART, seed=5)
    session_id = upload_parts_in(app, auth, data, (1, 2, 3))
    wait_for(lambda: staging_of(database_url, session_id)[0] is not None, "the frontier to begin staging", 30)
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)

    def given_back() -> bool:
        return query(database_url, "SELECT frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)) == [
            (None,)
        ]

    wait_for(given_back, "the frontier lease to be given back", 30)
    # A copy in flight at the abort fails against the aborted upload; none begins another.
    assert unfinished_uploads(storage) == 0
    assert list(storage.list_keys(layout.parts_prefix(session_id))) == []
    assert not storage.exists(layout.object_key(session_id))


def test_the_sweep_leaves_a_live_staging_alone_and_aborts_one_no_session_names(app, auth, database_url, db, storage):
    data = payload(2 * PART, seed=6)
    session_id = upload_parts_in(app, auth, data, (1, 2))
    wait_for(lambda: _all_staged(database_url, session_id, 2), "the frontier to copy every part in", 30)
    # What a holder killed between beginning a staging and recording it leaves behind.
    storage.staged.begin(layout.object_key(uuid.uuid4()))
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    result = Reaper(db, storage, completion, ReaperSettings(orphan_grace=0)).run()
    assert result.incomplete_swept == 1 and result.errors == 0
    assert unfinished_uploads(storage) == 1  # the session's own staging
    completes_as(app, auth, storage, session_id, data)


def test_a_read_that_fails_midway_never_saves_a_state_with_its_bytes(app, auth, database_url, storage, monkeypatch):
    """The frontier hashes part 2 block by block; its read from the store fails midway (a reset
    connection). On the way out, StagingRun.drain waits for part 1's copy and, while it waits,
    renews the lease by saving the state "as of the last part passed": the variable ``sha`` by
    then holds part 2's first block too. That state, saved as after part 1, makes the final
    digest wrong, and completion trusts it (no read-back): a correct upload with a declared
    SHA-256 ends FAILED (and its parts are discarded)."""
    import io
    import time as _time

    from chunksvc.errors import StorageUnavailable

    data = payload(3 * PART, seed=12)
    parts = split(data, PART)
    session_id = create(app, auth, size=len(data), part_size=PART, sha256=sha(data)).json["id"]
    for number in (2, 3):  # the frontier waits at the gap
        put_part(app, auth, session_id, number, parts[number - 1])
    [(part_2_key,)] = query(
        database_url, "SELECT storage_key FROM upload_parts WHERE session_id = %s AND part_number = 2", (session_id,)
    )

    class Reset(io.BytesIO):
        calls = 0

        def read(self, size: int | None = -1) -> bytes:
            self.calls += 1
            if self.calls > 1:
                raise StorageUnavailable("connection reset mid-body")
            return super().read(size)

    real_open, real_place = storage.open, storage.staged.place
    monkeypatch.setattr(storage, "open", lambda key: Reset(parts[1]) if key == part_2_key else real_open(key))

    def slow_place(*args):
        _time.sleep(3)  # a copy longer than RENEW_EVERY: the holder renews while it waits
        return real_place(*args)

    monkeypatch.setattr(storage.staged, "place", slow_place)
    put_part(app, auth, session_id, 1, parts[0])

    def stopped() -> bool:
        return query(
            database_url, "SELECT frontier_parts, frontier_owner FROM upload_sessions WHERE id = %s", (session_id,)
        ) == [(1, None)]

    wait_for(stopped, "the frontier to stop after part 1", 30)
    monkeypatch.setattr(storage, "open", real_open)
    monkeypatch.setattr(storage.staged, "place", real_place)
    completes_as(app, auth, storage, session_id, data)
