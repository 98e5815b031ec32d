"""The /tus/ routes (tus 1.0, contract v1.2). Thin: tus headers in, ``services.tus`` does the rest."""

from __future__ import annotations

from typing import ClassVar

import falcon

from chunksvc.errors import FinalUploadNotPatchable, TusVersionUnsupported
from chunksvc.resources.body import part_body
from chunksvc.services.tus import (
    CHECKSUM_ALGORITHMS,
    EXTENSIONS,
    TUS_VERSION,
    TusService,
    TusUpload,
    check_content_type,
    http_date,
    parse_checksum,
)

PREFIX = "/tus"
# tus-js-client's overridePatchMethod (for proxies that drop PATCH): POST with this header.
METHOD_OVERRIDES = frozenset({"PATCH", "DELETE"})


def _under_tus(req: falcon.Request) -> bool:
    return req.path == PREFIX or req.path.startswith(PREFIX + "/")


class TusProtocol:
    """What every /tus/ request and response shares: ``Tus-Resumable: 1.0.0`` on each response
    (errors too), a request without it (or with another version) is a 412, OPTIONS excepted; and
    ``X-HTTP-Method-Override``. Placed after authentication: 401 comes first, as everywhere."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        override = (req.get_header("X-HTTP-Method-Override") or "").upper()
        if req.method == "POST" and override in METHOD_OVERRIDES and _under_tus(req):
            req.method = override

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, str]
    ) -> None:
        if not isinstance(resource, (TusUploadsResource, TusUploadResource)) or req.method == "OPTIONS":
            return
        if req.get_header("Tus-Resumable") != TUS_VERSION:
            raise TusVersionUnsupported(f"send Tus-Resumable: {TUS_VERSION}")

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if _under_tus(req):
            resp.set_header("Tus-Resumable", TUS_VERSION)


def _options(tus: TusService, resp: falcon.Response) -> None:
    resp.status = falcon.HTTP_204
    resp.set_header("Tus-Version", TUS_VERSION)
    resp.set_header("Tus-Extension", ",".join(EXTENSIONS))
    resp.set_header("Tus-Max-Size", str(tus.max_size))
    resp.set_header("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS))


def _describe(resp: falcon.Response, upload: TusUpload) -> None:
    resp.set_header("Upload-Offset", str(upload.offset))
    resp.set_header("Upload-Length", str(upload.state.size))
    resp.set_header("Upload-Expires", http_date(upload.state))
    if upload.metadata:
        resp.set_header("Upload-Metadata", upload.metadata)
    if upload.state.concat == "partial":
        resp.set_header("Upload-Concat", "partial")
    elif upload.state.concat == "final":
        resp.set_header("Upload-Concat", "final;" + " ".join(f"{PREFIX}/{partial}" for partial in upload.partials))


class TusUploadsResource:
    """/tus/ : OPTIONS (discovery, no credentials) and POST (creation)."""

    # OPTIONS needs no credentials (tus discovery); it is answered without them, by design.
    auth_in_responder: ClassVar[frozenset[str]] = frozenset({"OPTIONS"})

    def __init__(self, tus: TusService, body_timeout: float | None = None) -> None:
        self._tus = tus
        self._body_timeout = body_timeout

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        _options(self._tus, resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = req.context.client
        length, concat, pairs = self._tus.check_creation(
            req.get_header("Upload-Length"),
            req.get_header("Upload-Defer-Length"),
            req.get_header("Upload-Concat"),
            req.get_header("Upload-Metadata"),
        )
        # creation-with-upload: a body is the first bytes; its checks come before anything is made.
        has_body = (req.content_length or 0) > 0
        if has_body:
            check_content_type(req.content_type)
            parse_checksum(req.get_header("Upload-Checksum"))
            if concat.kind == "final":
                raise FinalUploadNotPatchable("a final upload takes no bytes of its own")
        session = self._tus.create(client, length, concat, pairs, req.get_header("Upload-Metadata"))
        resp.status = falcon.HTTP_201
        resp.location = f"{PREFIX}/{session.id}"
        resp.set_header("Upload-Expires", http_date(session))
        if has_body:
            state, body_length, checksum = self._tus.check_patch(
                client,
                str(session.id),
                req.content_type,
                "0",
                req.get_header("Content-Length"),
                req.get_header("Upload-Checksum"),
            )
            offset = self._tus.patch(client, state, body_length, part_body(req, self._body_timeout), checksum)
            resp.set_header("Upload-Offset", str(offset))


class TusUploadResource:
    """/tus/{upload_id} : HEAD (offset), PATCH (append), DELETE (termination). (tus discovery is
    ``OPTIONS /tus/``; OPTIONS here is Falcon's own, and CORS preflights are answered before routing.)

    An upload token may HEAD, PATCH and DELETE its own session's upload here (BearerAuth holds
    it to ``{upload_id}``; creation, ``POST /tus/``, is for API keys only)."""

    token_methods: ClassVar[frozenset[str]] = frozenset({"HEAD", "PATCH", "DELETE"})

    def __init__(self, tus: TusService, body_timeout: float | None = None) -> None:
        self._tus = tus
        self._body_timeout = body_timeout

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _describe(resp, self._tus.head(req.context.client, upload_id))
        # The offset changes with every PATCH: no cache may answer for it.
        resp.cache_control = ["no-store"]
        resp.status = falcon.HTTP_200

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        client = req.context.client
        # Every check runs before the first body byte is read.
        state, length, checksum = self._tus.check_patch(
            client,
            upload_id,
            req.content_type,
            req.get_header("Upload-Offset"),
            req.get_header("Content-Length"),
            req.get_header("Upload-Checksum"),
        )
        offset = self._tus.patch(client, state, length, part_body(req, self._body_timeout), checksum)
        resp.status = falcon.HTTP_204
        resp.set_header("Upload-Offset", str(offset))
        resp.set_header("Upload-Expires", http_date(state))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self._tus.terminate(req.context.client, upload_id)
        resp.status = falcon.HTTP_204
