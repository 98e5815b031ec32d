"""How many sessions are in each status now (and webhook deliveries in each state), read from
PostgreSQL when ``/metrics`` is scraped.

Two statements (``session_census``, ``webhook_census``) that read only partial indexes (sessions
not ended, deliveries pending or dead), with a short timeout on both the wait for a pooled
connection and the statements: a slow or absent database costs a scrape at most about twice
``timeout``, and the scrape still answers (without these gauges, and with
``chunksvc_session_gauges_up`` 0). A pool whose connections are all in use is left to the
requests: the scrape skips the gauges instead of waiting.
"""

from __future__ import annotations

import logging

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError
from chunksvc.metrics import ClientLimitSample
from chunksvc.services.quotas import QuotaService
from chunksvc.services.ratelimit import RateLimiter

log = logging.getLogger(__name__)


def _pool_busy(db: Database) -> bool:
    stats = db.stats()
    return bool(stats) and stats.get("pool_available", 0) == 0 and stats.get("pool_size", 0) >= stats.get("pool_max", 1)


class SessionCensus:
    def __init__(self, db: Database, timeout: float = 1.0) -> None:
        self._db = db
        self._timeout = timeout

    def count(self) -> dict[str, int] | None:
        """``dao.session_census``'s counts with ``webhooks_pending``/``_failing``/``_dead``, or None
        when the database did not answer in time."""
        if _pool_busy(self._db):
            # Every connection is serving requests: the gauges wait for a scrape that finds one
            # free, rather than queue behind (and be counted among) the requests that need it.
            log.warning("metrics: sessions not counted: every pooled database connection is in use")
            return None
        try:
            with self._db.connection(timeout=self._timeout) as conn, conn.transaction():
                dao.set_local_statement_timeout(conn, self._timeout)
                counts = dao.session_census(conn)
                webhooks = dao.webhook_census(conn)
        except ChunksvcError as exc:
            log.warning("metrics: sessions not counted within %ss: %s", self._timeout, exc.detail)
            return None
        counts["webhooks_pending"] = webhooks.pending_new + webhooks.failing
        counts["webhooks_failing"] = webhooks.failing
        counts["webhooks_dead"] = webhooks.dead
        return counts


class ClientLimitsCensus:
    """Every client's limits and use (``client_usage``), for the client gauges; None when the
    database did not answer within ``timeout`` (the scrape answers without them)."""

    def __init__(self, db: Database, quotas: QuotaService, rates: RateLimiter, timeout: float = 1.0) -> None:
        self._db = db
        self._quotas = quotas
        self._rates = rates
        self._timeout = timeout

    def read(self) -> list[ClientLimitSample] | None:
        if _pool_busy(self._db):  # as for the sessions gauges: the requests need them more
            log.warning("metrics: client limits not read: every pooled database connection is in use")
            return None
        try:
            with self._db.connection(timeout=self._timeout) as conn, conn.transaction():
                dao.set_local_statement_timeout(conn, self._timeout)
                rows = dao.client_usage(conn)
        except ChunksvcError as exc:
            log.warning("metrics: client limits not read within %ss: %s", self._timeout, exc.detail)
            return None
        samples = []
        for row in rows:
            usage = self._quotas.usage_of(row)
            rate = self._rates.resolve(row.rate_limit, row.rate_burst)
            samples.append(
                ClientLimitSample(
                    row.client_name,
                    usage.sessions_limit,
                    usage.sessions_used,
                    usage.bytes_limit,
                    usage.bytes_used,
                    rate.limit,
                )
            )
        return samples
