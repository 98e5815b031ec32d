"""Completing an upload: its parts assembled into the object, verified, and the outcome recorded.

Two entry points, one per caller:

- ``CompletionService.complete``: ``POST .../complete``. A session small enough is assembled in
  the request (``Completion.DONE``); a larger one is checked and moved to ``COMPLETING`` here,
  and assembled later by the background assembler (``Completion.BACKGROUND``); one that another
  request or assembler is assembling answers as it stands (``Completion.ELSEWHERE``).
- ``CompletionService.resume``: the background assembler and the reaper, for a completion
  already accepted (``COMPLETING``), whose assembler may have died.

Either way the assembly runs under the session's completion lease: ``completion_owner`` (one
fresh id per attempt) and ``completion_lease_until`` on the session's row, taken under the row
lock in the transaction that checks the session (``dao.take_completion_lease``), so one assembly
runs at a time. A ``LeaseKeeper`` renews it about once a second while the storage works (assembles,
and looks for lost parts if it found one missing), in the same write as the progress
(``assembled_bytes``); the work stops (``CompletionInProgress``) when a renewal finds it lost.
The outcome (``COMPLETED``, ``FAILED``, or reopened for lost parts) is recorded only by the
lease's holder and ends the lease in the same statement; an attempt that ends without one
(storage full or down, an error) gives it back at once. A crashed assembler's
lease runs out ``lease`` seconds after its last renewal (``CHUNKSVC_LEASE``, 30 s by default), and
then completing again, the background assembler's poll or the reaper's re-drive takes it over from
the start. Parts whose stored bytes are gone are dropped and the session reopened for the client
to send them again (``PartsMissing``), never failed.

Why a lease and not, as before, a session-level advisory lock on the assembling connection: such
a lock belongs to a server connection, and behind a PgBouncer in transaction pooling mode every
transaction may run on another one (``services.leases``). What that changes: a crashed assembler
was taken over as soon as PostgreSQL saw its connection close; now it is taken over once its lease
has run out. A live assembler that stalls longer than the lease (a paused process, a database it
cannot reach) may be taken over while it still runs; it finds out at its next renewal or, at the
latest, when it tries to record its outcome, which is refused (``mark_completed`` and the others
check the owner), and it removes nothing another assembler may need. Two assemblies of the same
session write the same bytes under the same key, so the object stays whole whichever finishes last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast
from uuid import UUID

from chunksvc import dao
from chunksvc.config import Limits
from chunksvc.db import Connection, Database
from chunksvc.errors import (
    ChecksumMismatch,
    ChunksvcError,
    CompletionInProgress,
    DatabaseBusy,
    DatabaseUnavailable,
    InvalidRequest,
    ObjectMissing,
    PartsMissing,
    PieceCopyMissing,
    SessionNotActive,
    SessionNotFound,
    StorageError,
)
from chunksvc.hashing import ReadsInto, hash_stream
from chunksvc.rows import SessionRow
from chunksvc.services import layout, rules, states
from chunksvc.services.auth import Client
from chunksvc.services.events import UploadEvents
from chunksvc.services.frontier import HashFrontier
from chunksvc.services.leases import LeaseKeeper
from chunksvc.services.staging import Stager
from chunksvc.services.uploads import discard
from chunksvc.storage import PartSource, Storage, StoredObject
from chunksvc.storage.base import InPlace, Placement

log = logging.getLogger(__name__)

MAX_MISSING_LISTED = 100
ASSEMBLY_SLOT_WAIT = 30.0  # seconds a completion waits for a free assembly slot, then 503
PROGRESS_INTERVAL = 1.0  # seconds between renewals of an assembly's lease, which write its progress
# Up to this many parts of a completed session are removed before complete answers; more are
# removed by a thread after it (their unlinking would otherwise hold the answer).
INLINE_PART_REMOVAL = 256
COMPLETION_LEASE = 30.0  # seconds a crashed assembler's lease outlives its last renewal
# A completion waited for (``Prefer: wait``) is looked up at least this often: its assembler may
# run in another process, whose outcome no in-process signal announces.
OUTCOME_POLL = 0.25


@dataclasses.dataclass(frozen=True)
class _Lease:
    """One attempt's claim on a session's completion: its owner id, and when (monotonic) the take
    was sent (the database dates the lease from no earlier than that)."""

    owner: UUID
    taken_at: float

    @classmethod
    def new(cls) -> _Lease:
        return cls(uuid.uuid4(), time.monotonic())


class Completion(enum.Enum):
    DONE = "done"  # assembled (now or before): 200
    BACKGROUND = "background"  # accepted; the background assembler runs it: 202
    ELSEWHERE = "elsewhere"  # another request is assembling it: 202


class CompletionService:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        limits: Limits,
        block_size: int,
        events: UploadEvents | None = None,
        max_assemblies: int = 4,
        sync_complete_max: int = 256 * 1024 * 1024,
        lease: float = COMPLETION_LEASE,
        frontier: HashFrontier | None = None,
        stager: Stager | None = None,
    ) -> None:
        self._db = db
        self._frontier = frontier
        self._stager = stager
        self._storage = storage
        self._limits = limits
        self._block_size = block_size
        self._events = events or UploadEvents()
        # An assembly holds its pooled connection from start to end (its lease is renewed on it:
        # a renewal never waits for the pool): at most this many at once per process, so parts
        # and reads keep connections. Behind a transaction-pooling PgBouncer the connection it
        # holds is PgBouncer's; a server connection is used only while a statement runs.
        self._assembly_slots = threading.BoundedSemaphore(max_assemblies)
        self._sync_complete_max = sync_complete_max
        if lease <= 0:
            raise ValueError(f"the completion lease must be positive, got {lease}")
        self._lease_seconds = lease
        # Parts of completed sessions removed after the answer (_remove_parts), by one thread.
        self._removals: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._remover: threading.Thread | None = None
        # Sessions whose completion lease an assembly in this process holds (give_back_leases).
        self._held: dict[UUID, UUID] = {}
        self._held_lock = threading.Lock()
        # Notified whenever an assembly in this process ends, so a waiting complete answers at once.
        self._assembly_ended = threading.Condition()

    def complete(self, client: Client, raw_id: str, body: Any) -> tuple[SessionRow, Completion]:
        """Complete the session: ``DONE`` once assembled here; ``BACKGROUND`` when it was accepted
        for assembly in the background (above ``sync_complete_max``: the caller hands it to the
        background assembler, which runs ``resume``); ``ELSEWHERE`` while another request
        assembles it. Both of the last two answer 202."""
        session_id = rules.parse_session_id(raw_id)
        sha256 = self._completion_digest(body)
        accepted = self._accept_for_background(session_id, client.id, sha256)
        if accepted is not None:
            return accepted, Completion.BACKGROUND
        try:
            return self._complete_now(session_id, client.id, sha256), Completion.DONE
        except CompletionInProgress:
            with self._db.connection() as conn:
                session = dao.get_session(conn, session_id, client.id)
            if session is None:
                raise SessionNotFound() from None
            if session.effective_status == states.COMPLETED:
                # The other assembler finished between the two reads: the object is there to give.
                return session, Completion.DONE
            return session, Completion.ELSEWHERE

    def wait_while_completing(self, session_id: UUID, client_id: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for the session to leave ``COMPLETING`` (``Prefer: wait`` on
        complete); True once it has. Woken when an assembly in this process ends, and otherwise
        looks every ``OUTCOME_POLL`` seconds (the assembler may be another process's). No
        connection is held while waiting."""
        deadline = time.monotonic() + seconds
        while True:
            with self._db.connection() as conn:
                session = dao.get_session(conn, session_id, client_id)
            if session is None or session.effective_status != states.COMPLETING:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._assembly_ended:
                self._assembly_ended.wait(min(OUTCOME_POLL, remaining))

    def resume(self, session_id: UUID, client_id: int) -> SessionRow:
        """Drive an accepted completion to its end, as calling ``complete`` again would: one
        accepted for the background, or one whose assembler died (``CompletionInProgress`` while
        another assembler has it).

        For the background assembler and the reaper, so no client check. Only a session still
        ``COMPLETING`` is resumed (else ``SessionNotActive``: someone else finished it). If parts'
        bytes are gone the session is reopened without them (``PartsMissing``), as for the
        client's own complete.
        """
        with self._assembly_slot(), self._db.connection() as conn:
            lease = _Lease.new()
            with conn.transaction():
                session = self._lock_session(conn, session_id, client_id)
                if session.effective_status != states.COMPLETING:
                    raise SessionNotActive(
                        f"the session is {session.effective_status}; there is no completion to resume"
                    )
                self._take_lease(conn, session_id, lease)
                sources = self._sources(conn, session_id)
            return self._assemble_or_reopen(conn, client_id, session, sources, lease)

    # --- internals --------------------------------------------------------------------------

    def _accept_for_background(self, session_id: UUID, client_id: int, sha256: str | None) -> SessionRow | None:
        """A large upload's completion: checked and moved to COMPLETING here, assembled later.
        None when the session is small enough to assemble in the request (or already done)."""
        with self._db.transaction() as conn:
            session = self._lock_session(conn, session_id, client_id)
            if session.size <= self._sync_complete_max or session.effective_status == states.COMPLETED:
                return None
            if session.effective_status == states.COMPLETING:
                return session  # accepted before: the same 202
            self._check_completable(conn, session, sha256)
            return dao.mark_completing(conn, session_id, sha256)

    def _complete_now(self, session_id: UUID, client_id: int, sha256: str | None) -> SessionRow:
        """The request's own assembly (or the finished session, if it is)."""
        with self._assembly_slot(), self._db.connection() as conn:
            lease = _Lease.new()
            with conn.transaction():
                session = self._lock_session(conn, session_id, client_id)
                if session.effective_status == states.COMPLETED:
                    return session
                accepted = session.effective_status == states.COMPLETING
                if not accepted:
                    self._check_completable(conn, session, sha256)
                self._take_lease(conn, session_id, lease)
                if not accepted:
                    session = dao.mark_completing(conn, session_id, sha256)
                sources = self._sources(conn, session_id)
            return self._assemble_or_reopen(conn, client_id, session, sources, lease)

    @contextlib.contextmanager
    def _assembly_slot(self) -> Iterator[None]:
        if not self._assembly_slots.acquire(timeout=ASSEMBLY_SLOT_WAIT):
            raise DatabaseBusy("too many completions are running on this worker; try again")
        try:
            yield
        finally:
            self._assembly_slots.release()

    @staticmethod
    def _lock_session(conn: Connection, session_id: UUID, client_id: int) -> SessionRow:
        session = dao.lock_session(conn, session_id, client_id)
        if session is None:
            raise SessionNotFound()
        return session

    def _take_lease(self, conn: Connection, session_id: UUID, lease: _Lease) -> None:
        """Taken under the session's row lock, in the caller's transaction; held until an outcome
        ends it or ``_assemble_or_reopen`` gives it back. A live assembler holds it:
        ``CompletionInProgress``. A ``COMPLETING`` session whose lease is free lost its assembler
        (or it gave up), and this call drives it to the end."""
        if not dao.take_completion_lease(conn, session_id, lease.owner, self._lease_seconds):
            raise CompletionInProgress()

    @staticmethod
    def _sources(conn: Connection, session_id: UUID) -> list[PartSource]:
        return [PartSource(part.storage_key, part.size) for part in dao.part_sources(conn, session_id)]

    def _assemble_or_reopen(
        self, conn: Connection, client_id: int, session: SessionRow, sources: list[PartSource], lease: _Lease
    ) -> SessionRow:
        # Whatever fails here (storage, database, this process) leaves the session COMPLETING
        # with every part row and part byte in place. The lease is given back on the way out (a
        # no-op after an outcome, which ended it); if this process dies instead, it runs out.
        # Then calling complete again, the background assembler or the reaper's re-drive takes
        # the completion up from the start. Nothing is lost by starting over.
        with self._held_lock:
            self._held[session.id] = lease.owner
        try:
            started = time.monotonic()
            found = self._assemble(conn, session, sources, lease)
            if isinstance(found, StoredObject):
                return self._record(conn, client_id, session, sources, found, lease, time.monotonic() - started)
            return self._reopen_lost_parts(conn, client_id, session, found, lease)
        except BaseException:
            self._give_back(conn, session.id, lease)
            raise
        finally:
            with self._held_lock:
                # Only this attempt's own entry: if another assembly in this process took the
                # completion over meanwhile, the entry is that one's (give_back_leases needs it).
                if self._held.get(session.id) == lease.owner:
                    del self._held[session.id]
            with self._assembly_ended:
                self._assembly_ended.notify_all()

    def give_back_leases(self) -> int:
        """Give back the completion leases this process holds (a worker shutting down: its
        assemblies die with it), so another process takes them over at once instead of after the
        lease runs out. An assembly still running here finds its lease gone at its next renewal
        and stops; it records no outcome. How many were given back."""
        with self._held_lock:
            held = list(self._held.items())
        given = 0
        for session_id, owner in held:
            try:
                with self._db.connection(timeout=ASSEMBLY_SLOT_WAIT / 10) as conn:
                    dao.release_completion_lease(conn, session_id, owner)
                given += 1
            except ChunksvcError as exc:
                log.warning("session %s: completion lease not given back (it runs out): %s", session_id, exc.detail)
        return given

    def _give_back(self, conn: Connection, session_id: UUID, lease: _Lease) -> None:
        """The lease back, on the assembler's connection or, when that one broke (the usual
        reason to be here without an outcome), on a fresh one: a database that is back at once
        should not make the next attempt wait the lease out. If neither works, it runs out."""
        try:
            dao.release_completion_lease(conn, session_id, lease.owner)
            return
        except DatabaseUnavailable:
            pass
        except ChunksvcError as exc:
            log.warning("session %s: completion lease not given back (it runs out): %s", session_id, exc.detail)
            return
        try:
            with self._db.connection(timeout=ASSEMBLY_SLOT_WAIT / 10) as fresh:
                dao.release_completion_lease(fresh, session_id, lease.owner)
        except ChunksvcError as exc:
            log.warning("session %s: completion lease not given back (it runs out): %s", session_id, exc.detail)

    @staticmethod
    def _completion_digest(body: Any) -> str | None:
        if body is None:
            return None
        if not isinstance(body, dict) or set(body) - {"sha256"}:
            raise InvalidRequest('the body must be empty or {"sha256": "<hex>"}')
        raw = body.get("sha256")
        return None if raw is None else rules.parse_sha256(raw, "sha256")

    @staticmethod
    def _check_completable(conn: Connection, session: SessionRow, sha256: str | None) -> None:
        if not states.accepts_parts(session.effective_status):
            raise SessionNotActive(f"the session is {session.effective_status}")
        if sha256 and session.sha256 and sha256 != session.sha256:
            raise InvalidRequest("sha256 differs from the digest given when the session was created")
        if session.received_parts < session.total_parts:
            raise PartsMissing(
                f"{session.total_parts - session.received_parts} of {session.total_parts} parts are missing",
                missing_parts=dao.missing_parts(conn, session.id, session.total_parts, MAX_MISSING_LISTED),
                missing_count=session.total_parts - session.received_parts,
            )

    def _reopen_lost_parts(
        self, conn: Connection, client_id: int, session: SessionRow, lost: list[str], lease: _Lease
    ) -> SessionRow:
        """The parts whose stored bytes are gone (``lost``, see ``_lost_parts``) are dropped and
        the session reopened: raises ``PartsMissing`` (or returns the session that another
        assembler, which took the lease over, completed meanwhile: it removed the parts this one
        found gone).

        Lost bytes are not the client's fault and it can repair them: the usual answer to
        ``parts_missing`` (re-send the listed parts, complete again) does. Only the holder of the
        completion lease drops parts (``drop_lost_parts`` checks it); the session's row lock
        orders this against everything else.
        """
        if not lost:  # the storage said "missing", then "there": not a verdict to act on
            raise StorageError("a part was briefly missing from storage during assembly; complete again")
        with conn.transaction():
            locked = self._lock_session(conn, session.id, client_id)
            reopened = dao.drop_lost_parts(conn, session.id, lease.owner, lost, self._limits.session_ttl)
            if reopened is not None:
                missing = dao.missing_parts(conn, session.id, session.total_parts, MAX_MISSING_LISTED)
        if reopened is None:
            return self._not_ours(locked)
        self._events.session_reopened(len(lost))
        log.warning(
            "session %s: %d parts' stored bytes are missing; reopened for the client to re-send them",
            session.id,
            len(lost),
        )
        count = reopened.total_parts - reopened.received_parts
        raise PartsMissing(
            f"{count} of {session.total_parts} parts are missing ({len(lost)} lost from storage; upload them again)",
            missing_parts=missing,
            missing_count=count,
        )

    @staticmethod
    def _not_ours(session: SessionRow) -> SessionRow:
        """This attempt's outcome was refused: its lease was lost. ``session`` (read under the row
        lock) says why: another assembler completed it (its outcome is the answer), still runs it
        (``CompletionInProgress``), or the session ended otherwise (``SessionNotActive``)."""
        if session.effective_status == states.COMPLETED:
            return session
        if session.effective_status == states.COMPLETING:
            raise CompletionInProgress("another assembler took this completion over after its lease ran out")
        raise SessionNotActive(f"the session became {session.effective_status} while its completion ran")

    def _assemble(
        self, conn: Connection, session: SessionRow, sources: list[PartSource], lease: _Lease
    ) -> StoredObject | list[str]:
        """The stored object; or, when the storage found a part missing, the keys of the parts
        whose bytes are gone (``_lost_parts``).

        Both under the lease keeper: looking for the lost parts can take as long as assembling
        (on S3, requests per part), and a lease that ran out meanwhile would be taken over by the
        next poll, whose own search would be taken over in turn, the session never reopened.
        """
        key = layout.object_key(session.id)
        with self._lease_keeper(conn, session.id, lease) as keeping:
            self._events.assembly_running(1)
            try:
                in_place = self._storage.in_place
                assembly = layout.assembly_key(session.id)
                frontier = self._frontier if self._frontier and self._frontier.applies(session.part_size) else None
                if frontier is not None and in_place is not None and any(s.key == assembly for s in sources):
                    return self._finish_in_place(in_place, session, sources, keeping)
                # The frontier's digest (over the parts as stored, read back as they arrived), for
                # a store whose assembly would otherwise read the object back to hash it (S3). A
                # local copy hashes what it writes in the same pass: asking the frontier first
                # would read everything twice.
                known = None
                if frontier is not None and in_place is None:
                    try:
                        known = frontier.finish(session.id, session.total_parts, keeping.check, 2 * frontier.lease)
                    except PieceCopyMissing as exc:  # the staged object is read back instead
                        log.warning("session %s: %s; the object is read back to hash it", session.id, exc.detail)
                    staged = self._finish_staged(session, sources, known, keeping)
                    if staged is not None:
                        return staged
                return self._storage.assemble(sources, key, self._block_size, keeping.progress, known_sha256=known)
            except ObjectMissing:
                pass
            finally:
                self._events.assembly_running(-1)
            return self._lost_parts(session.id, sources, keeping.check)

    def _finish_in_place(
        self, in_place: InPlace, session: SessionRow, sources: list[PartSource], keeping: _Keeping
    ) -> StoredObject:
        """Parts written in place (``UploadService._store_in_place``): the frontier's digest, carried
        to the end (for parts sent in order, only the last few are left to hash), then the
        session's file made the object, with any part stored apart copied into its range first.
        Nothing else is read or copied."""
        assert self._frontier is not None
        assembly = layout.assembly_key(session.id)
        # Waits for another worker's hold on the frontier, or for part writers still holding
        # ranges of the file: twice a killed holder's lease at most.
        wait = 2 * self._frontier.lease
        sha256 = self._frontier.finish(session.id, session.total_parts, keeping.check, wait)
        elsewhere, offset = [], 0
        for source in sources:
            if source.key != assembly:
                elsewhere.append(Placement(source.key, offset, source.size))
            offset += source.size
        keeping.check()
        in_place.finish(assembly, layout.object_key(session.id), session.size, elsewhere, wait)
        keeping.progress(session.size)
        return StoredObject(layout.object_key(session.id), session.size, sha256)

    def _finish_staged(
        self, session: SessionRow, sources: list[PartSource], sha256: str | None, keeping: _Keeping
    ) -> StoredObject | None:
        """The object staged while the parts arrived (``services.staging``), completed: what the
        frontier did not copy in yet is copied now (for parts sent in order, the last one or two).
        The frontier's digest stands for it, as for a compose: the store's own copy of the parts it
        hashed as stored; its size is checked. Without one (a piece's local copy was not on this
        host), the object is read back and hashed, as a compose's is. None: nothing staged, or
        lost; made from the parts."""
        if self._stager is None or not self._stager.applies(session.part_size, session.total_parts):
            return None
        try:
            size = self._stager.finish(session.id, sources, keeping.check)
        except ObjectMissing:
            # A piece is not in the staging: one begun after a killed completion had made the
            # object from the first (a frontier elsewhere found it gone), or pieces truly lost.
            made = self._made_already(session, sources, sha256, keeping)
            if made is None:
                raise
            return made
        if size is None:
            return self._made_already(session, sources, sha256, keeping)
        key = layout.object_key(session.id)
        if size != session.size:
            self._storage.delete([key])
            raise StorageError(f"assemble {key}: stored {size} bytes, expected {session.size}")
        keeping.progress(size)
        if sha256 is None:
            return self._read_back(key, keeping)
        return StoredObject(key, size, sha256)

    def _made_already(
        self, session: SessionRow, sources: list[PartSource], sha256: str | None, keeping: _Keeping
    ) -> StoredObject | None:
        """Where the staging is gone and parts were sent straight into it (so they cannot be
        composed), the object it became, if a completion killed before recording ``COMPLETED``
        finished it: read back, and taken only if its SHA-256 is the parts' (the frontier's, or
        else the client's). With neither (a local copy was not here, and the client declared no
        digest), taken at its size, with the SHA-256 it reads back as: only a completion of this
        session writes its key, and a staging is completed with the recorded pieces alone, each of
        which the store checked against its part's SHA-256. None otherwise: those parts are asked
        for again."""
        if not any(layout.piece_number(source.key) is not None for source in sources):
            return None  # made from the parts' own keys, which are all there
        expected = sha256 or session.sha256
        key = layout.object_key(session.id)
        if not self._storage.exists(key):
            return None
        stored = self._read_back(key, keeping)
        if stored.size != session.size or (expected is not None and stored.sha256 != expected):
            return None
        log.warning("session %s: its staging had already become the object; taken as read back", session.id)
        keeping.progress(stored.size)
        return stored

    def _read_back(self, key: str, keeping: _Keeping) -> StoredObject:
        """The object as stored, read and hashed (the next block read while the last is hashed)."""
        with self._storage.open(key) as stored:
            size, sha256 = hash_stream(cast(ReadsInto, stored), self._block_size, keeping.check, f"read back {key}")
        return StoredObject(key, size, sha256)

    def _lost_parts(self, session_id: UUID, sources: list[PartSource], check: Callable[[], None]) -> list[str]:
        """The keys of ``sources`` the storage positively reports missing.

        One listing of the session's parts prefix finds the candidates (the parts it does not
        list), each then confirmed missing with ``exists``: a request per lost part rather than one
        per part, and a key a listing failed to show (a store whose listings lag its writes) is
        not dropped for that. ``check`` raises once the lease is lost, so an assembler that was
        taken over stops looking.
        """
        pieces = [source for source in sources if layout.piece_number(source.key) is not None]
        lost = self._stager.lost_pieces(session_id, pieces) if pieces and self._stager is not None else []
        listed = set()
        for item in self._storage.list_keys(layout.parts_prefix(session_id)):
            check()
            listed.add(item.key)
        for source in sources:
            if layout.piece_number(source.key) is not None:
                continue  # sent straight into the staging: the staging says (above)
            if source.key not in listed:
                check()
                if not self._storage.exists(source.key):
                    lost.append(source.key)
        return lost

    def _record(
        self,
        conn: Connection,
        client_id: int,
        session: SessionRow,
        sources: list[PartSource],
        stored: StoredObject,
        lease: _Lease,
        assembly_seconds: float,
    ) -> SessionRow:
        """Verify the assembled object, record the outcome, then remove what is no longer needed.

        Each removal follows the commit that makes it safe: the parts (and a mismatched object)
        go only after COMPLETED (or FAILED) committed, so a lost commit reply leaves the session
        COMPLETING with its parts, and assembling again rebuilds the same object under the same
        key. An attempt whose outcome is refused (its lease was lost) removes nothing: the
        assembler that took over needs the parts, and the object under the key may be its own.
        """
        key = layout.object_key(session.id)
        if stored.size != session.size or (session.sha256 and stored.sha256 != session.sha256):
            with conn.transaction():
                failed = dao.mark_failed(conn, session.id, lease.owner)
                now = None if failed else self._lock_session(conn, session.id, client_id)
            if now is not None:
                return self._not_ours(now)
            self._events.session_failed(assembly_seconds)
            # A FAILED session cannot be resumed, so its object and parts are of no further use.
            discard(self._storage, [key])
            discard(self._storage, [source.key for source in sources])
            raise ChecksumMismatch(
                f"assembled {stored.size} bytes with SHA-256 {stored.sha256};"
                f" expected {session.size} bytes" + (f" with SHA-256 {session.sha256}" if session.sha256 else ""),
                expected_sha256=session.sha256,
                actual_sha256=stored.sha256,
            )
        with conn.transaction():
            outcome = dao.mark_completed(conn, session.id, lease.owner, key, stored.size, stored.sha256)
            now = outcome or self._lock_session(conn, session.id, client_id)
        if outcome is None:
            return self._not_ours(now)
        self._events.session_completed(assembly_seconds)
        # Parts written in place share one key (the file now linked as the object): named once.
        # The session's file goes too where no part row names it: a writer cut short, or one that
        # lost its range's part to another request, made it (the object has a link of its own).
        keys = [source.key for source in sources]
        if self._storage.in_place is not None:
            keys.append(layout.assembly_key(session.id))
        self._remove_parts(list(dict.fromkeys(keys)))
        return outcome

    def _remove_parts(self, keys: list[str]) -> None:
        """Remove a completed session's parts: here for a few, in the background for many, so
        that the client's 200 does not wait for them (10,000 parts on disk: about 1.5 s of
        unlinking, 80% of the request). Nothing needs them any more; if this process dies
        before they are gone, the reaper's purge of the ended session removes them."""
        if len(keys) <= INLINE_PART_REMOVAL:
            discard(self._storage, keys)
            return
        with self._held_lock:
            if self._remover is None or not self._remover.is_alive():
                self._remover = threading.Thread(target=self._remove_queued, name="part-remover", daemon=True)
                self._remover.start()
        self._removals.put(keys)

    def _remove_queued(self) -> None:
        while True:
            discard(self._storage, self._removals.get())

    @contextlib.contextmanager
    def _lease_keeper(self, conn: Connection, session_id: UUID, lease: _Lease) -> Iterator[_Keeping]:
        """The lease kept alive while the storage works (assembles, or looks for lost parts).

        The keeper's thread renews the lease about once a second on the assembler's own connection
        (idle while the storage works: autocommit, no transaction open), writing the latest
        progress with it. A thread, not the progress callback itself, because some storage
        reports no progress for long stretches (S3's server-side compose and the read-back that
        verifies it), and the lease must outlive them. The yielded ``_Keeping``'s ``progress`` (the
        storage's callback) notes the bytes; it and ``check`` stop the work (raising) once a
        renewal was refused (the lease is lost) or the connection broke. Storage that reports no
        progress runs to its end either way; its outcome is then refused if the lease was lost
        (the statements check the owner). The thread is joined when the block ends, before the
        connection records the outcome.
        """
        keeping = _Keeping()

        def renew() -> bool:
            return dao.renew_completion_lease(conn, session_id, lease.owner, self._lease_seconds, keeping.assembled)

        keeping.keeper = LeaseKeeper(
            renew,
            self._lease_seconds,
            min(PROGRESS_INTERVAL, self._lease_seconds / 3),
            taken_at=lease.taken_at,
            what=f"the completion of session {session_id}",
            # The connection, and so any outcome recorded on it, is gone: stop here.
            fatal=(DatabaseUnavailable,),
        )
        with keeping.keeper:
            yield keeping


class _Keeping:
    """An assembly's side of its ``LeaseKeeper``: the progress it reports, and the checks that
    stop it once the lease is lost."""

    def __init__(self) -> None:
        self.assembled = 0  # bytes of the object written so far, sent with each renewal
        self.keeper: LeaseKeeper | None = None

    def progress(self, count: int) -> None:
        """The storage's progress callback."""
        self.assembled = count
        self.check()

    def check(self) -> None:
        """Raise once the lease is lost (or its connection broke)."""
        assert self.keeper is not None
        if self.keeper.failure is not None:
            raise self.keeper.failure
        if self.keeper.lost:
            raise CompletionInProgress("this assembly lost its completion lease to another assembler")
