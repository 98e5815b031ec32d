"""Storage in an S3 bucket (MinIO or compatible), through the ``minio`` SDK.

The only module that imports ``minio``: SDK and urllib3 exceptions are translated here into
``StorageError`` (the storage answered "no") and ``StorageUnavailable`` (it did not answer).
Messages name the endpoint and bucket, never the secret key.
"""

from __future__ import annotations

import contextlib
import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import BinaryIO, cast
from urllib.parse import quote, urlunsplit

import certifi
import urllib3
from minio import Minio
from minio import time as minio_time
from minio.commonconfig import ComposeSource
from minio.datatypes import ListMultipartUploadsResult, Part, Upload
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error, ServerError
from minio.helpers import DictType
from minio.signer import sign_v4_s3

from chunksvc.config import GiB, Limits, MiB, StorageSpec, TiB
from chunksvc.errors import ConfigError, ObjectMissing, StagingLost, StorageError, StorageFull, StorageUnavailable
from chunksvc.hashing import hash_stream
from chunksvc.storage.base import (
    Block,
    ListedKey,
    PartSource,
    Progress,
    Readable,
    StagedObject,
    StagedPiece,
    Storage,
    StoredObject,
    check_key,
    check_prefix,
    read_exact_blocks,
)

# Server-side part copies run at once by a compose (see S3Storage._compose).
_COMPOSE_PARALLEL = 8

# S3 (and MinIO) multipart rules.
MIN_PART_SIZE = 5 * MiB  # every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * TiB

# Server-side copies of parts up to 5 GiB answer only when done, hence the generous read timeout.
_TIMEOUT = urllib3.Timeout(connect=5.0, read=120.0)
# Connection failures and 5xx answers are retried a little. urllib3 does not retry a POST that
# may have reached the server; the SDK sends bodies as in-memory bytes, so replaying a PUT is safe.
_RETRIES = urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))

_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
# No room: MinIO's full drives (HTTP 507 Insufficient Storage), and radosgw's user or bucket quota
# (HTTP 403, code QuotaExceeded, no message). Both are the same StorageFull to the client.
_FULL = frozenset({"XMinioStorageFull", "QuotaExceeded"})
# A multipart upload that is gone (completed, aborted, swept), or a part that is not the one its
# ETag names (placed again since): the staged object is lost, its sources are not.
_STAGING_LOST = frozenset({"NoSuchUpload", "InvalidPart", "InvalidPartOrder"})
# ListParts answers this many parts a page (S3's most).
_LIST_PARTS_PAGE = 1000
_INSUFFICIENT_STORAGE = 507
# A request we send ourselves (a part's PUT, an abort) is signed just before it starts; S3 checks
# the expiry when the request arrives.
_SIGNED_URL_LIFETIME = timedelta(minutes=15)
_PIECE_BLOCK = 1 * MiB  # what a piece is streamed from its local copy in


