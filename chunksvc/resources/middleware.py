"""Request-wide concerns: request ids and authentication."""

from __future__ import annotations

import re
import uuid
from typing import Any

import falcon

from chunksvc import logs
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


class BearerAuth:
    """Authenticates every /uploads request first, so 401 precedes every other check (404 and
    405 included: a caller without a key learns nothing of the routes).

    Routed requests are authenticated in ``process_resource``, where Falcon has matched the route
    (``req.uri_template``) and names its resource, unless the resource authenticates the request
    method itself: it says so in ``auth_in_responder`` (a set of methods), then authenticates
    before its other checks and hands the client to ``publish_client``. Paths under the prefix
    that no route matches reach ``unrouted`` (a sink: Falcon calls no ``process_resource`` for
    them), which authenticates before answering 404.
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
        self._authenticate(req)

    def unrouted(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        """A path under the prefix that no route matches: 401 without a valid key, else 404."""
        self._authenticate(req)
        raise falcon.HTTPRouteNotFound()

    def _authenticate(self, req: falcon.Request) -> None:
        publish_client(req, self._authenticator.authenticate(req.get_header("Authorization")))


def publish_client(req: falcon.Request, client: Client) -> None:
    """The request is ``client``'s: responders read it from ``req.context.client``, and every log
    line of the request names it, its access line included. Then its rate is checked (429
    ``rate_limited``), so a limited request is refused after 401 and before anything else: a
    part's body is not read."""
    req.context.client = client
    logs.bind(client=client.name)
    limiter: RateLimiter | None = getattr(req.context, "rate_limiter", None)
    if limiter is not None:
        limiter.admit(client.id, client.name)
