"""Errors as RFC 9457 problem documents: one table maps each domain error to its HTTP status."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import falcon

from chunksvc import errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

STATUS: dict[type[errors.ChunksvcError], int] = {
    errors.InvalidRequest: 400,
    errors.TooManyParts: 400,
    errors.InvalidPartNumber: 400,
    errors.PartSizeMismatch: 400,
    errors.DigestMismatch: 400,
    errors.UnsupportedDigest: 400,
    errors.IncompleteBody: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.SessionNotFound: 404,
    errors.SessionNotActive: 409,
    errors.SessionCompleted: 409,
    errors.CompletionInProgress: 409,
    errors.IdempotencyKeyReused: 409,
    errors.PartConflict: 409,
    errors.PartsMissing: 409,
    errors.LengthRequired: 411,
    errors.UploadTooLarge: 413,
    errors.PartTooLarge: 413,
    errors.ChecksumMismatch: 422,
    errors.TusVersionUnsupported: 412,
    errors.SessionGone: 410,
    errors.OffsetMismatch: 409,
    errors.UnsupportedMediaType: 415,
    errors.FinalUploadNotPatchable: 403,
    errors.UploadChecksumMismatch: 460,
    errors.QuotaExceeded: 429,  # no Retry-After: it lasts until the client's own sessions end
    errors.RateLimited: 429,  # with Retry-After: the seconds until the client's next token
    errors.StorageError: 502,
    errors.DatabaseUnavailable: 503,
    errors.StorageUnavailable: 503,
    errors.StorageFull: 507,
}

# Headers the contract requires beside some problems.
HEADERS: dict[type[errors.ChunksvcError], dict[str, str]] = {
    errors.Unauthorized: {"WWW-Authenticate": 'Bearer realm="chunksvc"'},
    errors.UnsupportedDigest: {"Want-Content-Digest": "sha-256=10, sha-512=3"},
    errors.TusVersionUnsupported: {"Tus-Version": "1.0.0"},
}

# Statuses HTTP itself does not name (tus's own), with the reason phrase their protocol gives.
REASONS = {460: "460 Checksum Mismatch"}

# Falcon's own errors (unknown route, wrong method, bad header) get stable codes too.
_FALCON_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def status_of(error: errors.ChunksvcError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def render(resp: falcon.Response, status: int, code: str, title: str, detail: str, **extra: Any) -> None:
    resp.status = REASONS.get(status, status)
    resp.content_type = PROBLEM_JSON
    resp.text = json.dumps(
        {
            "type": f"urn:chunksvc:problem:{code}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
            **extra,
        }
    )


def handle_domain_error(
    req: falcon.Request, resp: falcon.Response, error: errors.ChunksvcError, params: dict[str, Any]
) -> None:
    status = status_of(error)
    if status >= 500:
        log.error("%s: %s", error.code, error.detail, exc_info=error.__cause__ or error)
    for name, value in HEADERS.get(type(error), {}).items():
        resp.set_header(name, value)
    if isinstance(error, errors.RateLimited):
        resp.set_header("Retry-After", str(error.retry_after))
    req.context.error_code = error.code  # for the access log and the metrics
    render(resp, status, error.code, error.title, error.detail, **error.extra)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params: dict[str, Any]
) -> None:
    status = error.status_code
    code = _FALCON_CODES.get(status, "http_error")
    req.context.error_code = code
    render(resp, status, code, error.title or "HTTP error", error.description or error.title or "")
    headers = error.headers or {}
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        resp.set_header(name, value)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict[str, Any]) -> None:
    # Log everything, answer nothing internal.
    log.exception("unhandled error on %s %s", req.method, req.path)
    req.context.error_code = "internal_error"
    render(resp, 500, "internal_error", "Internal error", "the request failed; see the server log")


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(errors.ChunksvcError, handle_domain_error)
