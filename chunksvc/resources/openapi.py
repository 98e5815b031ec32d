"""GET /openapi.json: the static document (chunksvc/openapi.json) with this server's size limits."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import falcon

from chunksvc.config import Limits


def document(limits: Limits) -> dict[str, Any]:
    """The OpenAPI document with the limits that depend on configuration filled in."""
    doc: dict[str, Any] = json.loads(resources.files("chunksvc").joinpath("openapi.json").read_text("utf-8"))
    schemas = doc["components"]["schemas"]
    schemas["UploadSize"]["maximum"] = limits.max_upload_size
    schemas["PartSize"]["minimum"] = limits.min_part_size
    schemas["PartSize"]["maximum"] = limits.max_part_size
    doc["components"]["parameters"]["PartNumber"]["schema"]["maximum"] = limits.max_parts
    return doc


class OpenApi:
    def __init__(self, limits: Limits) -> None:
        # Rendered once: the document is the same for every request.
        self._body = json.dumps(document(limits)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
