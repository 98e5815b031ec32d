"""Request-wide concerns: request ids and authentication."""

from __future__ import annotations

import re
import uuid

import falcon

from chunksvc.services.auth import Authenticator

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestId:
    """Every response carries X-Request-ID: the caller's when it is sane, else a new one."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        incoming = req.get_header("X-Request-ID")
        req.context.request_id = (
            incoming if incoming and _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        )

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        request_id = getattr(req.context, "request_id", None)
        if request_id:
            resp.set_header("X-Request-ID", request_id)


class BearerAuth:
    """Authenticates every /uploads request first, so 401 precedes every other check.

    Except a part upload (``PUT .../parts/{n}``): its resource authenticates in the same
    database round trip that fetches the session, before its other checks, and then sets
    ``req.context.client``.
    """

    def __init__(self, authenticator: Authenticator, prefix: str = "/uploads") -> None:
        self._authenticator = authenticator
        self._prefix = prefix
        self._part_upload = re.compile(re.escape(prefix) + r"/sessions/[^/]+/parts/[^/]+")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.client = None
        if req.method == "PUT" and self._part_upload.fullmatch(req.path):
            return
        if req.path == self._prefix or req.path.startswith(self._prefix + "/"):
            req.context.client = self._authenticator.authenticate(req.get_header("Authorization"))
