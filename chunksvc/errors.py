"""Domain errors: what went wrong, in the contract's vocabulary.

Each error carries the contract's stable ``code``. The HTTP status for each one lives in a
single table in ``chunksvc.resources.problems``; nothing below the HTTP layer knows statuses.
"""

from __future__ import annotations


class ChunksvcError(Exception):
    """Base of every error the service raises on purpose."""

    code = "internal_error"
    title = "Internal error"

    def __init__(self, detail: str | None = None, **extra: object) -> None:
        self.detail = detail or self.title
        # Extra members of the problem document (e.g. ``missing_parts``).
        self.extra = extra
        super().__init__(self.detail)


class ConfigError(ChunksvcError):
    """The configuration is unusable; raised at start-up, never per request."""

    code = "config_error"
    title = "Invalid configuration"


# --- request errors -------------------------------------------------------------------------


class InvalidRequest(ChunksvcError):
    code = "invalid_request"
    title = "Invalid request"


class Unauthorized(ChunksvcError):
    code = "unauthorized"
    title = "Missing, unknown or revoked API key, or an upload token expired or whose session ended"


class Forbidden(ChunksvcError):
    """The credential is valid but may not do this: an upload token outside its session's calls."""

    code = "forbidden"
    title = "This credential may not make this request"


class SessionNotFound(ChunksvcError):
    code = "session_not_found"
    title = "Upload session not found"


class SessionNotActive(ChunksvcError):
    code = "session_not_active"
    title = "Upload session does not accept this operation in its current state"


class SessionCompleted(ChunksvcError):
    code = "session_completed"
    title = "Upload session is already completed"


class CompletionInProgress(ChunksvcError):
    code = "completion_in_progress"
    title = "Another request is assembling this upload"


class TooManyParts(ChunksvcError):
    code = "too_many_parts"
    title = "Part size gives more parts than allowed"


class UploadTooLarge(ChunksvcError):
    code = "upload_too_large"
    title = "Upload size above the configured maximum"


class QuotaExceeded(ChunksvcError):
    """A create would take the client past a quota; ``extra`` holds ``limit``, ``used``, ``requested``."""

    code = "quota_exceeded"
    title = "The client's quota does not allow this upload"


class RateLimited(ChunksvcError):
    """The client is past its request rate; ``retry_after``: whole seconds until its next token."""

    code = "rate_limited"
    title = "Too many requests from this client"

    def __init__(self, detail: str, *, retry_after: int, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class IdempotencyKeyReused(ChunksvcError):
    code = "idempotency_key_reused"
    title = "Idempotency-Key already used with a different request"


class InvalidPartNumber(ChunksvcError):
    code = "invalid_part_number"
    title = "Part number out of range"


class LengthRequired(ChunksvcError):
    code = "length_required"
    title = "Content-Length is required"


class PartTooLarge(ChunksvcError):
    code = "part_too_large"
    title = "Part larger than the session's part size"


class PartSizeMismatch(ChunksvcError):
    code = "part_size_mismatch"
    title = "Part length differs from this part's exact size"


class UnsupportedDigest(ChunksvcError):
    code = "unsupported_digest"
    title = "Content-Digest carries no algorithm this service verifies"


class DigestMismatch(ChunksvcError):
    code = "digest_mismatch"
    title = "Body does not match Content-Digest"


class IncompleteBody(ChunksvcError):
    """The request body ended before Content-Length bytes arrived (client gone)."""

    code = "incomplete_body"
    title = "Request body ended before Content-Length bytes"


class PartConflict(ChunksvcError):
    code = "part_conflict"
    title = "A different part was already accepted under this number"


class PartsMissing(ChunksvcError):
    code = "parts_missing"
    title = "Parts are missing"


class ChecksumMismatch(ChunksvcError):
    code = "checksum_mismatch"
    title = "Assembled object does not match the expected size or SHA-256"


# --- tus (contract v1.2) ---------------------------------------------------------------------


class TusVersionUnsupported(ChunksvcError):
    code = "unsupported_version"
    title = "Tus-Resumable names a tus version this server does not speak"


class SessionGone(ChunksvcError):
    """tus: the upload ended (aborted, expired, failed), so it is gone for good (410)."""

    code = "session_gone"
    title = "Upload session has ended"


class OffsetMismatch(ChunksvcError):
    code = "offset_mismatch"
    title = "Upload-Offset differs from the upload's offset"


class UnsupportedMediaType(ChunksvcError):
    code = "unsupported_media_type"
    title = "Content-Type not accepted here"


class FinalUploadNotPatchable(ChunksvcError):
    """tus: a final upload's bytes are its partials'; it takes none of its own."""

    code = "forbidden"
    title = "A final upload cannot be patched"


class UploadChecksumMismatch(ChunksvcError):
    """tus: a PATCH body differs from its Upload-Checksum (tus's own status, 460)."""

    code = "upload_checksum_mismatch"
    title = "Body does not match Upload-Checksum"


# --- dependency errors ----------------------------------------------------------------------


class DatabaseUnavailable(ChunksvcError):
    code = "database_unavailable"
    title = "Database unavailable"


class DatabaseBusy(DatabaseUnavailable):
    """No pooled connection became free in time: nothing was sent to the database."""


class StorageUnavailable(ChunksvcError):
    code = "storage_unavailable"
    title = "Storage unavailable"


class StorageError(ChunksvcError):
    """Storage answered, but not as expected (missing object, refused request)."""

    code = "storage_error"
    title = "Storage error"


class ObjectMissing(StorageError):
    """A key that should hold bytes holds none (removed behind the service's back, or never stored)."""

    title = "Stored object missing"

    def __init__(self, key: str, detail: str | None = None) -> None:
        super().__init__(detail or f"no object under {key}")
        self.key = key


class StagingLost(StorageError):
    """An object being staged (``StagedObject``) is no longer staged: finished, abandoned or swept
    behind the caller's back, or one of its pieces replaced. Parts copied in from keys of their own
    are still stored there, and the object is made from them the usual way; parts sent straight in
    as pieces (``services.staging``) are lost with it, and asked of the client again."""

    title = "Staged object lost"


class StorageFull(ChunksvcError):
    """Storage has no room for the bytes (disk full, quota, MinIO's XMinioStorageFull)."""

    code = "storage_full"
    title = "Storage is full"


class PieceCopyMissing(StorageError):
    """The local copy of a part sent straight into a staged object (``storage.spill``) is not on
    this host (another host took the part, or it was swept): the hash frontier cannot pass it, and
    completion reads the finished object back to hash it instead."""

    title = "Local copy of a piece missing"
