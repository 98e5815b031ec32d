"""Completing an upload: its parts assembled into the object, verified, and the outcome recorded.

Two entry points, one per caller:

- ``CompletionService.complete``: ``POST .../complete``. A session small enough is assembled in
  the request (``Completion.DONE``); a larger one is checked and moved to ``COMPLETING`` here,
  and assembled later by the background assembler (``Completion.BACKGROUND``); one that another
  request or assembler is assembling answers as it stands (``Completion.ELSEWHERE``).
- ``CompletionService.resume``: the background assembler and the reaper, for a completion
  already accepted (``COMPLETING``), whose assembler may have died.

Either way the assembly runs under the session's completion lock (``dao.completion_lock``), an
advisory lock on the assembling connection that dies with it, so one assembly runs at a time and
a crashed one is taken over from the start. Parts whose stored bytes are gone are dropped and the
session reopened for the client to send them again (``PartsMissing``), never failed.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
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
    SessionNotActive,
    SessionNotFound,
    StorageError,
)
from chunksvc.rows import SessionRow
from chunksvc.services import layout, rules, states
from chunksvc.services.auth import Client
from chunksvc.services.events import UploadEvents
from chunksvc.services.uploads import discard
from chunksvc.storage import PartSource, Storage

log = logging.getLogger(__name__)

MAX_MISSING_LISTED = 100
ASSEMBLY_SLOT_WAIT = 30.0  # seconds a completion waits for a free assembly slot, then 503
PROGRESS_INTERVAL = 1.0  # seconds between writes of an assembly's progress


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
    ) -> None:
        self._db = db
        self._storage = storage
        self._limits = limits
        self._block_size = block_size
        self._events = events or UploadEvents()
        # An assembly holds its pooled connection (and the completion lock on it) from start to
        # end: at most this many at once per process, so parts and reads keep connections.
        self._assembly_slots = threading.BoundedSemaphore(max_assemblies)
        self._sync_complete_max = sync_complete_max

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
            return session, Completion.ELSEWHERE

    def resume(self, session_id: UUID, client_id: int) -> SessionRow:
        """Drive an accepted completion to its end, as calling ``complete`` again would: one
        accepted for the background, or one whose assembler died (``CompletionInProgress`` while
        another assembler has it).

        For the background assembler and the reaper, so no client check. Only a session still
        ``COMPLETING`` is resumed (else ``SessionNotActive``: someone else finished it). If parts'
        bytes are gone the session is reopened without them (``PartsMissing``), as for the
        client's own complete.
        """
        with self._assembly_slot(), self._db.connection() as conn, contextlib.ExitStack() as lock:
            with conn.transaction():
                session = self._lock_session(conn, session_id, client_id)
                if session.effective_status != states.COMPLETING:
                    raise SessionNotActive(
                        f"the session is {session.effective_status}; there is no completion to resume"
                    )
                self._take_completion_lock(lock, conn, session_id)
                sources = self._sources(conn, session_id)
            return self._assemble_or_reopen(conn, client_id, session, sources)

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
        with self._assembly_slot(), self._db.connection() as conn, contextlib.ExitStack() as lock:
            with conn.transaction():
                session = self._lock_session(conn, session_id, client_id)
                if session.effective_status == states.COMPLETED:
                    return session
                accepted = session.effective_status == states.COMPLETING
                if not accepted:
                    self._check_completable(conn, session, sha256)
                self._take_completion_lock(lock, conn, session_id)
                if not accepted:
                    session = dao.mark_completing(conn, session_id, sha256)
                sources = self._sources(conn, session_id)
            return self._assemble_or_reopen(conn, client_id, session, sources)

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

    @staticmethod
    def _take_completion_lock(lock: contextlib.ExitStack, conn: Connection, session_id: UUID) -> None:
        """Taken under the session's row lock, held until ``lock`` is left (after the transaction
        and the assembly). A live assembler holds it: ``CompletionInProgress``. A ``COMPLETING``
        session whose lock is free lost its assembler, and this call drives it to the end."""
        if not lock.enter_context(dao.completion_lock(conn, session_id)):
            raise CompletionInProgress()

    @staticmethod
    def _sources(conn: Connection, session_id: UUID) -> list[PartSource]:
        return [PartSource(part.storage_key, part.size) for part in dao.part_sources(conn, session_id)]

    def _assemble_or_reopen(
        self, conn: Connection, client_id: int, session: SessionRow, sources: list[PartSource]
    ) -> SessionRow:
        # Whatever fails here (storage, database, this process) leaves the session COMPLETING
        # with every part row and part byte in place, and the completion lock dies with the
        # connection: calling complete again, or the reaper's re-drive, takes it up from the
        # start. Nothing is lost by starting over.
        try:
            return self._assemble(conn, client_id, session, sources)
        except ObjectMissing:
            raise self._reopen_lost_parts(conn, client_id, session, sources) from None

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
        self, conn: Connection, client_id: int, session: SessionRow, sources: list[PartSource]
    ) -> ChunksvcError:
        """Parts whose stored bytes are gone are dropped and the session reopened: the error to raise.

        Lost bytes are not the client's fault and it can repair them: the usual answer to
        ``parts_missing`` (re-send the listed parts, complete again) does. The caller holds the
        completion lock; the session's row lock orders this against everything else.
        """
        lost = [source.key for source in sources if not self._storage.exists(source.key)]
        if not lost:  # the storage said "missing", then "there": not a verdict to act on
            return StorageError("a part was briefly missing from storage during assembly; complete again")
        with conn.transaction():
            locked = dao.lock_session(conn, session.id, client_id)
            if locked is None or locked.status != states.COMPLETING:
                # Cannot happen while we hold the completion lock; say so rather than guess.
                raise CompletionInProgress("the session changed while its completion ran")
            reopened = dao.drop_lost_parts(conn, session.id, lost, self._limits.session_ttl)
            assert reopened is not None  # COMPLETING under the row lock just taken: it reopens
            missing = dao.missing_parts(conn, session.id, session.total_parts, MAX_MISSING_LISTED)
        self._events.session_reopened(len(lost))
        log.warning(
            "session %s: %d parts' stored bytes are missing; reopened for the client to re-send them",
            session.id,
            len(lost),
        )
        count = reopened.total_parts - reopened.received_parts
        return PartsMissing(
            f"{count} of {session.total_parts} parts are missing ({len(lost)} lost from storage; upload them again)",
            missing_parts=missing,
            missing_count=count,
        )

    def _assemble(self, conn: Connection, client_id: int, session: SessionRow, sources: list[PartSource]) -> SessionRow:
        """Assemble, verify, record the outcome, then remove what is no longer needed.

        Each removal follows the commit that makes it safe: the parts go only after COMPLETED
        (or FAILED) committed, so a lost commit reply leaves the session COMPLETING with its
        parts, and assembling again rebuilds the same object under the same key.
        """
        key = layout.object_key(session.id)
        started = time.monotonic()
        self._events.assembly_running(1)
        try:
            stored = self._storage.assemble(sources, key, self._block_size, self._progress_reporter(conn, session.id))
        finally:
            self._events.assembly_running(-1)
        assembly_seconds = time.monotonic() - started
        if stored.size != session.size or (session.sha256 and stored.sha256 != session.sha256):
            discard(self._storage, [key])
            with conn.transaction():
                dao.mark_failed(conn, session.id)
            self._events.session_failed(assembly_seconds)
            # A FAILED session cannot be resumed, so its parts are of no further use.
            discard(self._storage, [source.key for source in sources])
            raise ChecksumMismatch(
                f"assembled {stored.size} bytes with SHA-256 {stored.sha256};"
                f" expected {session.size} bytes" + (f" with SHA-256 {session.sha256}" if session.sha256 else ""),
                expected_sha256=session.sha256,
                actual_sha256=stored.sha256,
            )
        with conn.transaction():
            outcome = dao.mark_completed(conn, session.id, key, stored.size, stored.sha256)
            completed = outcome is not None
            if outcome is None:  # another caller finished first; report its outcome
                outcome = dao.get_session(conn, session.id, client_id)
        assert outcome is not None  # sessions are never deleted
        if completed:
            self._events.session_completed(assembly_seconds)
        discard(self._storage, [source.key for source in sources])
        return outcome

    @staticmethod
    def _progress_reporter(conn: Connection, session_id: UUID) -> Callable[[int], None]:
        """Writes ``assembled_bytes`` at most once a second, on the assembler's own connection
        (it is idle while the storage works: autocommit, the completion lock held on it)."""
        last = time.monotonic()

        def report(assembled: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                try:
                    dao.set_assembled_bytes(conn, session_id, assembled)
                except DatabaseUnavailable:
                    raise  # the connection, and the completion lock on it, are gone: stop here
                except ChunksvcError:  # progress is a courtesy: nothing else stops the assembly
                    log.debug("could not record the progress of session %s", session_id, exc_info=True)

        return report
