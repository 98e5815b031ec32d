"""tus 1.0 (contract v1.2) on chunksvc sessions: a tus upload IS a session.

Creation goes through ``UploadService.create_session`` (owner, quotas, expiry, events, webhooks);
completion through ``CompletionService`` (the object assembled and verified, in the background
above ``sync_complete_max``); termination through ``UploadService.abort``. What tus adds:

- PATCH bodies of any length. The bytes that fill a part are stored and recorded as an ordinary
  part (``dao.record_part``, as a native PUT records it). Bytes that do not fill a part yet are
  stored as a piece of the upload's *incomplete part* (``tus_incomplete_parts``: a key of its own
  under the session's parts prefix, written once); the PATCH that fills the part reads its pieces
  back, stores them with its own bytes as the part and drops them. The offset is the bytes of the
  parts 1..n received without a gap plus the pieces'. Each piece of a body is spooled (memory,
  then a temporary file) before it is stored, so a body cut off midway still leaves what arrived:
  it becomes a piece.
- Checks in a fixed order before any write, as tusd's unrouted handler makes them.
- A PATCH body is stored under fresh keys, then recorded under the session's row lock only if the
  upload is still where it was when the body began (``lock_tus_state``): of two PATCHes at once,
  the second is a 409. No lock is held while bytes stream.
- ``Upload-Checksum`` (sha256, sha1) covers the whole body, so a PATCH that carries one records
  nothing until the body is in and verified: a mismatch (460) or a cut leaves the offset as it was.
- Concatenation: partial uploads are sessions marked hidden (``tus_partial``: not listed, no
  webhooks); a final upload is a session of its own whose object is assembled from its partials'
  parts in order (``part_sources``). It has all its bytes once every partial has all its parts
  (``mark_tus_final_ready``), and then completes as any session does. When the final ends, its
  partials are aborted with it (a trigger, migration 0011), so the reaper removes their leftovers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC
from email.utils import format_datetime
from typing import IO, Any
from uuid import UUID

from chunksvc import dao
from chunksvc.config import Limits
from chunksvc.db import Connection, Database
from chunksvc.errors import (
    ChunksvcError,
    DatabaseBusy,
    FinalUploadNotPatchable,
    IncompleteBody,
    InvalidRequest,
    LengthRequired,
    OffsetMismatch,
    PartConflict,
    SessionCompleted,
    SessionGone,
    SessionNotActive,
    SessionNotFound,
    StorageError,
    StorageUnavailable,
    UnsupportedMediaType,
    UploadChecksumMismatch,
    UploadTooLarge,
)
from chunksvc.rows import SessionRow, TusStateRow
from chunksvc.services import layout, rules, states
from chunksvc.services.assembler import BackgroundAssembler
from chunksvc.services.auth import Client
from chunksvc.services.completion import Completion, CompletionService
from chunksvc.services.events import UploadEvents
from chunksvc.services.streaming import PartBody
from chunksvc.services.uploads import PartTarget, UploadService, discard
from chunksvc.storage import Storage
from chunksvc.storage.base import Block, InPlace

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "creation-with-upload", "termination", "expiration", "checksum", "concatenation")
CHECKSUM_ALGORITHMS = ("sha256", "sha1")
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
DEFAULT_FILENAME = "upload"
# The pieces of PATCH bodies being received are held in memory, up to this many bytes in all per
# process (then in temporary files). A temporary file costs: 512 MiB in 8 MiB parts by
# tus-js-client took 5.9-6.2 s through files, 4.5 s in memory, tus-node-server 3.8-4.3 s at the
# same time on the same disk (a shared 2-core machine: the figures vary by half from hour to hour).
SPOOL_MEMORY = 256 * 1024 * 1024

ENDED = frozenset({states.ABORTED, states.EXPIRED, states.FAILED})
_DECIMAL = re.compile(r"[0-9]{1,19}")
_METADATA_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # a token (RFC 9110): no space or comma
_UPLOAD_ID = re.compile(r"(?:^|/)([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/?$")


# --- headers, as pure functions -------------------------------------------------------------


def parse_decimal(raw: str | None, name: str) -> int | None:
    """A tus header's non-negative integer (``Upload-Length``, ``Upload-Offset``); None when absent."""
    if raw is None:
        return None
    raw = raw.strip()
    if not _DECIMAL.fullmatch(raw):
        raise InvalidRequest(f"{name} must be a non-negative integer")
    return int(raw)


