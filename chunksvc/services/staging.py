"""Objects staged while their parts arrive (``StagedObject``): on S3, so that completing copies
only the last part or two, not every part.

Why: on S3 the object is made by the store from the parts' own keys (one multipart upload of
server-side copies, UploadPartCopy). Done all at completion, that copy was most of a user's wait
after the last part (1 GiB on radosgw: about 5 s of an 8 s wait), and it grew with the file.

How: the hash frontier (``services.frontier``) already passes every part in order, one holder at a
time across workers and hosts, reading it back as stored. As it passes a part it also copies it in
(``Stager.run``), as the piece of the same number of the session's staging, a few copies at a time,
and records the token (ETag) the store answered. Completion (``Stager.finish``) copies in what is
left, checks every piece against what the store holds now, copies again any that differs, and
completes the staging as the object.

What can go wrong, and why it is safe:

- A holder killed mid-copy: its copies may still land later. A piece is only ever a copy of its
  part's recorded key; completion compares every piece with the store's listing and copies again
  any that differs, and the store refuses to complete with a token that is not the piece's own
  (S3's InvalidPart). So a late copy can make completion copy again, never complete other bytes.
- The staging lost: swept or aborted behind the service's back, or finished by a completion that
  was killed before it recorded ``COMPLETED``. Completion then makes the object from the parts
  the usual way (``Storage.assemble``); nothing was taken from them.
- A staging begun but never recorded (its holder killed in between): an unfinished upload no
  session names, which the reaper's sweep aborts after its grace. One recorded is left alone by
  the sweep until its session is purged, and abort and purge abandon it (``abandon``).

Staging never fails a part, the frontier or a completion: where it cannot go on, the frontier
carries on hashing, and completion makes the object from the parts.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Connection, Database
from chunksvc.errors import ChunksvcError, StagingLost
from chunksvc.rows import FrontierRow, PartRow
from chunksvc.services import layout
from chunksvc.storage import Storage
from chunksvc.storage.base import PartSource, StagedObject, StagedPiece

log = logging.getLogger(__name__)

# Copies in flight while the frontier passes parts: enough to keep pace with parts arriving (on
# radosgw one 8 MiB copy takes about 50 ms), few enough to leave the store room for the parts.
STAGE_PARALLEL = 4
# Copies at once at completion, where the user waits (the compose's figure, storage.s3).
FINISH_PARALLEL = 8
# Seconds between renewals of the frontier's lease while its holder waits for a copy.
RENEW_EVERY = 1.0


class Stager:
    def __init__(self, db: Database, staged: StagedObject) -> None:
        self._db = db
        self._staged = staged
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after gunicorn's fork

    def applies(self, part_size: int, total_parts: int) -> bool:
        return self._staged.fits(part_size, total_parts)

    @contextlib.contextmanager
    def run(
        self, conn: Connection, frontier: FrontierRow, owner: UUID, renew: Callable[[], None]
    ) -> Iterator[StagingRun]:
        """Copies in the parts the frontier's holder ``owner`` passes (``StagingRun.place``); on the
        way out, waits for the copies still in flight and records their tokens. ``renew`` pushes
        the frontier's lease on (it raises once the lease is lost)."""
        run = StagingRun(self._staged, self._executor(), conn, frontier, owner, renew)
        try:
            yield run
        finally:
            run.drain()

    def finish(self, session_id: UUID, sources: Sequence[PartSource], check: Callable[[], None]) -> int | None:
        """The session's staging completed as its object, with every part copied in that was not
        yet (or whose piece differs from the one recorded); the object's size as stored. None when
        there is no staging to complete, or it was lost: the caller makes the object from the parts.
        ``ObjectMissing`` if a part's key is gone. ``check`` raises once the completion's lease is lost."""
        key = layout.object_key(session_id)
        with self._db.connection() as conn:
            staged_id = dao.session_staging(conn, session_id)
            if staged_id is None:
                return None
            pieces = dao.staged_pieces(conn, session_id)
        if [PartSource(piece.storage_key, piece.size) for piece in pieces] != list(sources):
            return None  # not the session's own parts in order (a tus final upload's are its partials')
        try:
            held = self._staged.placed(key, staged_id)
            tokens = [piece.staged_token for piece in pieces]
            again = [
                piece
                for piece in pieces
                if piece.staged_token is None
                or held.get(piece.part_number) != StagedPiece(piece.size, piece.staged_token)
            ]
            check()
            with ThreadPoolExecutor(FINISH_PARALLEL, thread_name_prefix="stage-finish") as pool:
                placed = pool.map(
                    lambda piece: self._staged.place(key, staged_id, piece.part_number, piece.storage_key), again
                )
                for piece, token in zip(again, placed, strict=True):
                    tokens[piece.part_number - 1] = token
            check()
            complete = [token for token in tokens if token is not None]
            assert len(complete) == len(tokens)  # every piece without a token was just copied in
            return self._staged.finish(key, staged_id, complete)
        except StagingLost as exc:
            log.warning(
                "session %s: its staged object was lost (%s); made from the parts instead", session_id, exc.detail
            )
            with self._db.connection() as conn:
                dao.forget_staging(conn, session_id, staged_id)
            return None

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(STAGE_PARALLEL, thread_name_prefix="stage")
            return self._pool


