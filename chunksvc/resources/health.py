"""/healthz and /readyz: no authentication, for load balancers and orchestrators."""

from __future__ import annotations

import falcon

from chunksvc.services.health import HealthService


class Healthz:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    def __init__(self, health: HealthService) -> None:
        self._health = health

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks = self._health.readiness()
        ready = all(check == "ok" for check in checks.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ok" if ready else "unavailable", "checks": checks}