def parse_metadata(raw: str | None) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent).

    An empty header is no metadata (the tus spec asks for at least one pair, but tuspy sends an
    empty header when it has none). Values must be UTF-8 text: they become the session's fields.
    """
    pairs: dict[str, str] = {}
    if raw is None:
        return pairs
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, encoded = item.partition(" ")
        encoded = encoded.strip()
        if not _METADATA_KEY.fullmatch(key) or " " in encoded:
            raise InvalidRequest("Upload-Metadata must be comma-separated 'key base64value' pairs")
        if key in pairs:
            raise InvalidRequest(f"Upload-Metadata names {key} twice")
        try:
            pairs[key] = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"Upload-Metadata value of {key} is not base64-encoded UTF-8 text") from None
    return pairs


def encode_metadata(session: SessionRow) -> str:
    """An ``Upload-Metadata`` for a session that was not created with one (the native API's)."""
    fields = {"filename": session.filename, "filetype": session.content_type, **session.metadata}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in fields.items())


@dataclasses.dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name
    digest: bytes


def parse_checksum(raw: str | None) -> Checksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; an algorithm not offered is a 400."""
    if raw is None:
        return None
    algorithm, _, encoded = raw.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise InvalidRequest(f"Upload-Checksum algorithm must be one of {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise InvalidRequest("Upload-Checksum digest is not valid base64") from None
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise InvalidRequest(f"Upload-Checksum {algorithm} digest must be {hashlib.new(algorithm).digest_size} bytes")
    return Checksum(algorithm, digest)


@dataclasses.dataclass(frozen=True)
class Concat:
    kind: str  # none, partial, final
    partials: tuple[UUID, ...] = ()


def parse_concat(raw: str | None) -> Concat:
    """``Upload-Concat: partial`` or ``final;<url> <url> ...`` (URLs absolute or paths)."""
    if raw is None:
        return Concat("none")
    raw = raw.strip()
    if raw == "partial":
        return Concat("partial")
    kind, _, urls = raw.partition(";")
    if kind.strip() != "final":
        raise InvalidRequest("Upload-Concat must be 'partial' or 'final;<url> <url> ...'")
    partials = []
    for url in urls.split():
        match = _UPLOAD_ID.search(url.split("?", 1)[0])
        if match is None:
            raise InvalidRequest(f"Upload-Concat names {url!r}, which is no upload URL of this server")
        partials.append(UUID(match.group(1)))
    if not partials:
        raise InvalidRequest("Upload-Concat: final names no partial uploads")
    return Concat("final", tuple(partials))


def check_content_type(raw: str | None) -> None:
    if (raw or "").split(";")[0].strip().lower() != OFFSET_OCTET_STREAM:
        raise UnsupportedMediaType(f"Content-Type must be {OFFSET_OCTET_STREAM}")


def http_date(session: SessionRow) -> str:
    """``Upload-Expires``: the session's expiry as an RFC 9110 date."""
    return format_datetime(session.expires_at.astimezone(UTC), usegmt=True)


def offset_of(state: TusStateRow) -> int:
    """Upload-Offset: the bytes the upload holds, counted from its start without a gap."""
    if state.concat == "final":
        return state.received_bytes  # the partials' sum once they are all in (mark_tus_final_ready)
    if state.effective_status in (states.COMPLETING, states.COMPLETED):
        return state.size
    return state.contiguous_bytes + state.held_bytes


# --- the service ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TusUpload:
    """What HEAD (and POST's 201) answers about an upload."""

    state: TusStateRow
    offset: int
    metadata: str | None  # Upload-Metadata to answer, or None
    partials: tuple[UUID, ...]  # a final upload's, in order