def can_compose(sources: Sequence[PartSource]) -> bool:
    """Whether server-side compose can build the object (else we stream it through).

    Mirrors the copy parts ``Minio.compose_object`` issues: each source is one part, or
    several of 5 GiB plus a remainder when larger; every part but the very last must be at
    least 5 MiB, and there may be at most 10,000 parts.
    """
    if len(sources) == 1:
        return sources[0].size <= MAX_OBJECT_SIZE  # a plain server-side copy
    parts = 0
    for i, src in enumerate(sources):
        if src.size == 0:
            return False  # S3 refuses empty copy ranges
        parts += -(-src.size // MAX_PART_SIZE)
        remainder = src.size % MAX_PART_SIZE or MAX_PART_SIZE
        if i < len(sources) - 1 and remainder < MIN_PART_SIZE:
            return False
    return 0 < parts <= MAX_PARTS and sum(s.size for s in sources) <= MAX_OBJECT_SIZE


def part_size_for(length: int) -> int:
    """The multipart part size for ``length`` bytes: 5 MiB unless that needs over 10,000 parts.

    The SDK holds a part in memory (two while it reads the next), so memory use is bounded by
    this, not by ``length``: 5 MiB for anything up to ~48 GiB.
    """
    return max(MIN_PART_SIZE, -(-length // MAX_PARTS))


def list_multipart_uploads(
    client: Minio, bucket: str, prefix: str, key_marker: str | None, upload_id_marker: str | None
) -> ListMultipartUploadsResult:
    """One page of S3's ListMultipartUploads: the one call here that is not the SDK's public API.

    Why: minio 7.2 has no public method for it (only ``Minio._list_multipart_uploads``), and its
    public way to sign any request, ``get_presigned_url``, needs an object name, which this
    bucket-level request does not have (the abort that follows a listing is signed that way, so
    it needs no private call). setup.cfg keeps minio below 8; tests/test_storage_contract.py runs
    this against radosgw, so an SDK that renames or reshapes the call fails there first.
    """
    return client._list_multipart_uploads(
        bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=upload_id_marker
    )


def _http_client(timeout: urllib3.Timeout, retries: urllib3.Retry | bool) -> urllib3.PoolManager:
    # The SDK's own default, with our timeouts and retries instead of 5 minutes and 5 retries.
    return urllib3.PoolManager(
        timeout=timeout,
        retries=retries,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


@contextlib.contextmanager
def _boundary(action: str, where: str) -> Iterator[None]:
    """Translate SDK and urllib3 exceptions; anything else (e.g. a reader's) passes through."""
    try:
        yield
    except S3Error as exc:
        status = getattr(exc.response, "status", 0) or 0
        if exc.code in _MISSING:
            missing = exc.object_name or "(unnamed)"
            raise ObjectMissing(missing, f"{action}: {where} has no object {missing}") from exc
        if exc.code in _FULL or status == _INSUFFICIENT_STORAGE:
            # The client needs only the code; what the server said is in the log (the cause).
            raise StorageFull("the storage has no room left") from exc
        if exc.code in _STAGING_LOST:
            raise StagingLost(f"{action}: {where} answered {_answer(exc, status)}") from exc
        kind = StorageUnavailable if status >= 500 else StorageError
        raise kind(f"{action}: {where} answered {_answer(exc, status)}") from exc
    except ServerError as exc:
        if exc.status_code == _INSUFFICIENT_STORAGE:
            raise StorageFull("the storage has no room left") from exc
        kind = StorageUnavailable if exc.status_code >= 500 else StorageError
        raise kind(f"{action}: {where} answered HTTP {exc.status_code}") from exc
    except MinioException as exc:  # not an S3 answer at all (a proxy's error page, say)
        raise StorageError(f"{action}: unexpected answer from {where}") from exc
    except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out, retries exhausted
        raise StorageUnavailable(f"{action}: {where} is unreachable or failing ({type(exc).__name__})") from exc


def _answer(exc: S3Error, status: int) -> str:
    """``NoSuchBucket (HTTP 404): The specified bucket does not exist``; radosgw leaves most
    messages empty, so the code and the status are what is always there."""
    answer = f"{exc.code or 'an error'} (HTTP {status})"
    return f"{answer}: {exc.message}" if exc.message else answer


class _ChunkStream:
    """A ``read(size)`` file over an iterator of blocks, for ``put_object``.

    Records the exception the blocks raised, so ``write`` can tell the reader's failures from
    the storage's.
    """

    def __init__(self, blocks: Iterator[Block]) -> None:
        self._blocks = blocks
        self._pending = memoryview(b"")
        self.error: BaseException | None = None

    def read(self, size: int) -> bytes:
        # The SDK builds each part with ``part += read()``, which copies; answering with the
        # whole part at once (BytesIO.getvalue() does not copy) keeps one copy of it, not two.
        buffer = io.BytesIO()
        while buffer.tell() < size:
            if not self._pending:
                try:
                    self._pending = memoryview(next(self._blocks))
                except StopIteration:
                    break
                except BaseException as exc:
                    self.error = exc
                    raise
            take = min(size - buffer.tell(), len(self._pending))
            buffer.write(self._pending[:take])
            self._pending = self._pending[take:]
        return buffer.getvalue()

    def close(self) -> None:
        # Finishes the generator now, releasing any response it has open.
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()


class _RecordingBlocks:
    """An iterable request body over ``blocks`` that keeps the exception they raised, so that a
    reader's failure is told apart from the storage's (urllib3 wraps what a body raises)."""

    def __init__(self, blocks: Iterator[Block]) -> None:
        self._blocks = blocks
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[Block]:
        try:
            yield from self._blocks
        except BaseException as exc:
            self.error = exc
            raise


def _error_from(response: urllib3.BaseHTTPResponse) -> MinioException:
    """The SDK's exception for an S3 error answer (or for a non-S3 one, such as a proxy's)."""
    try:
        return S3Error.fromxml(response)
    except (ET.ParseError, UnicodeDecodeError):
        return ServerError(f"HTTP {response.status}", response.status)


class _ObjectReader(io.RawIOBase):
    """A stored object being read: wraps the urllib3 response and releases it on close."""

    def __init__(self, response: urllib3.BaseHTTPResponse, action: str, where: str) -> None:
        super().__init__()
        self._response = response
        #: The object's size as the server announced it (urllib3 enforces it while reading).
        self.length = int(response.headers.get("Content-Length", -1))
        self._action = action
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with _boundary(self._action, self._where):
            return self._response.read(None if size is None or size < 0 else size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        with _boundary(self._action, self._where):
            return self._response.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            # close() drops a connection that may have unread body; release_conn() frees its slot.
            self._response.close()
            self._response.release_conn()
        super().close()


class S3Storage(Storage):
    #: Larger writes go up as a multipart upload; a single PUT carries at most 5 GiB.
    max_single_put = MAX_PART_SIZE

    def __init__(self, spec: StorageSpec) -> None:
        if spec.kind != "s3" or not (spec.endpoint and spec.bucket and spec.access_key and spec.secret_key):
            raise ConfigError("S3 storage needs an endpoint, a bucket, an access key and a secret key")
        self._spec = spec
        self._bucket = spec.bucket
        self._where = f"{spec.endpoint}/{spec.bucket}"
        self._http = _http_client(_TIMEOUT, _RETRIES)
        try:
            self._client = self._make_client(self._http)
        except ValueError as exc:  # a malformed endpoint; the message holds no credentials
            raise ConfigError(f"S3 storage {spec.redacted()}: {exc}") from None
        self._staged = _StagedMultipart(self)

    def __repr__(self) -> str:
        return f"S3Storage({self._spec.redacted()!r})"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def staged(self) -> StagedObject:
        return self._staged

    def validate_limits(self, limits: Limits) -> None:
        problems = []
        if limits.max_parts > MAX_PARTS:
            problems.append(
                f"CHUNKSVC_MAX_PARTS is {limits.max_parts}, but S3/MinIO multipart uploads and"
                f" compose allow at most {MAX_PARTS} parts"
            )
        if limits.max_upload_size > MAX_OBJECT_SIZE:
            problems.append(
                f"CHUNKSVC_MAX_UPLOAD_SIZE is {limits.max_upload_size}, but an S3 object holds"
                f" at most {MAX_OBJECT_SIZE} bytes (5 TiB)"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def write(self, key: str, reader: Readable, length: int, block_size: int) -> None:
        check_key(key)
        blocks = read_exact_blocks(reader, length, block_size)
        if length > self.max_single_put:
            self._put(key, blocks, length, f"write {key}")
        else:
            self._stream_put(key, blocks, length, f"write {key}")

    def assemble(
        self,
        sources: Sequence[PartSource],
        key: str,
        block_size: int,
        progress: Progress | None = None,
        known_sha256: str | None = None,
    ) -> StoredObject:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        check_key(key)
        for src in sources:
            check_key(src.key)
        total = sum(src.size for src in sources)
        if can_compose(sources):
            self._compose(sources, key)  # server-side: no progress to see until it is done
        else:
            self._put(key, self._source_blocks(sources, key, block_size, progress), total, f"assemble {key}")
        if progress:
            progress(total)
        # A compose is the store's own copy of the parts the caller hashed as stored: their digest
        # stands for it, and only its size is checked. A streamed upload is read back.
        if known_sha256 is not None and can_compose(sources):
            stored = StoredObject(key, self._size(key), known_sha256)
        else:
            stored = self._digest(key, block_size)
        expected = sum(src.size for src in sources)
        if stored.size != expected:
            self.delete([key])
            raise StorageError(f"assemble {key}: stored {stored.size} bytes, expected {expected}")
        return stored

    def open(self, key: str) -> BinaryIO:
        action = f"read {key}"
        with _boundary(action, self._where):
            response = self._client.get_object(self._bucket, check_key(key))
        return cast(BinaryIO, _ObjectReader(response, action, self._where))

    def exists(self, key: str) -> bool:
        with _boundary(f"stat {key}", self._where):
            try:
                self._client.stat_object(self._bucket, check_key(key))
            except S3Error as exc:
                if exc.code in _MISSING:
                    return False
                raise
        return True

    def _size(self, key: str) -> int:
        """The stored object's size (a stat: no ETag is relied on, radosgw may leave it empty)."""
        with _boundary(f"stat {key}", self._where):
            size = self._client.stat_object(self._bucket, key).size
        if size is None:
            raise StorageError(f"stat {key}: the store gave no size")
        return int(size)

    def delete(self, keys: Iterable[str]) -> None:
        self._remove([check_key(key) for key in keys])

    def delete_prefix(self, prefix: str) -> int:
        if not prefix.endswith("/") or not check_prefix(prefix):
            raise ValueError(f"delete_prefix needs a non-empty prefix ending with '/', got {prefix!r}")
        names = [listed.key for listed in self.list_keys(prefix)]
        self._remove(names)
        return len(names)

    def list_keys(self, prefix: str) -> Iterator[ListedKey]:
        check_prefix(prefix)
        with _boundary(f"list {prefix}", self._where):
            for obj in self._client.list_objects(self._bucket, prefix=prefix, recursive=True):
                yield ListedKey(cast(str, obj.object_name), cast(datetime, obj.last_modified))

    def sweep_incomplete(
        self,
        prefixes: Sequence[str],
        older_than: datetime,
        dry_run: bool = False,
        found: Callable[[str], None] | None = None,
        keep: Collection[str] = (),
    ) -> int:
        """Abort the multipart uploads under ``prefixes`` initiated before ``older_than``, but for
        the upload ids in ``keep`` (objects still being staged); one anywhere else in the bucket
        is not the caller's to abort.

        A live upload that is aborted fails at its next request, so nothing is stored half-done.
        """
        count = 0
        for prefix in map(check_prefix, prefixes):
            for upload in self._multipart_uploads(prefix):
                if upload.initiated_time is None or upload.initiated_time >= older_than or upload.upload_id in keep:
                    continue
                if dry_run or self._abort_upload(upload.object_name, cast(str, upload.upload_id)):
                    count += 1
                    if found is not None:
                        found(f"{upload.object_name} (multipart upload {upload.upload_id})")
        return count

    def check(self, timeout: float) -> None:
        # A separate client: one attempt, bounded by ``timeout`` overall.
        http = _http_client(urllib3.Timeout(total=timeout), retries=False)
        try:
            found = self._make_client(http).bucket_exists(self._bucket)
        except S3Error as exc:
            # It answered, and said no: wrong keys (SignatureDoesNotMatch, InvalidAccessKeyId),
            # no permission. moto accepts any keys; a real server refuses them here.
            status = getattr(exc.response, "status", 0) or 0
            raise StorageUnavailable(
                f"S3 storage {self._where} refused the check of its bucket: {_answer(exc, status)}"
            ) from exc
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise StorageUnavailable(
                f"S3 storage {self._where} did not answer within {timeout}s ({type(exc).__name__})"
            ) from exc
        finally:
            http.clear()
        if not found:
            raise StorageUnavailable(f"bucket {self._bucket!r} does not exist at {self._spec.endpoint}")

    def close(self) -> None:
        self._http.clear()

    # --- internals --------------------------------------------------------------------------

    def _make_client(self, http: urllib3.PoolManager) -> Minio:
        spec = self._spec
        return Minio(
            cast(str, spec.endpoint),
            access_key=spec.access_key,
            secret_key=spec.secret_key,
            secure=spec.secure,
            region=spec.region,
            http_client=http,
        )

    def _put(self, key: str, blocks: Iterator[Block], length: int, action: str) -> None:
        """Upload exactly ``length`` bytes from ``blocks``: one PUT, or multipart in bounded memory.

        On failure the SDK aborts its multipart upload (minio 7.2 does so for any ``Exception``)
        and re-raises, so nothing is left under ``key``.
        """
        body = _ChunkStream(blocks)
        try:
            with _boundary(action, self._where):
                self._client.put_object(
                    self._bucket,
                    key,
                    cast(BinaryIO, body),
                    length,
                    part_size=part_size_for(length),
                    num_parallel_uploads=1,  # parallel uploads would hold several parts in memory
                )
        except (StorageError, StorageUnavailable, StorageFull) as exc:
            if body.error is None or body.error is exc:
                raise
            if exc.__cause__ is not body.error:
                # Reading failed, then aborting the multipart upload failed too: the read error
                # is what happened (a bucket lifecycle rule has to reap the abandoned upload).
                body.error.add_note(f"aborting the partial upload of {key} also failed: {exc}")
            raise body.error from None
        finally:
            body.close()

    def _stream_put(self, key: str, blocks: Iterator[Block], length: int, action: str) -> None:
        """Upload exactly ``length`` bytes in one PUT, sending each block as it arrives.

        ``put_object`` would hold a whole SDK part in memory and, over plain http, hash it once
        more to sign it: the payload's SHA-256 goes in the signature, so it must be known before
        the first byte is sent. A presigned URL (the SDK signs it; no network call) signs an
        UNSIGNED-PAYLOAD instead, so the body streams through in fixed memory and is hashed once,
        by the service. Integrity does not rest on that signature: completion reads the stored
        object back and checks its size and SHA-256. A body that fails midway aborts the PUT, and
        S3 stores nothing for it. A streamed body cannot be replayed, so this PUT is not retried.
        """
        body = _RecordingBlocks(blocks)
        try:
            with _boundary(action, self._where):
                url = self._client.presigned_put_object(self._bucket, key, expires=_SIGNED_URL_LIFETIME)
                response = self._http.urlopen(
                    "PUT", url, body=iter(body), headers={"Content-Length": str(length)}, retries=False, redirect=False
                )
                if response.status >= 300:
                    raise _error_from(response)
        except (StorageError, StorageUnavailable, StorageFull) as exc:
            if body.error is None or body.error is exc:
                raise
            raise body.error from None

    def _compose(self, sources: Sequence[PartSource], key: str) -> None:
        """The object made by the store from the parts (UploadPartCopy), ``_COMPOSE_PARALLEL`` copies
        at a time: the SDK's ``compose_object`` looks up and copies one part after another, and a
        real server copies several at once far faster (1 GiB of 8 MiB parts on radosgw: 13.1 s one
        by one, 4.5 s eight at a time). Each part's size is checked first: one that is not the size
        recorded would shift everything after it."""
        if len(sources) == 1 or any(src.size > MAX_PART_SIZE for src in sources):
            self._sdk_compose(sources, key)  # a plain copy, or parts the SDK splits into ranges
            return
        action = f"assemble {key}"
        with ThreadPoolExecutor(_COMPOSE_PARALLEL, thread_name_prefix="compose") as pool:
            for src, size in zip(sources, pool.map(self._size, [src.key for src in sources]), strict=True):
                if size != src.size:
                    raise StorageError(f"{action}: part {src.key} has {size} bytes, expected {src.size}")
            staging = self._staged.begin(key)
            try:
                tokens = list(
                    pool.map(
                        lambda numbered: self._staged.place(key, staging, *numbered),
                        enumerate([src.key for src in sources], 1),
                    )
                )
                self._staged.finish(key, staging, list(enumerate(tokens, 1)))
            except BaseException:
                with contextlib.suppress(StorageError, StorageUnavailable):  # the first failure is the one
                    self._staged.abandon(key, staging)
                raise

    def _sdk_compose(self, sources: Sequence[PartSource], key: str) -> None:
        compose = [ComposeSource(self._bucket, src.key) for src in sources]
        with _boundary(f"assemble {key}", self._where):
            try:
                self._client.compose_object(self._bucket, key, compose)
            except ValueError as exc:  # the SDK found a part too small to compose after all
                raise StorageError(f"assemble {key}: {exc}") from exc
        # The SDK looked up each source's size; a part that is not the size we were told about
        # would shift everything after it.
        for src, used in zip(sources, compose, strict=True):
            if used.object_size != src.size:
                self.delete([key])
                raise StorageError(f"assemble {key}: part {src.key} has {used.object_size} bytes, expected {src.size}")

    def _source_blocks(
        self, sources: Sequence[PartSource], key: str, block_size: int, progress: Progress | None = None
    ) -> Iterator[bytes]:
        """The parts' bytes in order, ``block_size`` at a time, one open response at a time."""
        done = 0
        for src in sources:
            with self.open(src.key) as part:
                # Checked up front: once the last byte is read the SDK stops asking, so a part
                # longer than declared would otherwise go unnoticed.
                stored = cast(_ObjectReader, part).length
                if stored != src.size:
                    raise StorageError(f"assemble {key}: part {src.key} has {stored} bytes, expected {src.size}")
                while block := part.read(block_size):
                    yield block
                    done += len(block)
                    if progress:
                        progress(done)

    def _digest(self, key: str, block_size: int) -> StoredObject:
        """Size and SHA-256 of the object as stored, by reading it back, the next block fetched
        while the last is hashed (``chunksvc.hashing``): about as long as the slower of network
        and hash, not their sum, and a few blocks of memory whatever the size."""
        with self.open(key) as stored:
            size, sha256 = hash_stream(cast(_ObjectReader, stored), block_size, name=f"read back {key}")
        return StoredObject(key, size, sha256)

    def _multipart_uploads(self, prefix: str) -> Iterator[Upload]:
        """Every unfinished multipart upload under ``prefix``, a page at a time."""
        key_marker: str | None = None
        upload_id_marker: str | None = None
        while True:
            with _boundary(f"list unfinished uploads under {prefix}", self._where):
                page = list_multipart_uploads(self._client, self._bucket, prefix, key_marker, upload_id_marker)
            yield from page.uploads
            if not page.is_truncated or not page.uploads:
                return
            # minio 7.2 does not parse NextUploadIdMarker; the last upload listed is that marker.
            last = page.uploads[-1]
            key_marker, upload_id_marker = last.object_name, last.upload_id

    def _abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; False if it was already gone (finished or aborted meanwhile).

        AbortMultipartUpload has no public SDK method; the SDK signs it (a presigned DELETE with
        the upload id, no network call) and it is sent like a part's PUT (see ``_stream_put``).
        """
        with _boundary(f"abort unfinished upload of {key}", self._where):
            url = self._client.get_presigned_url(
                "DELETE", self._bucket, key, expires=_SIGNED_URL_LIFETIME, extra_query_params={"uploadId": upload_id}
            )
            response = self._http.urlopen("DELETE", url, redirect=False)
            if response.status >= 300:
                error = _error_from(response)
                if isinstance(error, S3Error) and error.code == "NoSuchUpload":
                    return False
                raise error
        return True

    def _remove(self, names: list[str]) -> None:
        if not names:
            return
        with _boundary(f"delete {len(names)} objects", self._where):
            # The SDK deletes lazily, batch by batch, as its error iterator is consumed.
            errors = self._client.remove_objects(self._bucket, (DeleteObject(name) for name in names))
            failures = [error for error in errors if error.code not in _MISSING]
        if failures:
            first = failures[0]
            raise StorageError(f"delete: {len(failures)} objects not deleted, e.g. {first.name}: {first.code}")


class _StagedMultipart(StagedObject):
    """A staged object as one multipart upload under the object's key, its parts server-side
    copies of stored keys (UploadPartCopy): ``begin`` creates it, ``place`` copies a part in,
    ``finish`` completes it with the ETags ``place`` returned (S3 refuses an ETag that is not the
    part's now, InvalidPart), ``abandon`` aborts it. The SDK's own multipart calls, not its public
    API (``compose_object`` uses them; minio is pinned below 8, and the storage contract runs
    them against radosgw)."""

    def __init__(self, storage: S3Storage) -> None:
        self._storage = storage

    def fits(self, piece_size: int, pieces: int) -> bool:
        return MIN_PART_SIZE <= piece_size <= MAX_PART_SIZE and 1 <= pieces <= MAX_PARTS

    def begin(self, key: str) -> str:
        storage = self._storage
        with _boundary(f"stage {check_key(key)}", storage._where):
            return storage._client._create_multipart_upload(storage._bucket, key, {})

    def place(self, key: str, staging: str, number: int, source: str) -> str:
        storage = self._storage
        copy_source = quote(f"/{storage._bucket}/{check_key(source)}")
        try:
            with _boundary(f"stage {check_key(key)} part {number}", storage._where):
                etag, _ = storage._client._upload_part_copy(
                    storage._bucket, key, staging, number, {"x-amz-copy-source": copy_source}
                )
        except ObjectMissing as exc:  # the server names the object the request was for, not its source
            raise ObjectMissing(source, f"stage {key} part {number}: no object {source}") from exc
        return etag

    def placed(self, key: str, staging: str) -> dict[int, StagedPiece]:
        storage = self._storage
        pieces: dict[int, StagedPiece] = {}
        marker: str | None = None
        while True:
            action = f"list the staged parts of {check_key(key)}"
            try:
                with _boundary(action, storage._where):
                    page = storage._client._list_parts(
                        storage._bucket, key, staging, max_parts=_LIST_PARTS_PAGE, part_number_marker=marker
                    )
            except ObjectMissing as exc:  # radosgw 16 answers NoSuchKey, not NoSuchUpload, for a gone upload
                raise StagingLost(f"{action}: {storage._where} has no multipart upload {staging}") from exc
            for part in page.parts:
                pieces[part.part_number] = StagedPiece(part.size if part.size is not None else -1, part.etag)
            if not page.is_truncated or not page.parts:
                return pieces
            marker = page.next_part_number_marker or str(page.parts[-1].part_number)

    def write(self, key: str, staging: str, number: int, source: BinaryIO, length: int, sha256: str) -> str:
        """One UploadPart, streamed from ``source`` in fixed blocks, signed with the payload's
        SHA-256 (SigV4 ``x-amz-content-sha256``): the server hashes what it receives and refuses
        a body that differs (``XAmzContentSHA256Mismatch``; radosgw 16 does, checked by hand). The
        SDK's own UploadPart would want the whole body in memory and hash it again to sign it."""
        storage = self._storage
        client = storage._client
        region = client._get_region(storage._bucket)
        url = client._base_url.build(
            method="PUT",
            region=region,
            bucket_name=storage._bucket,
            object_name=check_key(key),
            query_params={"partNumber": str(number), "uploadId": staging},
        )
        date = minio_time.utcnow()
        headers: DictType = {
            "Host": url.netloc,
            "Content-Length": str(length),
            "x-amz-content-sha256": sha256,
            "x-amz-date": minio_time.to_amz_date(date),
        }
        credentials = client._provider.retrieve() if client._provider is not None else None
        if credentials is not None:
            headers = sign_v4_s3(
                method="PUT",
                url=url,
                region=region,
                headers=headers,
                credentials=credentials,
                content_sha256=sha256,
                date=date,
            )
        body = _RecordingBlocks(read_exact_blocks(cast(Readable, source), length, _PIECE_BLOCK))
        try:
            with _boundary(f"stage {key} piece {number}", storage._where):
                response = storage._http.urlopen(
                    "PUT", urlunsplit(url), body=iter(body), headers=headers, retries=False, redirect=False
                )
                if response.status >= 300:
                    raise _error_from(response)
        except (StorageError, StorageUnavailable, StorageFull) as exc:
            if body.error is None or body.error is exc:
                raise
            raise body.error from None
        etag = response.headers.get("ETag")
        if not etag:
            raise StorageError(f"stage {key} piece {number}: {storage._where} answered no ETag")
        return etag.strip('"')

    def finish(self, key: str, staging: str, pieces: Sequence[tuple[int, str]]) -> int:
        storage = self._storage
        parts = [Part(number, token) for number, token in pieces]
        with _boundary(f"assemble {check_key(key)}", storage._where):
            storage._client._complete_multipart_upload(storage._bucket, key, staging, parts)
        return storage._size(key)  # from a stat: radosgw's completion answers no ETag, nor a size

    def abandon(self, key: str, staging: str) -> bool:
        return self._storage._abort_upload(check_key(key), staging)
