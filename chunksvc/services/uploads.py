"""Upload sessions: create, read, accept parts, abort (completing one is ``services.completion``'s).

Every request runs its checks in a fixed order before any write. Every change to a session
happens in one transaction that holds the session's row lock (``lock_session``; a part takes it
inside its one statement, ``record_part``), so parts, completion and abort on the same session
are serialised by PostgreSQL, across workers and hosts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from chunksvc import dao
from chunksvc.config import Limits, Quotas
from chunksvc.db import Connection, Database
from chunksvc.errors import (
    ChunksvcError,
    CompletionInProgress,
    DatabaseBusy,
    DigestMismatch,
    IdempotencyKeyReused,
    IncompleteBody,
    InvalidRequest,
    PartConflict,
    SessionCompleted,
    SessionGone,
    SessionNotActive,
    SessionNotFound,
    StorageError,
    StorageFull,
    StorageUnavailable,
)
from chunksvc.rows import PartRow, SessionRow
from chunksvc.services import auth, layout, rules, staging, states
from chunksvc.services.auth import Client
from chunksvc.services.events import UploadEvents
from chunksvc.services.frontier import HashFrontier
from chunksvc.services.quotas import QuotaService
from chunksvc.services.staging import Stager
from chunksvc.services.streaming import READ_AHEAD_DEPTH, BufferPool, HashingBodyReader, PartBody
from chunksvc.storage import Storage
from chunksvc.storage.base import Block, InPlace
from chunksvc.storage.spill import Spill

log = logging.getLogger(__name__)

Recorded = TypeVar("Recorded")  # what a caller's record of a part placed in place returns


@dataclasses.dataclass(frozen=True)
class PartTarget:
    """A part upload that passed every check that comes before reading the body."""

    client: Client
    session_id: UUID
    part_number: int
    length: int
    expected_digests: dict[str, bytes]  # from Content-Digest, by hashlib name ({} when absent)
    part_size: int = 0  # the session's: where the part starts in the whole file
    session_size: int = 0

    @property
    def total_parts(self) -> int:
        return -(-self.session_size // self.part_size) if self.part_size else 0


@dataclasses.dataclass(frozen=True)
class PartResult:
    created: bool  # False: the same bytes were already accepted under this number
    # Whether the part's row points at the bytes this request stored (a new part, or a retry
    # that healed a part whose stored bytes were lost); if not, those bytes are not needed.
    uses_new_bytes: bool
    part_number: int
    size: int
    sha256: str
    received_parts: int
    received_bytes: int
    status: str


def encode_cursor(created_at: datetime, session_id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(session_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        created_at, session_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), UUID(session_id)
    # AttributeError: a non-string id (UUID(5)); RecursionError: deeply nested JSON.
    except (ValueError, TypeError, AttributeError, RecursionError, binascii.Error):
        raise InvalidRequest("cursor is not one this service returned") from None


class UploadService:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        limits: Limits,
        block_size: int,
        events: UploadEvents | None = None,
        quotas: QuotaService | None = None,
        frontier: HashFrontier | None = None,
        stager: Stager | None = None,
        spill: Spill | None = None,
    ) -> None:
        self._db = db
        # Where the store stages objects (S3) and a local copy can be kept, parts are sent straight
        # into their session's staging (``services.staging``), hashed as they arrive by the frontier.
        self._pieces = (stager, spill) if frontier is not None and stager is not None and spill is not None else None
        # Sessions it applies to are hashed as their parts arrive, and written in place where the
        # storage can.
        self._frontier = frontier
        self._in_place = storage.in_place if frontier is not None else None
        self._quotas = quotas or QuotaService(db, Quotas())
        self._storage = storage
        self._limits = limits
        self._block_size = block_size
        # Enough for a few parts streaming at once; more are served by fresh buffers.
        self._buffers = BufferPool(block_size, keep=4 * READ_AHEAD_DEPTH)
        self._events = events or UploadEvents()

    # --- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        client: Client,
        body: Any,
        idempotency_key: str | None,
        within: Callable[[Connection, SessionRow], None] | None = None,
    ) -> tuple[SessionRow, bool]:
        """Create a session; ``(session, False)`` when this is a replay of an earlier create.

        ``within`` is called with the new session in the creating transaction (tus adds its own
        rows there: the session and they commit together, or neither does)."""
        idempotency_key = rules.parse_idempotency_key(idempotency_key)
        new = rules.validate_new_session(body, self._limits)
        fingerprint = rules.request_fingerprint(body) if idempotency_key else None
        with self._db.transaction() as conn:
            # The client's lock first: its creates run one at a time from here to the commit, so
            # the quota counts every session committed before, and a replay finds its key's row.
            usage = self._quotas.lock(conn, client.id)
            replayed = dao.get_session_by_idempotency_key(conn, client.id, idempotency_key) if idempotency_key else None
            row = None
            if replayed is None:
                self._quotas.check(usage, new.size)
                row = dao.insert_session(
                    conn,
                    id=uuid.uuid4(),
                    client_id=client.id,
                    filename=new.filename,
                    content_type=new.content_type,
                    size=new.size,
                    part_size=new.part_size,
                    total_parts=new.total_parts,
                    sha256=new.sha256,
                    metadata=new.metadata,
                    idempotency_key=idempotency_key,
                    request_fingerprint=fingerprint,
                    ttl=self._limits.session_ttl,
                )
                if row is not None and within is not None:
                    within(conn, row)
            created = row is not None
            if row is None and idempotency_key is not None:
                # A retry of an earlier create with this key; or, from a release whose creates do
                # not take the client's lock (a rolling upgrade), one that committed just now.
                row = replayed or dao.get_session_by_idempotency_key(conn, client.id, idempotency_key)
        assert row is not None  # only a used Idempotency-Key stops the insert, and sessions stay
        if created:
            self._events.session_created()
            return row, True
        if row.request_fingerprint != fingerprint:
            raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
        return row, False

    def get_session(self, client: Client, raw_id: str) -> SessionRow:
        session_id = rules.parse_session_id(raw_id)
        with self._db.connection() as conn:
            session = dao.get_session(conn, session_id, client.id)
        if session is None:
            raise SessionNotFound()
        return session

    def list_sessions(
        self, client: Client, status: str | None, raw_limit: str | None, cursor: str | None
    ) -> tuple[list[SessionRow], str | None]:
        if status is not None and status not in states.ALL:
            raise InvalidRequest(f"status must be one of {', '.join(states.ALL)}")
        limit = rules.parse_bounded_int(raw_limit, "limit", 100, 1, 1000)
        after = decode_cursor(cursor) if cursor else None
        with self._db.connection() as conn:
            rows = dao.list_sessions(conn, client.id, status, after, limit + 1)
        sessions = rows[:limit]
        more = len(rows) > limit
        next_cursor = encode_cursor(sessions[-1].created_at, sessions[-1].id) if more else None
        return sessions, next_cursor

    def list_parts(
        self, client: Client, raw_id: str, raw_after: str | None, raw_limit: str | None
    ) -> tuple[list[PartRow], int | None]:
        session = self.get_session(client, raw_id)
        after = rules.parse_bounded_int(raw_after, "after", 0, 0, session.total_parts)
        limit = rules.parse_bounded_int(raw_limit, "limit", 1000, 1, 10_000)
        with self._db.connection() as conn:
            rows = dao.list_parts(conn, session.id, after, limit + 1)
        parts = rows[:limit]
        return parts, (parts[-1].part_number if len(rows) > limit else None)

    # --- parts ------------------------------------------------------------------------------

    def check_part(
        self,
        authorization: str | None,
        raw_id: str,
        raw_part_number: str,
        raw_length: str | None,
        content_digest: str | None,
    ) -> PartTarget:
        """The contract's checks 1-6 (and the Content-Digest syntax), before any body byte is read.

        The credential and the session are looked up in one round trip: the part path is the hot
        one. An upload token is refused (401) if expired or its session ended, then held to its
        session (another one: 404), before any other check.
        """
        credential = auth.presented_credential(authorization)
        try:
            session_id: UUID | None = rules.parse_session_id(raw_id)
        except SessionNotFound:
            session_id = None  # still authenticated first: 401 comes before 404
        with self._db.connection() as conn:
            found = dao.authenticate(conn, credential.key_hash, session_id, token_hash=credential.token_hash)
        client = auth.client_of(found)
        auth.check_scope(client, session_id)
        assert found is not None  # client_of refused a missing row
        # For a token, the row's session is the token's own: the one asked for (check_scope).
        session = found.session
        if session is None:
            raise SessionNotFound()
        if not states.accepts_parts(session.effective_status):
            raise SessionNotActive(f"the session is {session.effective_status}")
        part_number = rules.parse_part_number(raw_part_number, session.total_parts)
        length = rules.check_part_length(raw_length, session.size, session.part_size, part_number)
        expected = rules.parse_content_digest(content_digest)
        return PartTarget(client, session.id, part_number, length, expected, session.part_size, session.size)

    # A part's bytes are stored before its row is recorded, under a key of their own. They are
    # removed only when it is known that no row points to them: the record was refused (these
    # errors; DatabaseBusy means no connection was had, so no statement was sent), or it
    # committed as a duplicate or conflict whose row points at other bytes. When
    # the record's outcome is unknown (the connection failed while the statement or its commit
    # was under way) they stay: the row may exist. The reaper removes them once it knows no row
    # points to them (see Reaper._sweep_batch).
    _NOT_RECORDED = (DigestMismatch, SessionNotFound, SessionNotActive, PartConflict, DatabaseBusy)

    def store_part(self, target: PartTarget, body: PartBody) -> PartResult:
        """Stream the body, hashing it, to its place in the session's file (``_store_in_place``)
        or else to a fresh key; then record it in one transaction."""
        try:
            return self._store_part(target, body)
        except (StorageError, StorageUnavailable):
            # An abort meanwhile removes the session's stored bytes, those being written too: the
            # client is told the session ended, not that the storage failed.
            self._check_still_open(target)
            raise

    def _store_part(self, target: PartTarget, body: PartBody) -> PartResult:
        in_place = self.in_place_for(target.part_size)
        if in_place is not None:
            result = self._store_in_place(in_place, target, body)
            if result is not None:
                return result
        if self._pieces is not None and self._frontier is not None and self._frontier.applies(target.part_size):
            stager, spill = self._pieces
            if stager.takes_parts(target.part_size, target.total_parts):
                result = self._store_as_piece(stager, spill, target, body)
                if result is not None:
                    return result
        return self._store_apart(target, body)

    def _store_as_piece(self, stager: Stager, spill: Spill, target: PartTarget, body: PartBody) -> PartResult | None:
        """The part sent once, as a piece of its session's staging, from a local copy written while
        hashing the body (``services.staging``); None (nothing read from the body) when it goes the
        usual way. The store checks the piece against the SHA-256 before answering, so what is
        recorded is durable and is the bytes hashed. The local copy stays for the frontier; it goes
        when the frontier has passed the part, or with the session. Without room for the copy,
        the part goes the usual way (checked before a piece number is taken)."""
        if not spill.has_room(target.length):
            return None
        taken = stager.take_piece(target.session_id, target.part_number, target.total_parts)
        if taken is None:
            return None
        number, staged_id = taken
        key = layout.piece_key(target.session_id, number)
        try:
            with HashingBodyReader(body, target.length, self._buffers, also_hash=target.expected_digests) as reader:
                try:
                    spill.write(key, reader, target.length, self._block_size)
                except OSError as exc:  # an abort meanwhile, say (store_part)
                    raise StorageUnavailable(f"the part's local copy could not be kept: {exc.strerror or exc}") from exc
            for algorithm, expected in target.expected_digests.items():
                if reader.digest(algorithm) != expected:
                    raise DigestMismatch(f"the body's {algorithm.upper()} differs from Content-Digest")
            sha256 = reader.hexdigest()
            copy = spill.open(key)
            if copy is None:
                raise StorageError(f"the local copy of {key} vanished before it was sent")
            with copy:
                stager.write_piece(target.session_id, staged_id, number, copy, target.length, sha256)
            # A piece no record names is simply not completed: S3 drops it with the staging.
            result = self._record_part(target, key, sha256)
        except (*self._NOT_RECORDED, StorageError, StorageUnavailable, StorageFull, IncompleteBody, OSError):
            spill.remove(key)
            raise
        self._events.part_stored(created=result.created, size=target.length, healed=False)
        if result.uses_new_bytes:
            assert self._frontier is not None  # parts are sent as pieces only where it applies
            self._frontier.poke(target.session_id)
        else:
            spill.remove(key)
        return result

    def _store_in_place(self, in_place: InPlace, target: PartTarget, body: PartBody) -> PartResult | None:
        """The part written at its offset in the session's file (``_place``), then recorded; None
        (nothing read from the body) when its range is held by another writer or its number is
        already recorded: those bytes go to a fresh key (``_store_apart``), to be compared and,
        where needed, placed at completion."""
        result = self._place(in_place, target, body, lambda key, sha256: self._record_part(target, key, sha256))
        if result is None:
            return None
        self._events.part_stored(
            created=result.created, size=target.length, healed=not result.created and result.uses_new_bytes
        )
        if self._frontier is not None and result.uses_new_bytes:
            self._frontier.poke(target.session_id)
        return result

    def in_place_for(self, part_size: int) -> InPlace | None:
        """Where parts of sessions of this part size are written in place (local storage, with the
        hash frontier on), else None."""
        if self._in_place is not None and self._frontier is not None and self._frontier.applies(part_size):
            return self._in_place
        return None

    def place_part(
        self,
        in_place: InPlace,
        target: PartTarget,
        body: PartBody,
        record: Callable[[str, str], None],
        keep_cut: Callable[[Iterator[Block], int], None],
    ) -> bool:
        """For a protocol that records parts its own way (tus): the part written in place as a
        native one is, then ``record(key, sha256)`` called while its range is held, then the
        frontier poked. A body cut short raises ``IncompleteBody`` after ``keep_cut(blocks,
        count)`` was given the bytes that arrived, read back while the range is still held.
        False (nothing read from the body) when the part must go another way."""

        def recorded(key: str, sha256: str) -> bool:  # not None: None is "went another way"
            record(key, sha256)
            return True

        if self._place(in_place, target, body, recorded, keep_cut) is None:
            return False
        if self._frontier is not None:
            self._frontier.poke(target.session_id)
        return True

    def part_recorded(self, session_id: UUID, part_size: int) -> None:
        """A part stored under a key of its own was recorded by a protocol that records its own
        way (tus): the frontier carries the session's SHA-256 on, as for a native part."""
        if self._frontier is not None and self._frontier.applies(part_size):
            self._frontier.poke(session_id)

    def _place(
        self,
        in_place: InPlace,
        target: PartTarget,
        body: PartBody,
        record: Callable[[str, str], Recorded],
        keep_cut: Callable[[Iterator[Block], int], None] | None = None,
    ) -> Recorded | None:
        """Under the hold of the part's byte range in the session's file, the record is checked,
        then the bytes written and made durable, then ``record``ed: so a range a row points at is
        never written again, and the first accepted bytes stay. If the record is refused or its
        outcome unknown, the range's bytes are simply not anyone's (the next writer of the range
        overwrites them). None (nothing read) when the range is held or the part recorded."""
        key = layout.assembly_key(target.session_id)
        offset = (target.part_number - 1) * target.part_size
        with in_place.claim(key, offset, target.length, target.session_size) as claim:
            if claim is None:
                return None
            with self._db.connection() as conn:
                if dao.get_part(conn, target.session_id, target.part_number) is not None:
                    return None  # a retry: compared (and healed if need be) the usual way
            reader = HashingBodyReader(body, target.length, self._buffers, also_hash=target.expected_digests)
            try:
                with reader:
                    claim.write(reader, target.length, self._block_size)
            except IncompleteBody:
                # Every byte handed out was written before the next read failed.
                if keep_cut is not None and reader.handed_out:
                    arrived = reader.handed_out
                    keep_cut(in_place.read(key, offset, arrived, self._block_size), arrived)
                raise
            for algorithm, expected in target.expected_digests.items():
                if reader.digest(algorithm) != expected:
                    raise DigestMismatch(f"the body's {algorithm.upper()} differs from Content-Digest")
            try:
                return record(key, reader.hexdigest())
            except (SessionGone, SessionNotActive, SessionNotFound):
                self._drop_file_if_aborted(target, key)
                raise

    def _drop_file_if_aborted(self, target: PartTarget, key: str) -> None:
        """The session's file removed when the session was aborted (or is gone) while a part was
        written in place: an abort that removed the file before this part's claim made it again
        leaves it to nobody (the abort marked the session purged, so the reaper will not look).
        Only then: a session that began completing needs the file."""
        with self._db.connection() as conn:
            session = dao.get_session(conn, target.session_id, target.client.id)
        if session is None or session.status == states.ABORTED:
            discard(self._storage, [key])

    def _store_apart(self, target: PartTarget, body: PartBody) -> PartResult:
        """Stream the body to a fresh key while hashing it, then record it in one transaction."""
        key = layout.part_key(target.session_id)
        with HashingBodyReader(body, target.length, self._buffers, also_hash=target.expected_digests) as reader:
            # The adapter leaves nothing behind when the body ends early or the write fails.
            self._storage.write(key, reader, target.length, self._block_size)
        try:
            for algorithm, expected in target.expected_digests.items():
                if reader.digest(algorithm) != expected:
                    raise DigestMismatch(f"the body's {algorithm.upper()} differs from Content-Digest")
            result = self._record_part(target, key, reader.hexdigest())
        except self._NOT_RECORDED:
            discard(self._storage, [key])
            raise
        except BaseException:
            log.warning(
                "part %d of session %s: unknown whether its record committed; its bytes stay under %s",
                target.part_number,
                target.session_id,
                key,
            )
            raise
        self._events.part_stored(
            created=result.created, size=target.length, healed=not result.created and result.uses_new_bytes
        )
        if not result.uses_new_bytes:
            discard(self._storage, [key])  # a duplicate: the row points at the bytes stored the first time
        elif self._frontier is not None and self._frontier.applies(target.part_size):
            self._frontier.poke(target.session_id)
        return result

    def _check_still_open(self, target: PartTarget) -> None:
        """``SessionNotActive`` if the part's session no longer takes parts (aborted, say)."""
        with self._db.connection() as conn:
            session = dao.get_session(conn, target.session_id, target.client.id)
        if session is None or not states.accepts_parts(session.effective_status):
            status = session.effective_status if session is not None else "gone"
            raise SessionNotActive(f"the session became {status} during the upload")

    def _record_part(self, target: PartTarget, key: str, sha256: str) -> PartResult:
        with self._db.connection() as conn:
            # One statement: lock, insert and count commit together (see record_part).
            row = dao.record_part(
                conn, target.session_id, target.client.id, target.part_number, target.length, sha256, key
            )
            if row is None:
                raise SessionNotFound()
            # Checked under the lock: it may have been aborted, completed or expired meanwhile.
            if not states.accepts_parts(row.effective_status):
                raise SessionNotActive(f"the session became {row.effective_status} during the upload")
            if row.inserted:
                return PartResult(
                    True,
                    True,
                    target.part_number,
                    target.length,
                    sha256,
                    row.received_parts,
                    row.received_bytes,
                    row.status,
                )
            # Taken: by these bytes or others. A part row keeps its bytes once committed; only a
            # heal (below) may point it at a fresh copy of the same bytes.
            existing = dao.get_part(conn, target.session_id, target.part_number)
        if existing is None:  # dropped just now by a completion that found its bytes gone
            raise SessionNotActive("the session began completing during the upload")
        if existing.sha256 != sha256:
            raise PartConflict(
                f"part {target.part_number} was already accepted with different bytes",
                sha256=existing.sha256,
            )
        healed = self._heal_if_lost(target, existing.storage_key, key, sha256)
        return PartResult(
            False,
            healed,
            target.part_number,
            existing.size,
            sha256,
            row.received_parts,
            row.received_bytes,
            row.effective_status,
        )

    def _heal_if_lost(self, target: PartTarget, recorded_key: str, new_key: str, sha256: str) -> bool:
        """A retried part whose recorded bytes are gone from storage takes the retry's copy.

        True when the row now points at ``new_key``. Storage that cannot answer counts as the
        bytes being there: the retry still answers 200, and a completion that finds them gone
        drops the part and asks for it again (``services.completion``).
        """
        if layout.piece_number(recorded_key) is not None:
            return False  # a piece of the staging, not a key: completion checks it, and asks again if lost
        try:
            if self._storage.exists(recorded_key):
                return False
        except ChunksvcError:
            log.warning(
                "could not check the stored bytes of part %d of session %s",
                target.part_number,
                target.session_id,
                exc_info=True,
            )
            return False
        with self._db.connection() as conn:
            healed = dao.heal_part(
                conn, target.session_id, target.client.id, target.part_number, sha256, recorded_key, new_key
            )
        if healed:
            log.warning(
                "part %d of session %s: its stored bytes were missing; healed with the retry's copy",
                target.part_number,
                target.session_id,
            )
        return healed

    # --- abort --------------------------------------------------------------------------------

    def abort(self, client: Client, raw_id: str) -> None:
        session_id = rules.parse_session_id(raw_id)
        # As in completion: a COMPLETING session's completion lease is taken under the row lock,
        # and ends with ABORTED in the same transaction (mark_aborted clears it: no time needed);
        # while a live assembler holds it, the abort is refused (CompletionInProgress). Which
        # states may be aborted is mark_aborted's WHERE clause alone (states.TRANSITIONS only
        # documents it): no row moved, under the row lock, is a session that cannot be.
        with self._db.transaction() as conn:
            session = dao.lock_session(conn, session_id, client.id)
            if session is None:
                raise SessionNotFound()
            status = session.effective_status
            if status == states.COMPLETING and not dao.take_completion_lease(conn, session_id, uuid.uuid4(), 0):
                raise CompletionInProgress()
            if not dao.mark_aborted(conn, session_id):
                raise SessionCompleted("a completed upload cannot be aborted")
        if status != states.ABORTED:
            self._events.session_aborted()
        # Bytes go only once ABORTED has committed: if its reply is lost, the error above
        # propagates with every byte in place, and the client's retry (or the reaper's purge)
        # removes them. Remove by prefix: it also catches bytes no part row points to. Parts
        # still streaming will find the session ABORTED under the lock and remove their own bytes.
        try:
            staging.abandon(self._db, self._storage, session_id)
            if self._pieces is not None:
                self._pieces[1].remove_prefix(layout.parts_prefix(session_id))
            self._storage.delete_prefix(layout.parts_prefix(session_id))
            self._storage.delete([layout.object_key(session_id)])
        except ChunksvcError:
            log.warning("abort: stored bytes of session %s left for the reaper", session_id, exc_info=True)
        else:
            with self._db.connection() as conn:
                dao.mark_purged(conn, [session_id])  # so the reaper need not look at it again


def discard(storage: Storage, keys: Iterable[str]) -> None:
    """Best-effort removal: what fails here is an orphan the reaper removes later."""
    try:
        storage.delete(list(keys))
    except Exception:
        log.warning("could not remove stored bytes; left for the reaper", exc_info=True)
