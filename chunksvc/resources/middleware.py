"""Request-wide concerns: request ids, CORS and authentication."""

from __future__ import annotations

import re
import uuid
from typing import Any

import falcon

from chunksvc import logs
from chunksvc.config import CorsOrigins
from chunksvc.errors import Forbidden, SessionNotFound
from chunksvc.services import auth, rules
from chunksvc.services.auth import Authenticator, Client
from chunksvc.services.ratelimit import RateLimiter

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestId:
    """Every response carries X-Request-ID: the caller's when it is sane, else a new one."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        incoming = req.get_header("X-Request-ID")
        req.context.request_id = incoming if incoming and _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        request_id = getattr(req.context, "request_id", None)
        if request_id:
            resp.set_header("X-Request-ID", request_id)


# What a browser may send and read (contract v1.2 names at least these). Prefer and
# Upload-Defer-Length too: the native client's `Prefer: wait`, tus's deferred length.
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Content-Digest, Idempotency-Key, X-Request-ID, Prefer, Tus-Resumable, "
    "Upload-Length, Upload-Defer-Length, Upload-Offset, Upload-Metadata, Upload-Checksum, Upload-Concat, "
    "X-HTTP-Method-Override"
)
CORS_EXPOSE_HEADERS = (
    "Location, ETag, Retry-After, X-Request-ID, Preference-Applied, Upload-Offset, Upload-Length, "
    "Upload-Expires, Upload-Metadata, Upload-Concat, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, "
    "Tus-Checksum-Algorithm"
)
CORS_ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Chromium keeps a preflight at most 2 hours (Firefox a day): longer would not save more of them.
CORS_MAX_AGE = 7200
# The paths a browser's preflight is answered for (the API's; the rest needs no preflight).
_PREFLIGHT_PATH = re.compile(r"^/(?:uploads|tus)(?:/|\Z)")


class Cors:
    """CORS for ``CHUNKSVC_CORS_ORIGINS`` (contract v1.2).

    A preflight (OPTIONS with ``Access-Control-Request-Method``) from an allowed origin to a path
    under /uploads or /tus is answered 204 here, before authentication and routing: a browser sends
    no credentials with it. Every other response to an allowed origin, errors included (a browser
    hides a 401 or a 429 from the page unless it carries Allow-Origin), names that origin and the
    headers the page may read. A request from any other origin, or with no Origin, gets no
    ``Access-Control-*`` header, and a preflight from one goes on as a plain OPTIONS request.
    """

    def __init__(self, origins: CorsOrigins) -> None:
        self._origins = origins

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if (
            req.method == "OPTIONS"
            and req.get_header("Access-Control-Request-Method")
            and _PREFLIGHT_PATH.match(req.path)
            and self._origins.allows(req.get_header("Origin"))
        ):
            resp.status = falcon.HTTP_204
            resp.set_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
            resp.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            resp.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE))
            req.context.cors_preflight = True
            resp.complete = True  # no authentication, routing or responder: process_response still runs

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not self._origins.enabled:
            return
        # Whatever the origin: a cache must not hand one origin's answer to another.
        resp.append_header("Vary", "Origin")
        origin = req.get_header("Origin")
        if not self._origins.allows(origin):
            return
        assert origin is not None
        resp.set_header("Access-Control-Allow-Origin", origin)
        if not getattr(req.context, "cors_preflight", False):
            resp.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)


class BearerAuth:
    """Authenticates every /uploads request first, so 401 precedes every other check (404 and
    405 included: a caller without a key learns nothing of the routes).

    Routed requests are authenticated in ``process_resource``, where Falcon has matched the route
    (``req.uri_template``) and names its resource, unless the resource authenticates the request
    method itself: it says so in ``auth_in_responder`` (a set of methods), then authenticates
    before its other checks and hands the client to ``publish_client``. Paths under the prefix
    that no route matches reach ``unrouted`` (a sink: Falcon calls no ``process_resource`` for
    them), which authenticates before answering 404.

    An upload token (``Client.session_scope``) may call a resource only with the methods it names
    in ``token_methods`` (none by default: a new resource is closed to tokens until it says
    otherwise), else 403 ``forbidden``; and only on its own session, the route's ``{session_id}``
    or ``{upload_id}``, else 404 ``session_not_found``. A resource that authenticates in its
    responder (the part PUT) applies the same rules there.
    """

    def __init__(
        self, authenticator: Authenticator, prefix: str = "/uploads", rate_limiter: RateLimiter | None = None
    ) -> None:
        self._authenticator = authenticator
        self._prefix = prefix
        self._rate_limiter = rate_limiter
        #: For ``App.add_sink(auth.unrouted, auth.sink_prefix)``: the prefix and every path below it.
        self.sink_prefix = re.compile(re.escape(prefix) + r"(?:/|\Z)")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.client = None
        # publish_client admits the request against the client's rate, wherever it authenticates.
        req.context.rate_limiter = self._rate_limiter

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        template = req.uri_template or ""
        if template != self._prefix and not template.startswith(self._prefix + "/"):
            return
        if req.method in getattr(resource, "auth_in_responder", ()):
            return
        client = self._authenticate(req)
        if client.session_scope is None:
            return
        if req.method not in getattr(resource, "token_methods", ()):
            raise Forbidden(
                f"an upload token cannot {req.method} {template}; it allows only its own session's upload calls"
            )
        raw_id = params.get("session_id", params.get("upload_id"))
        try:
            session_id = rules.parse_session_id(raw_id) if raw_id is not None else None
        except SessionNotFound:
            session_id = None
        auth.check_scope(client, session_id)

    def unrouted(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        """A path under the prefix that no route matches: 401 without a valid key, else 404."""
        self._authenticate(req)
        raise falcon.HTTPRouteNotFound()

    def _authenticate(self, req: falcon.Request) -> Client:
        client = self._authenticator.authenticate(req.get_header("Authorization"))
        publish_client(req, client)
        return client


def publish_client(req: falcon.Request, client: Client) -> None:
    """The request is ``client``'s: responders read it from ``req.context.client``, and every log
    line of the request names it, its access line included. Then its rate is checked (429
    ``rate_limited``), so a limited request is refused after 401 and before anything else: a
    part's body is not read."""
    req.context.client = client
    logs.bind(client=client.name)
    if client.session_scope is not None:
        logs.bind(credential="upload_token")
    limiter: RateLimiter | None = getattr(req.context, "rate_limiter", None)
    if limiter is not None:
        limiter.admit(client.id, client.name)
