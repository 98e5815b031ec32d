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

Parts sent straight in (``Stager.take_piece``, ``Stager.write_piece``). Copying each part in
after storing it under its own key passes every byte through the store three times (PUT, the
frontier's read-back, UploadPartCopy: about 16 s of radosgw CPU per GiB, against 5 s for the one
UploadPart a direct upload sends). So where the part size allows, a part's request sends its body
once, as an UploadPart of the session's staging, from a local copy (``storage.spill``) it wrote
while hashing the body. The store checks the body against that SHA-256 (it is signed), so the
piece holds the bytes hashed; the hash frontier later reads the local copy, not the store.

- Piece numbers: part ``n`` of ``P`` owns the ``k = 10,000 // P`` numbers from ``(n-1)k + 1``.
  The ``a``-th request ever made for it (``take_piece`` counts them in the database) writes
  number ``(n-1)k + a``, for ``a < k``; number ``nk`` is where a copy of a part stored under a key
  of its own goes (as above). So no request ever writes a piece another may have written: a writer
  killed mid-request may still have its UploadPart land, and it lands on a number no record names.
  Completion names exactly one piece per part; S3 drops the others.
- The part's row points at ``layout.piece_key(session, number)``: not a stored key, the name of
  the piece. A part with more requests than numbers (``a >= k``), a retry of a recorded part, and
  sessions of more than 5,000 parts go the usual way (their own key, copied in as above).
- What can go wrong: the staging lost takes its pieces with it, so completion asks the client for
  those parts again (``parts_missing``), as for any part whose bytes are gone; a local copy missing
  (another host took the part) leaves the frontier behind, and completion then reads the finished
  object back to hash it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import BinaryIO
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Connection, Database
from chunksvc.errors import ChunksvcError, ObjectMissing, StagingLost, StorageUnavailable
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
# Pieces a staging holds at most (S3's limit on a multipart upload; ``StagedObject.fits`` checks a
# session against it), shared out among the parts (``pieces_per_part``).
MAX_PIECES = 10_000


def pieces_per_part(total_parts: int) -> int:
    """How many piece numbers each part of a session of ``total_parts`` owns."""
    return MAX_PIECES // total_parts


def copy_piece(part_number: int, total_parts: int) -> int:
    """The piece number a part stored under a key of its own is copied in as: its range's last."""
    return part_number * pieces_per_part(total_parts)


def sent_piece(part_number: int, attempt: int, total_parts: int) -> int | None:
    """The piece number the ``attempt``-th request for the part sends its body as; None when the
    part's range has no number left for it (it goes the usual way)."""
    per_part = pieces_per_part(total_parts)
    if attempt >= per_part:
        return None
    return (part_number - 1) * per_part + attempt


