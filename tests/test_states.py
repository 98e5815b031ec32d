"""The session state machine as the database and the services enforce it, checked against its
table (``states.TRANSITIONS``).

Every transition is made by a statement of queries.sql (or a migration's function) guarded by
its own WHERE clause, or by a service's check under the row lock; no service reads the table.
So each operation that moves a session is attempted on a real session in every state (a real
PostgreSQL, the real statements and services): the moves that happen must be exactly the table's,
and every refused attempt must leave the state as it was. Changing a rule in the SQL, a service or
the table alone fails here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest

from chunksvc import dao
from chunksvc.config import StorageSpec
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError
from chunksvc.rows import SessionRow
from chunksvc.services import layout, states
from chunksvc.services.auth import Client
from chunksvc.services.completion import Completion, CompletionService
from chunksvc.services.uploads import UploadService
from chunksvc.storage import Storage, open_storage
from tests.conftest import TEST_LIMITS

PART_SIZE = 4
SIZE = 2 * PART_SIZE  # two parts: a session can have one part and miss the other


@dataclasses.dataclass
class World:
    db: Database
    database_url: str
    storage: Storage
    client: Client
    uploads: UploadService
    completion: CompletionService

    def new_session(self) -> SessionRow:
        with self.db.transaction() as conn:
            session = dao.insert_session(
                conn,
                id=uuid.uuid4(),
                client_id=self.client.id,
                filename="f.bin",
                content_type="application/octet-stream",
                size=SIZE,
                part_size=PART_SIZE,
                total_parts=SIZE // PART_SIZE,
                sha256=None,
                metadata={},
                idempotency_key=None,
                request_fingerprint=None,
                ttl=TEST_LIMITS.session_ttl,
            )
        assert session is not None
        return session

    def read(self, session: SessionRow) -> SessionRow:
        with self.db.connection() as conn:
            row = dao.get_session(conn, session.id, self.client.id)
        assert row is not None
        return row

    def expiry_passes(self, session: SessionRow) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as admin:
            admin.execute(
                "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (session.id,)
            )


# --- the operations ------------------------------------------------------------------------------
# Each attempts one move on the session (as read just before) and says whether it was accepted:
# the statement changed the row, or the service answered without refusing.


def put_part(world: World, session: SessionRow) -> bool:
    """The next part a client sends: the first number with no row (the last, a retry, when every
    part is there)."""
    number = min(session.received_parts + 1, session.total_parts)
    with world.db.connection() as conn:
        recorded = dao.record_part(
            conn, session.id, world.client.id, number, PART_SIZE, hashlib.sha256(b"part").hexdigest(), uuid.uuid4().hex
        )
    assert recorded is not None
    return recorded.inserted


def tus_final_ready(world: World, session: SessionRow) -> bool:
    """A tus final upload whose partials have all their bytes (the session has none: the check of
    the partials holds, and only the final's own state decides)."""
    with world.db.transaction() as conn:
        return dao.mark_tus_final_ready(conn, session.id)


def complete(world: World, session: SessionRow) -> bool:
    """The client's complete, accepted for the background assembler (202): the completion service
    is built with ``sync_complete_max=0``, so no assembly runs here. A COMPLETED session's replay
    (200, nothing done) is no move."""
    try:
        _, outcome = world.completion.complete(world.client, str(session.id), None)
    except ChunksvcError:
        return False
    return outcome is Completion.BACKGROUND


def _as_assembler(world: World, session: SessionRow, outcome: Callable[..., object]) -> bool:
    """What an assembler records at the end, holding the completion lease (taken as the assembler
    does, under the row lock): so only the statement's check of the state can refuse it."""
    owner = uuid.uuid4()
    with world.db.transaction() as conn:
        assert dao.lock_session(conn, session.id, world.client.id) is not None
        assert dao.take_completion_lease(conn, session.id, owner, 60)
        return bool(outcome(conn, owner))


def assembly_stores_object(world: World, session: SessionRow) -> bool:
    return _as_assembler(
        world,
        session,
        lambda conn, owner: dao.mark_completed(
            conn, session.id, owner, layout.object_key(session.id), SIZE, hashlib.sha256(b"object").hexdigest()
        ),
    )


def assembly_fails(world: World, session: SessionRow) -> bool:
    """A size or digest mismatch."""
    return _as_assembler(world, session, lambda conn, owner: dao.mark_failed(conn, session.id, owner))


def assembly_finds_parts_lost(world: World, session: SessionRow) -> bool:
    with world.db.connection() as conn:
        keys = [part.storage_key for part in dao.list_parts(conn, session.id, 0, 100)][:1]
    return _as_assembler(
        world,
        session,
        lambda conn, owner: dao.drop_lost_parts(conn, session.id, owner, keys, TEST_LIMITS.session_ttl),
    )


def abort(world: World, session: SessionRow) -> bool:
    try:
        world.uploads.abort(world.client, str(session.id))
    except ChunksvcError:
        return False
    return True


def abort_statement(world: World, session: SessionRow) -> bool:
    """The abort's statement alone, outside the service (which decides by this statement's row
    count too), with the completion lease the service takes first on a COMPLETING session."""
    with world.db.transaction() as conn:
        assert dao.lock_session(conn, session.id, world.client.id) is not None
        assert dao.take_completion_lease(conn, session.id, uuid.uuid4(), 0)
        return dao.mark_aborted(conn, session.id) > 0


def tus_final_ends(world: World, session: SessionRow) -> bool:
    """The session is a tus partial whose final upload is aborted (migration 0011's trigger ends
    the partials with it). Linked by hand, not by concatenate_tus_partials, whose own check of the
    partials' state would leave most states out: here only the trigger's check decides."""
    final = world.new_session()
    with world.db.transaction() as conn:
        dao.insert_tus_upload(conn, final.id, None, "final")
    with psycopg.connect(world.database_url, autocommit=True) as admin:
        admin.execute(
            "INSERT INTO tus_uploads (session_id, concat, final_id, position) VALUES (%s, 'partial', %s, 1)",
            (session.id, final.id),
        )
    assert abort(world, final)
    # The trigger says nothing; it changed the partial if it dated a change on it.
    return world.read(session).updated_at != session.updated_at


def expire(world: World, session: SessionRow) -> bool:
    """The session's expiry passes, and the reaper's expire phase runs."""
    world.expiry_passes(session)
    with world.db.transaction() as conn:
        expired = dao.expire_overdue_sessions(conn, limit=1000)
    # A session clients already saw EXPIRED (past its expiry, not stored yet) only has that
    # written down: nothing they see moves.
    return session.id in expired and session.effective_status != states.EXPIRED


def expiry_passes(world: World, session: SessionRow) -> bool:
    """Only the clock: clients see an open session EXPIRED before the reaper stores it."""
    world.expiry_passes(session)
    return True


@dataclasses.dataclass(frozen=True)
class Operation:
    name: str
    target: str  # the state it moves a session to when accepted
    attempt: Callable[[World, SessionRow], bool]


PUT_PART = Operation("a part arrives", states.IN_PROGRESS, put_part)
TUS_FINAL_READY = Operation("a tus final's partials are all there", states.IN_PROGRESS, tus_final_ready)
COMPLETE = Operation("complete", states.COMPLETING, complete)
STORES = Operation("the assembly stores the object", states.COMPLETED, assembly_stores_object)
FAILS = Operation("the assembly fails", states.FAILED, assembly_fails)
PARTS_LOST = Operation("the assembly finds parts' bytes lost", states.IN_PROGRESS, assembly_finds_parts_lost)
ABORT = Operation("abort", states.ABORTED, abort)
ABORT_STATEMENT = Operation("the abort's statement alone", states.ABORTED, abort_statement)
TUS_FINAL_ENDS = Operation("its tus final upload ends", states.ABORTED, tus_final_ends)
EXPIRE = Operation("expiry and the reaper", states.EXPIRED, expire)
EXPIRY_PASSES = Operation("its expiry passes", states.EXPIRED, expiry_passes)

OPERATIONS = (
    PUT_PART,
    TUS_FINAL_READY,
    COMPLETE,
    STORES,
    FAILS,
    PARTS_LOST,
    ABORT,
    ABORT_STATEMENT,
    TUS_FINAL_ENDS,
    EXPIRE,
)


@dataclasses.dataclass(frozen=True)
class Start:
    """A session driven into ``state`` by ``steps`` (operations, each accepted) from a new one."""

    name: str
    state: str
    steps: Sequence[Operation]


STARTS = (
    Start("new", states.INIT, ()),
    Start("one part of two", states.IN_PROGRESS, (PUT_PART,)),
    Start("every part", states.IN_PROGRESS, (PUT_PART, PUT_PART)),
    Start("completing", states.COMPLETING, (PUT_PART, PUT_PART, COMPLETE)),
    Start("completed", states.COMPLETED, (PUT_PART, PUT_PART, COMPLETE, STORES)),
    Start("failed", states.FAILED, (PUT_PART, PUT_PART, COMPLETE, FAILS)),
    Start("aborted", states.ABORTED, (ABORT,)),
    Start("aborted while completing", states.ABORTED, (PUT_PART, PUT_PART, COMPLETE, ABORT)),
    Start("expired, stored by the reaper", states.EXPIRED, (PUT_PART, EXPIRE)),
    Start("past its expiry, not stored yet", states.EXPIRED, (EXPIRY_PASSES,)),
)


@pytest.fixture
def world(db: Database, database_url: str, file_spec: StorageSpec) -> Iterator[World]:
    storage = open_storage(file_spec)
    with db.transaction() as conn:
        client = Client(dao.upsert_client(conn, "alice").id, "alice")
    yield World(
        db=db,
        database_url=database_url,
        storage=storage,
        client=client,
        uploads=UploadService(db, storage, TEST_LIMITS, 4096),
        completion=CompletionService(db, storage, TEST_LIMITS, 4096, sync_complete_max=0),
    )
    storage.close()


def test_the_moves_that_happen_are_exactly_the_tables(world: World) -> None:
    made: dict[tuple[str, str], list[str]] = {}
    wrong: list[str] = []
    for start in STARTS:
        for operation in OPERATIONS:
            session = world.new_session()
            for step in start.steps:
                assert step.attempt(world, world.read(session)), f"{start.name}: {step.name} was refused"
            before = world.read(session)
            assert before.effective_status == start.state, start.name
            accepted = operation.attempt(world, before)
            after = world.read(session).effective_status
            attempt = f"{start.name} ({start.state}) --{operation.name}-->"
            if accepted:
                made.setdefault((start.state, after), []).append(attempt)
                if after != operation.target:
                    wrong.append(f"{attempt} accepted, but the session is {after}")
            elif after != start.state:
                wrong.append(f"{attempt} refused, but the session is {after}")
    assert wrong == []
    allowed = {(source, target) for source, targets in states.TRANSITIONS.items() for target in targets}
    not_allowed = {move: attempts for move, attempts in made.items() if move not in allowed}
    assert not_allowed == {}, "moves made that states.TRANSITIONS does not allow"
    assert sorted(allowed - set(made)) == [], "moves states.TRANSITIONS allows that no operation makes"
