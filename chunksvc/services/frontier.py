"""The hash frontier: a session's whole-file SHA-256, carried on while its parts arrive.

Why: the object's SHA-256 needs every byte in order, and computing it only at completion made
the user wait, after the last part, for the whole file to be read and hashed again (1 GiB: about
0.6 s of CPU at this machine's 1.8 GB/s, more on a busy one). Parts usually arrive roughly in
order, so the prefix of recorded parts with no gap can be hashed as soon as it grows; completion
then hashes only what is left, which for a client sending in order is the last part or two.

How: after a part is recorded, its worker ``poke``s the session. A thread of that worker takes the
session's frontier lease (a row, ``take_frontier``: one holder at a time across all workers and
hosts), resumes the SHA-256 from the saved state (``chunksvc.hashstate``), hashes the next parts
in order as far as they are recorded, saving the state as it goes, and gives the lease back at
the first gap. A holder killed mid-hash leaves its last saved state; the lease runs out after
``lease`` seconds, and the next poke, or the completion, carries on from there. Nothing is lost
by a crash but the work since the last save.

What is hashed is the stored bytes: a part written in place is read back from the session's file
(``InPlace.read``; it was made durable before its row was recorded, and no one writes a range
once a row points at it), any other from its own key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import cast
from uuid import UUID

from chunksvc import dao, hashstate
from chunksvc.db import Connection, Database
from chunksvc.errors import ChunksvcError, CompletionInProgress, IncompleteBody, PieceCopyMissing, StorageError
from chunksvc.rows import FrontierRow, PartRow
from chunksvc.services import layout
from chunksvc.services.staging import Stager, StagingRun
from chunksvc.storage import Storage
from chunksvc.storage.base import Block, Readable, read_exact_blocks
from chunksvc.storage.spill import Spill

log = logging.getLogger(__name__)

FRONTIER_LEASE = 10.0  # seconds a killed holder's lease outlives its last save
SAVE_EVERY = 8 * 1024 * 1024  # bytes hashed between saved states (and lease renewals)
PARTS_PER_QUERY = 64
TAKE_POLL = 0.02  # seconds between tries while a completion waits for a live holder


class HashFrontier:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        block_size: int,
        lease: float = FRONTIER_LEASE,
        min_part: int = 0,
        stager: Stager | None = None,
        spill: Spill | None = None,
    ) -> None:
        self._db = db
        # Local copies of the parts sent straight into a staging: what is hashed for them.
        self._spill = spill
        # Where the store builds objects from stored keys (S3), each part passed is copied in too.
        self._stager = stager
        self._min_part = min_part
        self._storage = storage
        self._block_size = block_size
        self.lease = lease
        self._pending: set[UUID] = set()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[UUID] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # made on first use: after gunicorn's fork

    def applies(self, part_size: int) -> bool:
        """Whether sessions of this part size are hashed as their parts arrive (and, on storage
        that can, written in place): ``CHUNKSVC_IN_PLACE_MIN_PART`` and above; 0 is never."""
        return self._min_part > 0 and part_size >= self._min_part and self.resumable

    @property
    def resumable(self) -> bool:
        """Whether states can be saved here (else completion hashes everything itself)."""
        return hashstate.available()

    def poke(self, session_id: UUID) -> None:
        """A part of the session was recorded: carry its frontier on soon, in the background."""
        if not self.resumable:
            return
        with self._lock:
            if session_id in self._pending:
                return
            self._pending.add(session_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="hash-frontier", daemon=True)
                self._thread.start()
        self._jobs.put(session_id)

    def finish(self, session_id: UUID, total_parts: int, check: Callable[[], None], wait: float) -> str:
        """The whole-file SHA-256 (hex) once every part is recorded (a completion): the frontier
        carried to the end, waiting up to ``wait`` s for a live holder to give it back.
        ``check`` is called between parts (it raises once the completion's lease is lost)."""
        if not self.resumable:
            return self._hash_all(session_id, check)
        deadline = time.monotonic() + wait
        while True:
            outcome = self._advance(session_id, check)
            if outcome is not None:
                parts, digest = outcome
                if parts != total_parts:
                    # Every part was recorded when the completion began; one gone now was dropped.
                    raise StorageError(f"the hash frontier stopped at part {parts} of {total_parts}")
                return digest
            if time.monotonic() > deadline:
                raise CompletionInProgress("the session's hash frontier is held by another worker; complete again")
            time.sleep(TAKE_POLL)

    # --- internals --------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            session_id = self._jobs.get()
            with self._lock:
                self._pending.discard(session_id)
            try:
                outcome = self._advance(session_id, lambda: None)
                if outcome is not None and self._next_recorded(session_id, outcome[0]):
                    # A part recorded while this thread held the lease: its own poke found the
                    # lease taken. Looked for after giving the lease back, so none is missed.
                    self.poke(session_id)
            except ChunksvcError as exc:
                log.warning("session %s: hash frontier not carried on: %s", session_id, exc.detail)
            except Exception:
                log.exception("session %s: hash frontier failed", session_id)

    def _advance(self, session_id: UUID, check: Callable[[], None]) -> tuple[int, str] | None:
        """Hash the recorded parts past the frontier, in order, to the first gap; (parts hashed,
        digest so far), or None while another holder has the lease."""
        owner = uuid.uuid4()
        with self._db.connection() as conn:
            row = dao.take_frontier(conn, session_id, owner, self.lease)
            if row is None:
                return None
            try:
                sha = hashstate.ResumableSha256(row.frontier_state)
                parts, hashed, saved = row.frontier_parts, row.frontier_bytes, row.frontier_bytes
                passed: list[str] = []  # local copies hashed, removed once a saved state covers them
                # The state as of the last part passed whole: ``sha`` itself may hold some of the
                # next part's bytes when a renewal runs (a read that failed midway, then drain).
                passed_state = sha.state()

                def renew() -> None:  # the state as of the last part passed, saved again
                    self._save(conn, session_id, owner, parts, hashed, hashstate.ResumableSha256(passed_state))

                with self._staging(conn, row, owner, renew) as staging:
                    while parts < row.total_parts:
                        run = self._next_run(conn, session_id, parts)
                        if not run:
                            break
                        for part in run:
                            check()
                            if hashed != (part.part_number - 1) * row.part_size:
                                raise StorageError(
                                    f"hash frontier at byte {hashed}, part {part.part_number} is elsewhere"
                                )
                            before = sha.state()
                            try:
                                for block in self._read(session_id, part, hashed):
                                    sha.update(block)
                            except PieceCopyMissing:
                                # Not passable here (its copy is on another host, or not its bytes):
                                # what was passed before it is kept, as at a gap.
                                sha = hashstate.ResumableSha256(before)
                                if hashed != saved:
                                    self._save(conn, session_id, owner, parts, hashed, sha)
                                self._forget_copies(passed)
                                raise
                            parts, hashed = part.part_number, hashed + part.size
                            passed_state = sha.state()
                            if staging is not None:
                                staging.place(part)  # read back whole just now: copied in as stored
                            if layout.piece_number(part.storage_key) is not None:
                                passed.append(part.storage_key)
                            if hashed - saved >= SAVE_EVERY or parts == row.total_parts:
                                self._save(conn, session_id, owner, parts, hashed, sha)
                                saved = hashed
                                self._forget_copies(passed)
                if hashed != saved:
                    self._save(conn, session_id, owner, parts, hashed, sha)
                self._forget_copies(passed)
                return parts, sha.hexdigest()
            finally:
                dao.release_frontier(conn, session_id, owner)

    def _staging(
        self, conn: Connection, row: FrontierRow, owner: UUID, renew: Callable[[], None]
    ) -> AbstractContextManager[StagingRun | None]:
        """The stager's run for this holder, where the session's object can be staged; else none."""
        if self._stager is None or not self._stager.applies(row.part_size, row.total_parts):
            return contextlib.nullcontext()
        return self._stager.run(conn, row, owner, renew)

    def _save(
        self, conn: Connection, session_id: UUID, owner: UUID, parts: int, hashed: int, sha: hashstate.ResumableSha256
    ) -> None:
        if not dao.save_frontier(conn, session_id, owner, parts, hashed, sha.state(), self.lease):
            raise CompletionInProgress("the hash frontier's lease was lost to another worker")

    @staticmethod
    def _next_run(conn: Connection, session_id: UUID, parts: int) -> list[PartRow]:
        """The recorded parts right after the first ``parts``, up to the first gap."""
        run: list[PartRow] = []
        for part in dao.parts_from(conn, session_id, parts, PARTS_PER_QUERY):
            if part.part_number != parts + len(run) + 1:
                break
            run.append(part)
        return run

    def _next_recorded(self, session_id: UUID, parts: int) -> bool:
        """Whether the part right after the first ``parts`` is recorded (one row, not a run)."""
        with self._db.connection() as conn:
            following = dao.parts_from(conn, session_id, parts, 1)
        return bool(following) and following[0].part_number == parts + 1

    def _forget_copies(self, keys: list[str]) -> None:
        """The local copies of pieces a saved state has passed: never read again."""
        if self._spill is not None:
            for key in keys:
                self._spill.remove(key)
        keys.clear()

    def _read_copy(self, part: PartRow) -> Iterator[Block]:
        """A part sent straight into the staging, from its local copy, checked against the part's
        recorded SHA-256 (the store checked the piece against the same digest): so the bytes
        hashed are the piece's. ``PieceCopyMissing`` if the copy is not here, or not those bytes."""
        copy = self._spill.open(part.storage_key) if self._spill is not None else None
        if copy is None:
            raise PieceCopyMissing(f"part {part.part_number}: no local copy of {part.storage_key} on this host")
        check = hashlib.sha256()
        with copy:
            try:
                for block in read_exact_blocks(cast(Readable, copy), part.size, self._block_size):
                    check.update(block)
                    yield block
                longer = bool(copy.read(1))
            except (IncompleteBody, OSError) as exc:
                # Short (a crash after an unsynced rename) or unreadable: not the piece's bytes.
                short = f"part {part.part_number}: the local copy of {part.storage_key} is short"
                raise PieceCopyMissing(short) from exc
            if longer or check.hexdigest() != part.sha256:
                raise PieceCopyMissing(f"part {part.part_number}: the local copy of {part.storage_key} differs")

    def _read(self, session_id: UUID, part: PartRow, offset: int) -> Iterator[Block]:
        """The part's stored bytes; ``offset`` is where it starts in the whole file."""
        if layout.piece_number(part.storage_key) is not None:
            yield from self._read_copy(part)
            return
        in_place = self._storage.in_place
        if in_place is not None and part.storage_key == layout.assembly_key(session_id):
            yield from in_place.read(part.storage_key, offset, part.size, self._block_size)
            return
        with self._storage.open(part.storage_key) as source:
            remaining = part.size
            while remaining:
                block = source.read(min(self._block_size, remaining))
                if not block:
                    raise StorageError(f"part {part.part_number}: its stored bytes are {remaining} bytes short")
                remaining -= len(block)
                yield block

    def _hash_all(self, session_id: UUID, check: Callable[[], None]) -> str:
        """No resumable SHA-256 on this system: every part hashed here, in order."""
        sha = hashlib.sha256()
        with self._db.connection() as conn:
            parts = dao.part_sources(conn, session_id)
        offset = 0
        for part in parts:
            check()
            for block in self._read(session_id, part, offset):
                sha.update(block)
            offset += part.size
        return sha.hexdigest()