class StagingRun:
    """One frontier holder's copies: begun at the first part it passes if the session has no
    staging yet, at most ``STAGE_PARALLEL`` in flight, each token recorded on the holder's own
    connection (from its thread) as its copy returns."""

    def __init__(
        self,
        staged: StagedObject,
        pool: ThreadPoolExecutor,
        conn: Connection,
        frontier: FrontierRow,
        owner: UUID,
        renew: Callable[[], None],
    ) -> None:
        self._staged = staged
        self._pool = pool
        self._conn = conn
        self._session_id = frontier.id
        self._key = layout.object_key(frontier.id)
        self._staged_id = frontier.staged_id
        self._owner = owner
        self._renew = renew
        self._active = True
        self._in_flight: collections.deque[tuple[PartRow, Future[str]]] = collections.deque()

    def place(self, part: PartRow) -> None:
        """Copy ``part`` (just hashed by the frontier, as stored) in as its piece, in the background."""
        if not self._active or (self._staged_id is None and not self._begin()):
            return
        assert self._staged_id is not None
        while len(self._in_flight) >= STAGE_PARALLEL and self._active:
            self._harvest()
        if self._active:
            future = self._pool.submit(
                self._staged.place, self._key, self._staged_id, part.part_number, part.storage_key
            )
            self._in_flight.append((part, future))

    def drain(self) -> None:
        while self._in_flight and self._active:
            self._harvest()
        self._in_flight.clear()  # given up: their copies land or not; completion checks every piece

    def _begin(self) -> bool:
        try:
            staged_id = self._staged.begin(self._key)
        except ChunksvcError as exc:
            return self._stop(f"could not begin staging: {exc.detail}")
        if not dao.begin_staging(self._conn, self._session_id, self._owner, staged_id):
            # The lease was lost, or the session ended meanwhile (an abort found no staging to drop).
            self._active = False
            with contextlib.suppress(ChunksvcError):
                self._staged.abandon(self._key, staged_id)
            return False
        self._staged_id = staged_id
        return True

    def _harvest(self) -> None:
        """Wait for the oldest copy in flight (renewing the lease meanwhile) and record its token."""
        part, future = self._in_flight.popleft()
        assert self._staged_id is not None
        while True:
            try:
                token = future.result(timeout=RENEW_EVERY)
                break
            except FutureTimeout:
                try:
                    self._renew()
                except ChunksvcError as exc:
                    self._stop(f"the frontier's lease was lost while a copy ran: {exc.detail}")
                    return
            except StagingLost as exc:
                dao.forget_staging(self._conn, self._session_id, self._staged_id)
                self._stop(f"its staging was lost ({exc.detail}); another is begun at the next part")
                return
            except ChunksvcError as exc:
                self._stop(f"part {part.part_number} not copied in: {exc.detail}")
                return
        dao.record_staged_piece(self._conn, self._session_id, self._staged_id, part.part_number, part.sha256, token)

    def _stop(self, why: str) -> bool:
        log.warning("session %s: staging stopped, completion copies the rest: %s", self._session_id, why)
        self._active = False
        return False


def abandon(db: Database, storage: Storage, session_id: UUID) -> None:
    """The ended session's staging, if any, dropped with its pieces (abort, purge). Raises
    ``ChunksvcError`` if the store could not: the reaper's sweep aborts it later."""
    staged = storage.staged
    if staged is None:
        return
    with db.connection() as conn:
        staged_id = dao.session_staging(conn, session_id)
    if staged_id is not None:
        staged.abandon(layout.object_key(session_id), staged_id)