class Stager:
    def __init__(self, db: Database, staged: StagedObject) -> None:
        self._db = db
        self._staged = staged
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after gunicorn's fork

    def applies(self, part_size: int, total_parts: int) -> bool:
        return self._staged.fits(part_size, total_parts)

    def takes_parts(self, part_size: int, total_parts: int) -> bool:
        """Whether parts of such a session can be sent straight in (room for two numbers each)."""
        return self.applies(part_size, total_parts) and pieces_per_part(total_parts) >= 2

    def take_piece(self, session_id: UUID, part_number: int, total_parts: int) -> tuple[int, str] | None:
        """The piece number this request sends part ``part_number`` as, and the session's staging
        (begun here if it has none); None: the part goes the usual way (recorded already, no
        number left, or the session takes no parts)."""
        with self._db.connection() as conn:
            taken = dao.take_piece(conn, session_id, part_number)
        if taken is None:
            return None
        number = sent_piece(part_number, taken.attempts, total_parts)
        if number is None:
            return None
        staged_id = taken.staged_id or self._begin(session_id)
        return (number, staged_id) if staged_id is not None else None

    def write_piece(
        self, session_id: UUID, staged_id: str, number: int, source: BinaryIO, length: int, sha256: str
    ) -> str:
        """``StagedObject.write`` into the session's staging; if that is gone, it is forgotten (the
        next request begins another) and ``StorageUnavailable`` raised: the client sends it again."""
        try:
            return self._staged.write(layout.object_key(session_id), staged_id, number, source, length, sha256)
        except StagingLost as exc:
            with self._db.connection() as conn:
                dao.forget_staging(conn, session_id, staged_id)
            raise StorageUnavailable("the upload's staged object was lost; send the part again") from exc

    def lost_pieces(self, session_id: UUID, pieces: Sequence[PartSource]) -> list[str]:
        """Of ``pieces`` (parts sent straight in), the keys whose piece the staging does not hold
        with their size: every one if the staging is gone."""
        with self._db.connection() as conn:
            staged_id = dao.session_staging(conn, session_id)
        held: dict[int, StagedPiece] = {}
        if staged_id is not None:
            with contextlib.suppress(StagingLost):
                held = self._staged.placed(layout.object_key(session_id), staged_id)
        lost = []
        for piece in pieces:
            number = layout.piece_number(piece.key)
            found = held.get(number) if number is not None else None
            if found is None or found.size != piece.size:
                lost.append(piece.key)
        return lost

    def _begin(self, session_id: UUID) -> str | None:
        """A staging begun for the session by a part's request, or the one another began first."""
        key = layout.object_key(session_id)
        staged_id = self._staged.begin(key)
        with self._db.connection() as conn:
            if dao.begin_part_staging(conn, session_id, staged_id):
                return staged_id
            theirs = dao.session_staging(conn, session_id)
        with contextlib.suppress(ChunksvcError):
            self._staged.abandon(key, staged_id)
        return theirs

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
        total = len(pieces)
        try:
            held = self._staged.placed(key, staged_id)
            numbered: list[tuple[int, str | None]] = []
            again = []
            for piece in pieces:
                sent = layout.piece_number(piece.storage_key)
                if sent is not None:  # sent straight in: the store's piece is the part's only copy
                    found = held.get(sent)
                    if found is None or found.size != piece.size:
                        raise ObjectMissing(piece.storage_key, f"{key}: piece {sent} is not staged")
                    numbered.append((sent, found.token))
                    continue
                number = copy_piece(piece.part_number, total)
                if piece.staged_token is None or held.get(number) != StagedPiece(piece.size, piece.staged_token):
                    again.append((len(numbered), number, piece))
                numbered.append((number, piece.staged_token))
            check()
            with ThreadPoolExecutor(FINISH_PARALLEL, thread_name_prefix="stage-finish") as pool:
                placed = pool.map(lambda each: self._staged.place(key, staged_id, each[1], each[2].storage_key), again)
                for (index, number, _piece), token in zip(again, placed, strict=True):
                    numbered[index] = (number, token)
            check()
            complete = [(number, token) for number, token in numbered if token is not None]
            assert len(complete) == len(numbered)  # every piece without a token was just copied in
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
        self._total_parts = frontier.total_parts
        self._owner = owner
        self._renew = renew
        self._active = True
        self._in_flight: collections.deque[tuple[PartRow, Future[str]]] = collections.deque()

    def place(self, part: PartRow) -> None:
        """Copy ``part`` (just hashed by the frontier, as stored) in as its piece, in the background;
        a part sent straight in is there already."""
        if layout.piece_number(part.storage_key) is not None:
            return
        if not self._active or (self._staged_id is None and not self._begin()):
            return
        assert self._staged_id is not None
        while len(self._in_flight) >= STAGE_PARALLEL and self._active:
            self._harvest()
        if self._active:
            number = copy_piece(part.part_number, self._total_parts)
            future = self._pool.submit(self._staged.place, self._key, self._staged_id, number, part.storage_key)
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
