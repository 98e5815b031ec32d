"""The /uploads routes. Thin: parse HTTP, call the upload service, render its rows as the contract's JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, ClassVar

import falcon

from chunksvc.errors import InvalidRequest
from chunksvc.resources.body import part_body
from chunksvc.resources.middleware import publish_client
from chunksvc.rows import ClaimedDeliveryRow, PartRow, SessionRow
from chunksvc.services import rules, states
from chunksvc.services.assembler import BackgroundAssembler
from chunksvc.services.auth import UploadTokens
from chunksvc.services.completion import Completion, CompletionService
from chunksvc.services.quotas import QuotaService
from chunksvc.services.ratelimit import RateLimiter
from chunksvc.services.uploads import PartResult, UploadService

MAX_JSON_BODY = 64 * 1024
# After a 202 from complete: how soon to look again. Assembly runs at hundreds of MB/s, so a
# few seconds shows progress without polling hard.
RETRY_AFTER_SECONDS = 2
# The longest ``Prefer: wait`` (RFC 7240) complete honours: the request holds one of the worker's
# threads meanwhile (gunicorn.conf.py: 64 of them), and a proxy's read timeout must outlast it.
MAX_PREFER_WAIT = 20


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json(req: falcon.Request, *, required: bool) -> Any:
    """The request's JSON body (None when empty and not required), strictly parsed."""
    content_type = (req.content_type or "").split(";")[0].strip().lower()
    raw = req.bounded_stream.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise InvalidRequest(f"the JSON body must be at most {MAX_JSON_BODY} bytes")
    # Only no bytes at all is no body: white space alone is not a JSON text (RFC 8259), so an
    # optional body of "\r" is refused like any other that does not parse.
    if not raw:
        if required:
            raise InvalidRequest("a JSON body is required")
        return None
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise InvalidRequest("Content-Type must be application/json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    # RecursionError: deeply nested arrays or objects (64 KiB of "[" is 65,536 levels).
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class SessionRenderer:
    """A session as the contract's JSON. ``bucket`` is the storage's (``Storage.bucket``): the
    session's ``object`` names it on S3, and has no ``bucket`` member on local disk."""

    def __init__(self, bucket: str | None) -> None:
        self._bucket = bucket

    def __call__(self, session: SessionRow) -> dict[str, Any]:
        return {
            "id": str(session.id),
            "status": session.effective_status,
            "filename": session.filename,
            "content_type": session.content_type,
            "size": session.size,
            "part_size": session.part_size,
            "total_parts": session.total_parts,
            "received_parts": session.received_parts,
            "received_bytes": session.received_bytes,
            "sha256": session.sha256,
            "metadata": session.metadata,
            "created_at": rfc3339(session.created_at),
            "updated_at": rfc3339(session.updated_at),
            "expires_at": rfc3339(session.expires_at),
            "object": self._object(session),
            # Progress of a running assembly only (an abort during one leaves the count behind).
            "assembled_bytes": session.assembled_bytes if session.effective_status == states.COMPLETING else None,
        }

    def _object(self, session: SessionRow) -> dict[str, Any] | None:
        """The assembled object, once COMPLETED."""
        if session.object_key is None:
            return None
        stored: dict[str, Any] = {
            "key": session.object_key,
            "size": session.object_size,
            "sha256": session.object_sha256,
        }
        if self._bucket is not None:
            stored["bucket"] = self._bucket
        return stored


class EventRenderer:
    """A completion event's body, as its webhook POST sends it (the same bytes on every try):
    ``{"id", "type", "created_at", "session"}``, the session as ``GET`` renders it."""

    def __init__(self, render_session: SessionRenderer) -> None:
        self._render_session = render_session

    def __call__(self, delivery: ClaimedDeliveryRow, session: SessionRow) -> bytes:
        event = {
            "id": str(delivery.event_id),
            "type": delivery.type,
            "created_at": rfc3339(delivery.event_created_at),
            "session": self._render_session(session),
        }
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def render_part(part: PartRow) -> dict[str, Any]:
    """A received part as the contract's JSON (its storage key stays inside)."""
    return {
        "part_number": part.part_number,
        "size": part.size,
        "sha256": part.sha256,
        "created_at": rfc3339(part.created_at),
    }


class LimitsResource:
    """/uploads/limits: the caller's quotas and its use of them (contract v1.2)."""

    def __init__(self, quotas: QuotaService, rates: RateLimiter) -> None:
        self._quotas = quotas
        self._rates = rates

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        usage = self._quotas.usage(req.context.client.id)
        rate = self._rates.rate_of(req.context.client.id)
        resp.media = {
            "sessions": {"limit": usage.sessions_limit, "used": usage.sessions_used},
            "bytes": {"limit": usage.bytes_limit, "used": usage.bytes_used},
            # Requests a second (0: no limit) and the burst enforced with it.
            "rate": {"limit": rate.limit if rate.on else 0, "burst": rate.burst if rate.on else 0},
        }


class SessionsResource:
    """/uploads/sessions"""

    def __init__(self, uploads: UploadService, render: SessionRenderer) -> None:
        self._uploads = uploads
        self._render = render

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, required=True)
        session, created = self._uploads.create_session(req.context.client, body, req.get_header("Idempotency-Key"))
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.location = f"/uploads/sessions/{session.id}"
        resp.media = self._render(session)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        sessions, next_cursor = self._uploads.list_sessions(
            req.context.client,
            req.get_param("status") or None,  # ?status= is no filter, as an empty limit or cursor is none
            req.get_param("limit"),
            req.get_param("cursor"),
        )
        resp.media = {"sessions": [self._render(s) for s in sessions], "next_cursor": next_cursor}


# ``token_methods``: what an upload token may call (contract v1.2), per resource: its own
# session's status, parts, complete and abort (BearerAuth refuses every other method of a token
# with 403, and another session with 404). A resource without it is closed to tokens.


class SessionResource:
    """/uploads/sessions/{session_id}"""

    token_methods: ClassVar[frozenset[str]] = frozenset({"GET", "DELETE"})

    def __init__(self, uploads: UploadService, render: SessionRenderer) -> None:
        self._uploads = uploads
        self._render = render

    def on_get(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        resp.media = self._render(self._uploads.get_session(req.context.client, session_id))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        self._uploads.abort(req.context.client, session_id)
        resp.status = falcon.HTTP_204


class PartsResource:
    """/uploads/sessions/{session_id}/parts"""

    token_methods: ClassVar[frozenset[str]] = frozenset({"GET"})

    def __init__(self, uploads: UploadService) -> None:
        self._uploads = uploads

    def on_get(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        parts, next_after = self._uploads.list_parts(
            req.context.client, session_id, req.get_param("after"), req.get_param("limit")
        )
        resp.media = {"parts": [render_part(part) for part in parts], "next_after": next_after}


class PartResource:
    """/uploads/sessions/{session_id}/parts/{part_number}"""

    # A part authenticates in the same database round trip that fetches its session (the hot
    # path), still before every other check: BearerAuth leaves PUT to the responder.
    auth_in_responder: ClassVar[frozenset[str]] = frozenset({"PUT"})
    # Held to its session by check_part, as the responder authenticates.
    token_methods: ClassVar[frozenset[str]] = frozenset({"PUT"})

    def __init__(self, uploads: UploadService, body_timeout: float | None = None) -> None:
        self._uploads = uploads
        self._body_timeout = body_timeout

    def on_put(self, req: falcon.Request, resp: falcon.Response, session_id: str, part_number: str) -> None:
        # Every check, authentication first, runs before the first body byte is read.
        target = self._uploads.check_part(
            req.get_header("Authorization"),
            session_id,
            part_number,
            req.get_header("Content-Length"),
            req.get_header("Content-Digest"),
        )
        publish_client(req, target.client)
        result: PartResult = self._uploads.store_part(target, part_body(req, self._body_timeout))
        resp.status = falcon.HTTP_201 if result.created else falcon.HTTP_200
        resp.set_header("ETag", f'"{result.sha256}"')
        resp.media = {
            "part_number": result.part_number,
            "size": result.size,
            "sha256": result.sha256,
            "received_parts": result.received_parts,
            "received_bytes": result.received_bytes,
            "status": result.status,
        }


class TokensResource:
    """/uploads/sessions/{session_id}/tokens (contract v1.2): the owner mints an upload token."""

    def __init__(self, tokens: UploadTokens) -> None:
        self._tokens = tokens

    def on_post(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        minted = self._tokens.mint(req.context.client, session_id, read_json(req, required=False))
        resp.status = falcon.HTTP_201
        # A credential: no cache may keep the answer.
        resp.cache_control = ["no-store"]
        resp.media = {
            "token": minted.token,
            "session_id": str(minted.session_id),
            "expires_at": rfc3339(minted.expires_at),
        }


class CompleteResource:
    """/uploads/sessions/{session_id}/complete"""

    token_methods: ClassVar[frozenset[str]] = frozenset({"POST"})

    def __init__(self, completion: CompletionService, assembler: BackgroundAssembler, render: SessionRenderer) -> None:
        self._completion = completion
        self._assembler = assembler
        self._render = render

    def on_post(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        body = read_json(req, required=False)
        client = req.context.client
        session, completion = self._completion.complete(client, session_id, body)
        if completion is Completion.BACKGROUND:
            self._assembler.submit(session.id, client.id)
        wait = rules.parse_prefer_wait(req.get_header("Prefer"), MAX_PREFER_WAIT)
        if completion is not Completion.DONE and wait > 0:
            # Answer as soon as the object is verified (or the completion ended otherwise): the
            # outcome is what completing again now answers; still COMPLETING after the wait, 202.
            resp.set_header("Preference-Applied", f"wait={wait:.0f}")
            if self._completion.wait_while_completing(session.id, client.id, wait):
                session, completion = self._completion.complete(client, session_id, body)
                if completion is Completion.BACKGROUND:  # reopened and accepted again meanwhile
                    self._assembler.submit(session.id, client.id)
        if completion is not Completion.DONE:  # assembling: complete again after Retry-After
            resp.status = falcon.HTTP_202
            resp.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
        resp.media = self._render(session)
