"""Per-request telemetry (log context, the access line, HTTP metrics) and ``GET /metrics``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import falcon
from falcon.routing import CompiledRouter

from chunksvc import logs
from chunksvc.config import TrustedProxies
from chunksvc.metrics import CONTENT_TYPE, Metrics

access_log = logging.getLogger(logs.ACCESS_LOGGER)

PART_ROUTE = "/uploads/sessions/{session_id}/parts/{part_number}"
# Label for paths no route matches: never the raw path, which would give one series per URL.
UNMATCHED = "unmatched"


class RequestTelemetry:
    """Binds the request's fields to every log line, writes one access line and counts the request.

    Goes after ``RequestId`` (it reads the request id). The client is bound to the log lines by
    whoever authenticates (``middleware.publish_client``); the access line reads it from
    ``req.context.client``.
    """

    def __init__(
        self,
        router: CompiledRouter,
        metrics: Metrics,
        pool_stats: Callable[[], Mapping[str, int]],
        trusted_proxies: TrustedProxies,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._pool_stats = pool_stats
        self._trusted_proxies = trusted_proxies

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._begin(req)

    def _begin(self, req: falcon.Request) -> None:
        req.context.started = time.perf_counter()
        req.context.client_addr = self._trusted_proxies.client_address(
            req.remote_addr, req.get_header("X-Forwarded-For")
        )
        self._metrics.request_started()
        # Routed here, ahead of Falcon, so that requests Falcon refuses before routing still get
        # their route and ids in the log and the metrics.
        match = self._router.find(req.path)
        req.context.route = match[3] if match else UNMATCHED
        params = match[2] if match else {}
        logs.start_request(
            request_id=getattr(req.context, "request_id", None),
            session_id=params.get("session_id"),
            part_number=_part_number(params.get("part_number")),
        )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not hasattr(req.context, "started"):  # Falcon refused the request before any middleware ran
            self._begin(req)
        seconds = time.perf_counter() - req.context.started
        status = resp.status_code
        route = req.context.route
        code = getattr(req.context, "error_code", None)
        client = getattr(req.context, "client", None)
        try:
            self._metrics.request_finished(req.method, route, status, seconds)
            if route == PART_ROUTE and req.method == "PUT" and status >= 400:
                self._metrics.part_rejected(code or "unknown")
            self._metrics.pool_sampled(self._pool_stats())

            fields = {
                "method": req.method,
                "route": route,
                "status": status,
                "bytes_in": _declared_length(req),
                "bytes_out": _body_length(resp),
                "duration_ms": round(seconds * 1000, 3),
                "remote_addr": req.context.client_addr,
            }
            if req.context.client_addr != req.remote_addr:
                fields["proxy_addr"] = req.remote_addr
            if client is not None:
                fields["client"] = client.name
            if code is not None:
                fields["code"] = code
            access_log.info("%s %s %s", req.method, route, status, extra={"fields": fields})
        finally:
            logs.end_request()


class MetricsResource:
    """/metrics: the Prometheus text exposition of every worker's values."""

    def __init__(self, metrics: Metrics, pool_stats: Callable[[], Mapping[str, int]]) -> None:
        self._metrics = metrics
        self._pool_stats = pool_stats

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # This worker's pool as of now; the other workers' as of their latest request.
        self._metrics.pool_sampled(self._pool_stats())
        resp.content_type = CONTENT_TYPE
        resp.data = self._metrics.exposition()


def _part_number(raw: str | None) -> int | str | None:
    return int(raw) if raw is not None and raw.isdecimal() and len(raw) <= 9 else raw


def _declared_length(req: falcon.Request) -> int | None:
    # Not req.content_length: it raises on a malformed header, which the request has answered already.
    raw = req.get_header("Content-Length")
    if raw is None:
        return 0
    return int(raw) if raw.isdecimal() else None


def _body_length(resp: falcon.Response) -> int | None:
    if resp.stream is not None:
        length = resp.content_length
        return int(length) if length is not None else None
    body = resp.render_body()
    return len(body) if body is not None else 0