@dataclasses.dataclass(frozen=True)
class _Step:
    """One piece of a PATCH body, stored under ``key``: a full part (with the pieces stored
    before it), or a piece of the part in the making, at ``start`` in it."""

    full: bool
    part_number: int
    start: int
    size: int
    key: str
    sha256: str  # a full part's (its name); "" for a piece


@dataclasses.dataclass(frozen=True)
class _Position:
    """Where an upload is, as ``lock_tus_state`` reads it: a PATCH records only from here."""

    parts: int
    held_keys: tuple[str, ...]

    @classmethod
    def of(cls, state: TusStateRow) -> _Position:
        return cls(state.contiguous_parts, tuple(state.held_keys))


class TusService:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        limits: Limits,
        block_size: int,
        uploads: UploadService,
        completion: CompletionService,
        assembler: BackgroundAssembler,
        events: UploadEvents | None = None,
    ) -> None:
        self._db = db
        self._storage = storage
        self._limits = limits
        self._block_size = block_size
        self._uploads = uploads
        self._completion = completion
        self._assembler = assembler
        self._events = events or UploadEvents()
        self._spool_memory = SpoolMemory(SPOOL_MEMORY)

    @property
    def max_size(self) -> int:
        return self._limits.max_upload_size

    # --- creation ---------------------------------------------------------------------------

    def check_creation(
        self,
        upload_length: str | None,
        defer_length: str | None,
        concat_header: str | None,
        metadata_header: str | None,
    ) -> tuple[int | None, Concat, dict[str, str]]:
        """POST's checks that need no database, in order."""
        concat = parse_concat(concat_header)
        if defer_length is not None:
            raise InvalidRequest("Upload-Defer-Length is not supported: send Upload-Length")
        length = parse_decimal(upload_length, "Upload-Length")
        if concat.kind == "final":
            if length is not None:
                raise InvalidRequest("a final upload takes its length from its partials: no Upload-Length")
        elif length is None:
            raise InvalidRequest("Upload-Length is required")
        elif length > self._limits.max_upload_size:
            raise UploadTooLarge(f"Upload-Length {length} is above Tus-Max-Size {self._limits.max_upload_size}")
        return length, concat, parse_metadata(metadata_header)

    def create(
        self,
        client: Client,
        length: int | None,
        concat: Concat,
        pairs: dict[str, str],
        metadata_header: str | None,
    ) -> SessionRow:
        """A new upload: a session created as ``POST /uploads/sessions`` creates one."""
        metadata = dict(pairs)
        filename = metadata.pop("filename", "") or DEFAULT_FILENAME
        filetype, content_type = metadata.pop("filetype", ""), metadata.pop("content_type", "")
        body: dict[str, Any] = {"filename": filename, "metadata": metadata}
        if filetype or content_type:
            body["content_type"] = filetype or content_type
        raw_metadata = metadata_header.strip() if metadata_header and metadata_header.strip() else None
        if concat.kind == "final":
            body["size"] = self._partials_size(client, concat.partials)
        else:
            body["size"] = length
        if body["size"] == 0:
            raise InvalidRequest("an upload of 0 bytes cannot be created: a session holds at least one byte")

        def within(conn: Connection, session: SessionRow) -> None:
            dao.insert_tus_upload(conn, session.id, raw_metadata, concat.kind)
            if concat.kind == "final":
                taken = dao.concatenate_tus_partials(conn, session.id, client.id, list(concat.partials))
                if len(taken) != len(concat.partials):
                    # Raised inside the creating transaction: nothing of the final is created.
                    raise SessionNotActive("a partial upload is already in another final upload, or has ended")

        session, _ = self._uploads.create_session(client, body, None, within=within)
        if concat.kind == "final":
            self._finish(client, session.id)
        return session

    def _partials_size(self, client: Client, partials: tuple[UUID, ...]) -> int:
        if len(set(partials)) != len(partials):
            raise InvalidRequest("Upload-Concat names a partial upload twice")
        total = 0
        with self._db.connection() as conn:
            for partial_id in partials:
                state = dao.tus_state(conn, partial_id, client.id)
                if state is None:
                    raise SessionNotFound(f"no partial upload {partial_id}")
                if state.concat != "partial":
                    raise InvalidRequest(f"upload {partial_id} was not created with Upload-Concat: partial")
                if state.effective_status in ENDED:
                    raise SessionGone(f"partial upload {partial_id} is {state.effective_status}")
                total += state.size
        return total

    # --- reading ----------------------------------------------------------------------------

    def state(self, client: Client, raw_id: str) -> TusStateRow:
        """The upload, or ``SessionNotFound`` (another client's, or none)."""
        session_id = rules.parse_session_id(raw_id)
        with self._db.connection() as conn:
            state = dao.tus_state(conn, session_id, client.id)
        if state is None:
            raise SessionNotFound()
        return state

    def head(self, client: Client, raw_id: str) -> TusUpload:
        state = self.state(client, raw_id)
        if state.effective_status in ENDED:
            raise SessionGone(f"the upload is {state.effective_status}")
        offset = offset_of(state)
        if state.effective_status in states.OPEN and (offset == state.size or state.concat == "final"):
            # All its bytes are in, but its completion did not run (it failed, or its PATCH's
            # worker died after the last commit): start it again now, and answer what it made.
            self._finish(client, state.id)
            state = self.state(client, raw_id)
        return self.describe(state)

    def describe(self, state: TusStateRow) -> TusUpload:
        partials: tuple[UUID, ...] = ()
        if state.concat == "final":
            with self._db.connection() as conn:
                partials = tuple(dao.tus_partials_of(conn, state.id))
        metadata = state.tus_metadata
        if not state.tus_created:
            metadata = encode_metadata(state)
        return TusUpload(state, offset_of(state), metadata, partials)

    # --- PATCH ------------------------------------------------------------------------------

    def check_patch(
        self,
        client: Client,
        raw_id: str,
        content_type: str | None,
        raw_offset: str | None,
        raw_length: str | None,
        checksum_header: str | None,
    ) -> tuple[TusStateRow, int, Checksum | None]:
        """PATCH's checks, in order, before a body byte is read: ``(state, length, checksum)``."""
        state = self.state(client, raw_id)
        status = state.effective_status
        if status in ENDED:
            raise SessionGone(f"the upload is {status}")
        if state.concat == "final":
            raise FinalUploadNotPatchable("a final upload's bytes are its partials'")
        if status == states.COMPLETED:
            raise SessionCompleted("the upload is complete")
        if status == states.COMPLETING:
            raise SessionNotActive("the upload has all its bytes and is being assembled")
        check_content_type(content_type)
        offset = parse_decimal(raw_offset, "Upload-Offset")
        if offset is None:
            raise InvalidRequest("Upload-Offset is required")
        current = offset_of(state)
        if offset != current:
            raise OffsetMismatch(f"Upload-Offset is {offset}, but the upload is at {current}", offset=current)
        if raw_length is None:
            raise LengthRequired("Content-Length is required for a PATCH")
        length = parse_decimal(raw_length, "Content-Length")
        assert length is not None
        if offset + length > state.size:
            raise UploadTooLarge(f"the body would take the upload past its Upload-Length {state.size}")
        return state, length, parse_checksum(checksum_header)

    def patch(self, client: Client, state: TusStateRow, length: int, body: PartBody, checksum: Checksum | None) -> int:
        """Append the body (checked by ``check_patch``); the new offset, once durable. When it
        reaches the upload's length the upload completes (or, a partial, its final may)."""
        try:
            offset = self._append(client, state, length, body, checksum)
        except (StorageError, StorageUnavailable):
            # A termination meanwhile removes the upload's bytes, those being written too: the
            # client is told the upload is gone, not that the storage failed.
            now = self.state(client, str(state.id))
            if now.effective_status in ENDED:
                raise SessionGone(f"the upload became {now.effective_status} during the PATCH") from None
            raise
        if offset == state.size:
            self._finish(client, state.id)
        return offset

    def _append(
        self, client: Client, state: TusStateRow, length: int, body: PartBody, checksum: Checksum | None
    ) -> int:
        part_number = state.contiguous_parts + 1
        held = list(zip(state.held_keys, state.held_sizes, strict=True))  # this part's pieces so far
        position = first_position = _Position.of(state)
        digest = hashlib.new(checksum.algorithm) if checksum else None
        pending: list[_Step] = []
        stored = offset_of(state)
        remaining = length
        cut: ChunksvcError | None = None
        # A partial's parts are its final's (part_sources): stored under keys of their own, and
        # hashed as they arrive only for an upload of its own.
        own_parts = state.concat != "partial"
        in_place = self._uploads.in_place_for(state.part_size) if own_parts else None
        while remaining > 0 and cut is None:
            part_size = rules.part_length(state.size, state.part_size, part_number)
            start = sum(size for _, size in held)
            want = min(part_size - start, remaining)
            if in_place is not None and checksum is None and not held and want == part_size:
                placed = self._place(in_place, client, state, part_number, part_size, body, position)
                if placed is not None:
                    step, cut = placed
                    if step is None:
                        break  # cut before a byte of the part arrived
                    remaining -= step.size
                    stored += step.size
                    if step.full:
                        part_number, held = part_number + 1, []
                        position = _Position(position.parts + 1, ())
                    continue
            with _Spool(self._spool_memory, want) as spool:
                cut = spool.fill(body, want, digest, self._block_size)
                remaining -= spool.size
                if not spool.size:
                    break
                key = layout.part_key(state.id)
                if start + spool.size == part_size:
                    # The part is full: its pieces read back, then these bytes, as one part.
                    step = _Step(True, part_number, 0, part_size, key, self._store(key, held, spool, part_size))
                else:
                    # Another piece: only its own bytes are written (never those before it).
                    self._store(key, [], spool, spool.size)
                    step = _Step(False, part_number, start, spool.size, key, "")
            if checksum is None:
                # No checksum to wait for: each piece is recorded as it is stored, so a body cut
                # off later keeps everything before the cut.
                self._record(client, state.id, position, [step])
                stored += spool.size
                if step.full and own_parts:
                    self._uploads.part_recorded(state.id, state.part_size)
            else:
                pending.append(step)
            if step.full:
                part_number, held = part_number + 1, []
                position = _Position(position.parts + 1, ())
            else:
                held.append((key, step.size))
                position = _Position(position.parts, (*position.held_keys, key))
        if checksum is not None:
            assert digest is not None
            if cut is None and digest.digest() != checksum.digest:
                cut = UploadChecksumMismatch(f"the body's {checksum.algorithm} differs from Upload-Checksum")
            if cut is not None:
                discard(self._storage, [step.key for step in pending])
                raise cut
            self._record(client, state.id, first_position, pending)
            stored += length
            if any(step.full for step in pending) and own_parts:
                self._uploads.part_recorded(state.id, state.part_size)
        if cut is not None:
            raise cut
        return stored

    def _place(
        self,
        in_place: InPlace,
        client: Client,
        state: TusStateRow,
        part_number: int,
        part_size: int,
        body: PartBody,
        position: _Position,
    ) -> tuple[_Step | None, ChunksvcError | None] | None:
        """A whole part of the body written where a native part goes (its range of the session's
        one file, ``UploadService.place_part``: received, hashed and written at once, nothing
        spooled), recorded at ``position`` while the range is held. Its step, and the cut if the
        body ended early: then what arrived of the part is kept as a piece of the part in the
        making, recorded (the step), as a spooled body's would be; no step if nothing did. None:
        nothing was read, and the part goes the spooled way (its range is held by another
        request, or it is recorded already)."""
        target = PartTarget(client, state.id, part_number, part_size, {}, state.part_size, state.size)
        kept: list[_Step] = []

        def record(key: str, sha256: str) -> None:
            step = _Step(True, part_number, 0, part_size, key, sha256)
            self._record(client, state.id, position, [step])
            kept.append(step)

        def keep_cut(blocks: Iterator[Block], arrived: int) -> None:
            key = layout.part_key(state.id)
            self._storage.write(key, _BlocksReader(blocks), arrived, self._block_size)
            step = _Step(False, part_number, 0, arrived, key, "")
            self._record(client, state.id, position, [step])
            kept.append(step)

        try:
            if not self._uploads.place_part(in_place, target, body, record, keep_cut):
                return None
        except IncompleteBody as exc:
            return (kept[0] if kept else None), exc
        return kept[0], None

    def _store(self, key: str, held: list[tuple[str, int]], spool: _Spool, size: int) -> str:
        """Store the ``held`` pieces' bytes (read back) and the spooled ones under ``key``; their
        SHA-256. On failure nothing is left under ``key`` (``Storage.write``)."""
        with contextlib.ExitStack() as stack:
            previous = [(stack.enter_context(self._storage.open(piece)), piece_size) for piece, piece_size in held]
            reader = _HashingChain(previous, spool)
            self._storage.write(key, reader, size, self._block_size)
        return reader.hexdigest()

    # Errors after which no row points at the new keys: they go at once (as in UploadService).
    _NOT_RECORDED = (
        OffsetMismatch,
        PartConflict,
        SessionNotFound,
        SessionNotActive,
        SessionGone,
        SessionCompleted,
        DatabaseBusy,
    )

    def _record(self, client: Client, session_id: UUID, position: _Position, steps: list[_Step]) -> None:
        """Record stored pieces in one transaction, under the session's row lock, if the upload
        is still at ``position``; then remove the pieces that full parts took up."""
        replaced: list[str] = []
        try:
            with self._db.transaction() as conn:
                now = dao.lock_tus_state(conn, session_id, client.id)
                if now is None:
                    raise SessionNotFound()
                if now.effective_status in ENDED:
                    raise SessionGone(f"the upload became {now.effective_status} during the PATCH")
                if not states.accepts_parts(now.effective_status):
                    raise SessionNotActive(f"the upload became {now.effective_status} during the PATCH")
                if _Position.of(now) != position:
                    raise OffsetMismatch("another request moved this upload on during the PATCH", offset=offset_of(now))
                for step in steps:
                    if step.full:
                        row = dao.record_part(
                            conn, session_id, client.id, step.part_number, step.size, step.sha256, step.key
                        )
                        if row is None or not row.inserted:
                            raise PartConflict(f"part {step.part_number} was already received")
                        replaced += dao.drop_tus_incomplete_parts(conn, session_id, step.part_number)
                    else:
                        dao.add_tus_incomplete_part(conn, session_id, step.part_number, step.start, step.size, step.key)
        except self._NOT_RECORDED:
            # A part written in place is in the session's file, under no key of its own: its
            # bytes are nobody's now, and the range's next writer overwrites them.
            discard(self._storage, [step.key for step in steps if step.key != layout.assembly_key(session_id)])
            raise
        except BaseException:
            log.warning("tus upload %s: unknown whether a PATCH's record committed; its bytes stay", session_id)
            raise
        for step in steps:
            if step.full:
                self._events.part_stored(created=True, size=step.size, healed=False)
        if replaced:
            discard(self._storage, replaced)

    # --- completion -------------------------------------------------------------------------

    def _finish(self, client: Client, session_id: UUID) -> None:
        """The upload has all its bytes: complete it as ``POST .../complete`` would (a final
        upload once all its partials are in). A failure here is logged, not answered: the bytes
        are durable, and the next HEAD tries again."""
        try:
            with self._db.transaction() as conn:
                state = dao.lock_tus_state(conn, session_id, client.id)
                if state is None or not states.accepts_parts(state.effective_status):
                    return
                if state.concat == "partial":
                    final_id = state.final_id  # read after this PATCH's commit: a final made meanwhile counts
                    if final_id is None:
                        return  # in no final yet: the final's creation finishes it
                    session_id = final_id
                    state = dao.lock_tus_state(conn, session_id, client.id)
                    if state is None or not states.accepts_parts(state.effective_status):
                        return
                if state.concat == "final" and not dao.mark_tus_final_ready(conn, session_id):
                    if state.received_parts < state.total_parts:
                        return  # a partial is still missing bytes
                elif state.concat != "final" and offset_of(state) != state.size:
                    return
            session, completion = self._completion.complete(client, str(session_id), None)
            if completion is Completion.BACKGROUND:
                self._assembler.submit(session.id, client.id)
        except ChunksvcError as exc:
            log.warning("tus upload %s: completion did not run now (%s): %s", session_id, exc.code, exc.detail)

    # --- termination ------------------------------------------------------------------------

    def terminate(self, client: Client, raw_id: str) -> None:
        state = self.state(client, raw_id)
        if state.effective_status in ENDED:
            raise SessionGone(f"the upload is {state.effective_status}")
        self._uploads.abort(client, raw_id)


