"""Upload rules as pure functions: request validation, part sizes, digests.

Nothing here touches the database, the storage or HTTP, so all of it is unit-tested directly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from typing import Any, TypeGuard
from uuid import UUID

from chunksvc.config import Limits, MiB
from chunksvc.errors import (
    InvalidPartNumber,
    InvalidRequest,
    LengthRequired,
    PartSizeMismatch,
    PartTooLarge,
    SessionNotFound,
    TooManyParts,
    UnsupportedDigest,
    UploadTooLarge,
)

# The only spelling of a session id the service accepts: the one it hands out.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Decimal digits, no sign, spaces or leading zeros (so "01" is not another name for part 1).
_PART_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
_QUERY_INT = re.compile(r"0|[1-9][0-9]{0,8}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_CREATE_FIELDS = {"filename", "size", "part_size", "content_type", "sha256", "metadata"}
MAX_METADATA_BYTES = 8 * 1024
MAX_IDEMPOTENCY_KEY = 255
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclasses.dataclass(frozen=True)
class NewSession:
    filename: str
    size: int
    part_size: int
    total_parts: int
    content_type: str
    sha256: str | None
    metadata: dict[str, str]


def request_fingerprint(body: Any) -> bytes:
    """Identifies a create request for Idempotency-Key replays: same key, same body?"""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def parse_idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_IDEMPOTENCY_KEY or _CONTROL.search(raw):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return raw


def parse_bounded_int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    """A query-string integer in ``[low, high]``, written as the contract writes numbers."""
    if raw is None or raw == "":
        return default
    if not _QUERY_INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _is_storable_text(value: object) -> TypeGuard[str]:
    """A string PostgreSQL can store: no NUL, no lone surrogate (JSON allows both as escapes)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sha256(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.match(value):
        raise InvalidRequest(f"{field} must be 64 hexadecimal characters (SHA-256)")
    return value.lower()


def validate_new_session(body: Any, limits: Limits) -> NewSession:
    """Check a create request body and work out the part layout."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}")

    filename = body.get("filename")
    if not _is_storable_text(filename) or not 1 <= len(filename) <= 1024:
        raise InvalidRequest("filename is required: a string of 1 to 1024 characters")
    if _CONTROL.search(filename):
        raise InvalidRequest("filename must not contain control characters")

    size = body.get("size")
    if not _is_int(size) or size < 1:
        raise InvalidRequest("size is required: a positive integer number of bytes")
    if size > limits.max_upload_size:
        raise UploadTooLarge(f"size {size} is above the maximum upload size {limits.max_upload_size}")

    content_type = body.get("content_type", DEFAULT_CONTENT_TYPE)
    if not _is_storable_text(content_type) or not 1 <= len(content_type) <= 255 or _CONTROL.search(content_type):
        raise InvalidRequest("content_type must be a string of 1 to 255 printable characters")

    sha256 = body.get("sha256")
    if sha256 is not None:
        sha256 = parse_sha256(sha256, "sha256")

    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
        _is_storable_text(k) and _is_storable_text(v) for k, v in metadata.items()
    ):
        raise InvalidRequest("metadata must be a flat object of string to string (text without NUL)")
    if len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")

    part_size = plan_part_size(size, body.get("part_size"), limits)
    return NewSession(
        filename=filename,
        size=size,
        part_size=part_size,
        total_parts=total_parts(size, part_size),
        content_type=content_type,
        sha256=sha256,
        metadata=metadata,
    )


def total_parts(size: int, part_size: int) -> int:
    return -(-size // part_size)


def plan_part_size(size: int, requested: Any, limits: Limits) -> int:
    """The part size for an upload of ``size`` bytes.

    An explicit size must be within bounds and give at most ``max_parts`` parts. The default is
    raised (to a whole MiB where possible) until the upload fits in ``max_parts`` parts.
    """
    if requested is not None:
        if not _is_int(requested) or not limits.min_part_size <= requested <= limits.max_part_size:
            raise InvalidRequest(
                f"part_size must be an integer between {limits.min_part_size} and {limits.max_part_size}"
            )
        if total_parts(size, requested) > limits.max_parts:
            raise TooManyParts(
                f"part_size {requested} gives {total_parts(size, requested)} parts;"
                f" at most {limits.max_parts} are allowed"
            )
        return requested
    part_size = limits.default_part_size
    if total_parts(size, part_size) > limits.max_parts:
        needed = -(-size // limits.max_parts)
        rounded = -(-needed // MiB) * MiB
        part_size = rounded if rounded <= limits.max_part_size else needed
    # Config validation guarantees max_upload_size <= max_parts * max_part_size.
    assert part_size <= limits.max_part_size
    return part_size


def part_length(size: int, part_size: int, part_number: int) -> int:
    """The exact size of part ``part_number``: ``part_size`` for all but the last."""
    count = total_parts(size, part_size)
    return part_size if part_number < count else size - part_size * (count - 1)


def parse_session_id(raw: str) -> UUID:
    """A session id in its canonical form (lowercase 8-4-4-4-12 hex); any other is ``SessionNotFound``.

    ``uuid.UUID`` also takes upper case, braces, ``urn:uuid:`` and no dashes: each would be a
    second name for the same session.
    """
    if not _CANONICAL_UUID.fullmatch(raw):
        raise SessionNotFound()
    return UUID(raw)


def parse_part_number(raw: str, total: int) -> int:
    if not _PART_NUMBER.fullmatch(raw) or not 1 <= int(raw) <= total:
        raise InvalidPartNumber(f"part number must be an integer from 1 to {total}")
    return int(raw)


def check_part_length(raw_length: str | None, size: int, part_size: int, part_number: int) -> int:
    """Checks 5 and 6 of the part upload: Content-Length present and exactly right."""
    if raw_length is None:
        raise LengthRequired("Content-Length is required for a part")
    raw_length = raw_length.strip()
    if not raw_length.isascii() or not raw_length.isdigit():
        raise InvalidRequest("Content-Length must be a non-negative integer")
    length = int(raw_length)
    expected = part_length(size, part_size, part_number)
    if length > part_size:
        raise PartTooLarge(f"Content-Length {length} is above the part size {part_size}")
    if length != expected:
        raise PartSizeMismatch(f"part {part_number} must be exactly {expected} bytes, not {length}")
    return length


_DIGEST_MEMBER = re.compile(r"^\s*([a-z0-9-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$")
# RFC 9530 algorithm names this service verifies, as hashlib names, with their digest sizes.
VERIFIED_DIGESTS = {"sha-256": ("sha256", 32), "sha-512": ("sha512", 64)}


def parse_content_digest(header: str | None) -> dict[str, bytes]:
    """The digests of an RFC 9530 ``Content-Digest`` header to verify, by hashlib name.

    ``{}`` when the header is absent. Each of sha-256 and sha-512 that is present is returned
    (and verified by the caller); other algorithms are ignored, but a header that carries
    neither is refused (``UnsupportedDigest``): the client asked for a check we cannot make.
    A malformed header is ``InvalidRequest``.
    """
    if header is None:
        return {}
    found: dict[str, bytes] = {}
    for member in header.split(","):
        match = _DIGEST_MEMBER.match(member)
        if not match:
            raise InvalidRequest("Content-Digest must look like sha-256=:<base64>:")
        algorithm, value = match.groups()
        if algorithm not in VERIFIED_DIGESTS:
            continue
        name, size = VERIFIED_DIGESTS[algorithm]
        try:
            digest = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise InvalidRequest(f"Content-Digest {algorithm} value is not valid base64") from None
        if len(digest) != size:
            raise InvalidRequest(f"Content-Digest {algorithm} value must be {size} bytes")
        found[name] = digest
    if not found:
        raise UnsupportedDigest("Content-Digest must carry sha-256 or sha-512")
    return found


def parse_prefer_wait(header: str | None, maximum: float) -> float:
    """The seconds of an RFC 7240 ``Prefer: wait=N`` (at most ``maximum``); 0 when there is none.

    A preference may be ignored (RFC 7240, section 2), so a malformed one is not an error: it is
    read as no wait at all. Preferences are comma-separated; a ``;`` starts a preference's own
    parameters, which ``wait`` has none of.
    """
    if header is None:
        return 0.0
    for preference in header.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() == "wait":
            digits = value.strip().strip('"')
            return (
                float(min(int(digits), maximum)) if digits.isascii() and digits.isdigit() and len(digits) <= 9 else 0.0
            )
    return 0.0


def parse_token_ttl(body: Any, default: int, maximum: int) -> int:
    """A token request's lifetime in seconds: ``{"ttl": n}`` with 1 <= n <= ``maximum``, or
    ``default`` for no body (or no ttl)."""
    if body is None:
        return default
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - {"ttl"})
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}")
    ttl = body.get("ttl", default)
    if not _is_int(ttl) or not 1 <= ttl <= maximum:
        raise InvalidRequest(f"ttl must be a whole number of seconds from 1 to {maximum}")
    return ttl