class SpoolMemory:
    """The bytes of memory the spools of one process may hold together; past it, a spool's
    bytes go to a temporary file."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = min(wanted, self._free)
            self._free -= granted
            return granted

    def give_back(self, count: int) -> None:
        with self._lock:
            self._free += count


class _Spool:
    """A piece of a request body (``size`` bytes at most), held while it is stored: in memory
    as far as ``memory`` grants it, beyond that in a temporary file (removed on close)."""

    def __init__(self, memory: SpoolMemory, size: int) -> None:
        self._memory = memory
        self._granted = memory.take(size)
        # Closed (and its file removed) by __exit__: the spool is itself the context manager. A
        # max_size of 0 would mean "never roll over": nothing granted is a file from the start.
        self._file: IO[bytes] = (
            tempfile.SpooledTemporaryFile(max_size=self._granted)  # noqa: SIM115
            if self._granted
            else tempfile.TemporaryFile()  # noqa: SIM115
        )
        self.size = 0

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()
        self._memory.give_back(self._granted)

    def fill(self, body: PartBody, want: int, digest: Any, block_size: int) -> ChunksvcError | None:
        """Take up to ``want`` bytes of ``body``; the error that cut the body short, if one did
        (what arrived before it is kept)."""
        buffer = memoryview(bytearray(min(block_size, want)))
        while self.size < want:
            view = buffer[: min(len(buffer), want - self.size)]
            try:
                count = body.readinto(view)
            except IncompleteBody as exc:
                return exc
            except (OSError, ValueError) as exc:
                error = IncompleteBody("the request body could not be read to its end")
                error.__cause__ = exc
                return error
            if not count:
                return IncompleteBody(f"the request body ended {want - self.size} bytes early")
            self._file.write(view[:count])
            if digest is not None:
                digest.update(view[:count])
            self.size += count
        self._file.seek(0)
        return None

    def read(self, size: int) -> bytes:
        return self._file.read(size)

    def rewind(self) -> None:
        self._file.seek(0)


class _BlocksReader:
    """``read(n)`` over blocks read back (each valid until the next call, as ``Storage.write``
    takes them)."""

    def __init__(self, blocks: Iterator[Block]) -> None:
        self._blocks = blocks
        self._left = memoryview(b"")

    def read(self, size: int = -1, /) -> Block:
        if not self._left:
            self._left = memoryview(next(self._blocks, b""))
        take = len(self._left) if size < 0 else min(size, len(self._left))
        block, self._left = self._left[:take], self._left[take:]
        return block


class _HashingChain:
    """``read(n)`` over stored pieces (exactly each one's size of each) and then a spool,
    computing the SHA-256 of everything read (the part's name)."""

    def __init__(self, previous: Sequence[tuple[IO[bytes], int]], spool: _Spool) -> None:
        self._previous = previous
        self._left = [held for _, held in previous]
        self._spool = spool
        self._sha256 = hashlib.sha256()
        spool.rewind()

    def read(self, size: int = -1, /) -> bytes:
        block = b""
        for index, (reader, _) in enumerate(self._previous):
            if self._left[index] > 0:
                block = reader.read(min(size, self._left[index]) if size >= 0 else self._left[index])
                if not block:
                    raise IncompleteBody("a stored piece of the part in the making ended early")
                self._left[index] -= len(block)
                break
        else:
            block = self._spool.read(size)
        self._sha256.update(block)
        return block

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()
