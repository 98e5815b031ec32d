"""Prometheus metrics: one ``Metrics`` object per app counts what the HTTP layer and the services report.

Under gunicorn each worker is a process of its own. With ``PROMETHEUS_MULTIPROC_DIR`` set (by
gunicorn.conf.py, before any worker imports prometheus_client) every value lives in a file of that
directory, and ``/metrics``, whichever worker answers it, merges the files of all workers.
Without it (tests, one process) each ``Metrics`` has a private registry, so apps never share values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from chunksvc.errors import ConfigError
from chunksvc.services import states
from chunksvc.services.events import UploadEvents

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From a healthz ping to a multi-GiB part over a slow link.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
ASSEMBLY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)

PART_OUTCOMES = ("accepted", "duplicate", "conflicting", "rejected")
SESSION_EVENTS = ("created", "completed", "aborted", "expired", "failed")
# Methods outside this set share one label value: clients must not be able to mint series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
REAPER_OUTCOMES = ("succeeded", "failed")
WEBHOOK_OUTCOMES = ("delivered", "failed", "dead")
# From a delivery on the first try (milliseconds) to one after a day of retries.
WEBHOOK_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 21600, 86400)
# Webhook deliveries by state (see SessionGauges), as the census names them.
WEBHOOK_STATES = (("pending", "webhooks_pending"), ("failing", "webhooks_failing"), ("dead", "webhooks_dead"))

Census = Callable[[], Mapping[str, int] | None]


class SessionGauges:
    """Gauges of what the database holds now, counted once per scrape by whichever process
    answers it. A custom collector on the exposition registry, not a ``Gauge``: in multiprocess
    mode each worker's gauge would be a file of its own, and the scrape would add up (or pick
    among) stale copies of one database-wide figure.
    """

    def __init__(self) -> None:
        self.census: Census | None = None  # set by the app (chunksvc.services.census); none: no gauges

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> list[GaugeMetricFamily]:
        if self.census is None:
            return []
        counts = self.census()
        by_status, awaiting, up, deliveries = self._families()
        up.add_metric([], 0 if counts is None else 1)
        if counts is None:
            return [up]
        for status in states.LIVE:  # sessions not ended yet, by status as clients see it
            by_status.add_metric([status], counts.get(status, 0))
        awaiting.add_metric(["expire"], counts.get("overdue", 0))
        awaiting.add_metric(["purge"], counts.get("unpurged", 0))
        for state, key in WEBHOOK_STATES:
            deliveries.add_metric([state], counts.get(key, 0))
        return [by_status, awaiting, up, deliveries]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "chunksvc_sessions_by_status",
                "Sessions not ended, by status as clients see it (an open session"
                " past its expiry counts as awaiting the reaper instead), read from the database at this scrape",
                labels=["status"],
            ),
            GaugeMetricFamily(
                "chunksvc_sessions_awaiting_reaper",
                "Sessions with reaper work pending, by work: expire (open"
                " sessions past their expiry), purge (ended sessions whose stored bytes are not removed yet)",
                labels=["work"],
            ),
            GaugeMetricFamily(
                "chunksvc_session_gauges_up",
                "1 if the sessions gauges were read from the database at this scrape,"
                " 0 if it did not answer in time (they are left out)",
            ),
            GaugeMetricFamily(
                "chunksvc_webhook_deliveries",
                "Webhook deliveries by state, read from the database at this scrape: pending (not"
                " tried yet or under way), failing (pending after a failed attempt), dead (given up)",
                labels=["state"],
            ),
        )


@dataclasses.dataclass(frozen=True)
class ClientLimitSample:
    """One client's limits and use, for the client gauges (a rate of 0: no rate limit)."""

    client: str
    sessions_limit: int
    sessions_used: int
    bytes_limit: int
    bytes_used: int
    rate_limit: float


class ClientLimitGauges:
    """Each client's limits and use of them, read from the database at each scrape (like
    ``SessionGauges``, and for the same reason), for alerting on a client near its quota:
    ``chunksvc_client_used / chunksvc_client_limit`` by ``client`` and ``limit``."""

    def __init__(self) -> None:
        self.read: Callable[[], list[ClientLimitSample] | None] | None = None  # set by the app

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> list[GaugeMetricFamily]:
        samples = self.read() if self.read is not None else None
        if samples is None:
            return []
        limits, used = self._families()
        for sample in samples:
            limits.add_metric([sample.client, "sessions"], sample.sessions_limit)
            limits.add_metric([sample.client, "bytes"], sample.bytes_limit)
            limits.add_metric([sample.client, "rate"], sample.rate_limit)
            used.add_metric([sample.client, "sessions"], sample.sessions_used)
            used.add_metric([sample.client, "bytes"], sample.bytes_used)
        return [limits, used]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "chunksvc_client_limit",
                "Each client's limits, read from the database at this scrape: open sessions, open bytes,"
                " requests a second (rate; 0: no rate limit)",
                labels=["client", "limit"],
            ),
            GaugeMetricFamily(
                "chunksvc_client_used",
                "Each client's use of its quotas, read from the database at this scrape: open sessions, open bytes",
                labels=["client", "limit"],
            ),
        )


class _WorkerFilesCollector(MultiProcessCollector):
    """prometheus_client's merge of every worker's files, minus two races with starting and dying
    workers: a file a new worker has created but not yet sized (0 bytes: reading it raises), and a
    file removed by ``mark_process_dead`` between the listing and the read (read again)."""

    # prometheus_client leaves MultiProcessCollector unannotated: its calls are ignored by name.
    def collect(self) -> Iterable[Metric]:
        try:
            return self._merge()
        except FileNotFoundError:  # a dead worker's file went between the listing and the read
            return self._merge()

    def _merge(self) -> Iterable[Metric]:
        merged: Iterable[Metric] = self.merge(self._sized_files(), accumulate=True)  # type: ignore[no-untyped-call]
        return merged

    def _sized_files(self) -> list[str]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_size > 0:  # sized (and zero-filled) before anything is written
                    files.append(path)
        return files


class Metrics(UploadEvents):
    def __init__(self, registry: CollectorRegistry, exposition: CollectorRegistry | None = None) -> None:
        """Metrics registered in ``registry``; ``/metrics`` renders ``exposition`` (default: the same)."""
        self._exposition = registry if exposition is None else exposition

        self.http_requests = Counter(
            "chunksvc_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "chunksvc_http_request_duration_seconds",
            "Time from the request's arrival to its response",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        # livesum: requests in flight on the whole host; a dead worker's share disappears with it.
        self.http_in_progress = Gauge(
            "chunksvc_http_requests_in_progress",
            "Requests being handled now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.parts = Counter(
            "chunksvc_parts",
            "Part uploads by outcome: accepted (new), duplicate (same bytes again), healed"
            " (same bytes again, replacing recorded bytes lost from storage), conflicting (different bytes,"
            " 409 part_conflict) or rejected (any other error)",
            ["outcome"],
            registry=registry,
        )
        self.parts_rejected = Counter(
            "chunksvc_parts_rejected",
            "Part uploads answered with an error other than part_conflict, by problem code",
            ["code"],
            registry=registry,
        )
        # By client name: clients are made by operators (keys create), so the labels stay few.
        self.rate_limited = Counter(
            "chunksvc_rate_limited",
            "Requests refused with 429 rate_limited (CHUNKSVC_RATE_LIMIT, limits set --rate), by client",
            ["client"],
            registry=registry,
        )
        self.part_bytes = Counter(
            "chunksvc_part_bytes_received",
            "Bytes of part bodies received whole and recorded, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.sessions = Counter(
            "chunksvc_sessions",
            "Upload session events: created, completed, aborted, expired (by the reaper), failed,"
            " reopened (a completion found parts lost from storage and asked for them again)",
            ["event"],
            registry=registry,
        )
        self.assemblies_running = Gauge(
            "chunksvc_assemblies_in_progress",
            "Assemblies running now (in requests and in the background)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.parts_lost = Counter(
            "chunksvc_parts_lost",
            "Recorded parts whose stored bytes were found missing at completion (and asked"
            " for again); anything but 0 means storage lost bytes behind the service's back",
            registry=registry,
        )
        self.assembly_duration = Histogram(
            "chunksvc_assembly_duration_seconds",
            "Time to assemble and verify an upload, by outcome",
            ["outcome"],
            buckets=ASSEMBLY_BUCKETS,
            registry=registry,
        )
        self.reaper_runs = Counter(
            "chunksvc_reaper_runs",
            "Reaper runs by outcome (failed: something could not be cleaned)",
            ["outcome"],
            registry=registry,
        )
        self.reaper_work = Counter(
            "chunksvc_reaper_work",
            "What reaper runs did, by kind of work",
            ["kind"],
            registry=registry,
        )
        self.reaper_skips = Counter(
            "chunksvc_reaper_skipped",
            "Turns of the server's periodic reaper this host's workers let pass because"
            " another process (on any host) was running a pass",
            registry=registry,
        )
        self.reaper_duration = Histogram(
            "chunksvc_reaper_run_duration_seconds",
            "Time a reaper run took",
            buckets=ASSEMBLY_BUCKETS,
            registry=registry,
        )
        self.webhook_attempts = Counter(
            "chunksvc_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered (a 2xx), failed (to be retried), dead"
            " (failed and given up: counted in failed too)",
            ["outcome"],
            registry=registry,
        )
        self.webhook_latency = Histogram(
            "chunksvc_webhook_delivery_latency_seconds",
            "Time from a session's state change to its event's delivery (retries included)",
            buckets=WEBHOOK_LATENCY_BUCKETS,
            registry=registry,
        )
        # livesum: each worker has its own pool; the sums are the host's connections.
        self.pool_connections = Gauge(
            "chunksvc_db_pool_connections",
            "Pooled PostgreSQL connections by state (in_use, idle)",
            ["state"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_max = Gauge(
            "chunksvc_db_pool_max_connections",
            "Most connections the pools may open",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_waiting = Gauge(
            "chunksvc_db_pool_requests_waiting",
            "Requests waiting for a pooled connection now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_queued = Counter(
            "chunksvc_db_pool_queued_requests",
            "Connection requests that had to wait for a free connection",
            registry=registry,
        )
        self.pool_errors = Counter(
            "chunksvc_db_pool_request_errors",
            "Connection requests that failed (timed out waiting)",
            registry=registry,
        )
        # The pool's own counters are cumulative; these are the values last turned into increments.
        self._pool_seen = {"requests_queued": 0, "requests_errors": 0}
        self._pool_lock = threading.Lock()

        # Counted at scrape time from the database, once the app gives it a census.
        self.session_gauges = SessionGauges()
        self._exposition.register(self.session_gauges)
        self.client_gauges = ClientLimitGauges()
        self._exposition.register(self.client_gauges)

        # Series that exist from the start read 0 rather than being absent.
        for outcome in REAPER_OUTCOMES:
            self.reaper_runs.labels(outcome)
        for outcome in PART_OUTCOMES:
            self.parts.labels(outcome)
        for outcome in ("accepted", "duplicate"):
            self.part_bytes.labels(outcome)
        for event in SESSION_EVENTS:
            self.sessions.labels(event)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_attempts.labels(outcome)

    @classmethod
    def for_process(cls, environ: Mapping[str, str] = os.environ) -> Metrics:
        """Multiprocess metrics when ``PROMETHEUS_MULTIPROC_DIR`` is set, else a private registry."""
        directory = environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return cls(CollectorRegistry())
        if values.ValueClass is values.MutexValue:
            # prometheus_client chooses where values live when it is first imported.
            raise ConfigError("PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported")
        exposition = CollectorRegistry()
        _WorkerFilesCollector(exposition, path=directory)  # type: ignore[no-untyped-call]
        # This process's values go to files only; registering them for exposition would count them twice.
        return cls(CollectorRegistry(), exposition)

    def exposition(self) -> bytes:
        return generate_latest(self._exposition)

    # --- HTTP ---------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.http_in_progress.inc()

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self.http_in_progress.dec()
        self.http_requests.labels(method, route, status).inc()
        self.http_duration.labels(method, route, status).observe(seconds)

    def part_rejected(self, code: str) -> None:
        if code == "part_conflict":
            self.parts.labels("conflicting").inc()
        else:
            self.parts.labels("rejected").inc()
            self.parts_rejected.labels(code).inc()

    def request_rate_limited(self, client: str) -> None:
        self.rate_limited.labels(client).inc()

    def pool_sampled(self, stats: Mapping[str, int]) -> None:
        """Record a ``psycopg_pool`` ``get_stats()`` snapshot (empty while the pool is closed)."""
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        with self._pool_lock:
            self.pool_connections.labels("in_use").set(size - available)
            self.pool_connections.labels("idle").set(available)
            self.pool_max.set(stats.get("pool_max", 0))
            self.pool_waiting.set(stats.get("requests_waiting", 0))
            for name, counter in (("requests_queued", self.pool_queued), ("requests_errors", self.pool_errors)):
                value = stats.get(name, 0)
                if value > self._pool_seen[name]:
                    counter.inc(value - self._pool_seen[name])
                self._pool_seen[name] = value

    # --- services (UploadEvents) ----------------------------------------------------------------

    def session_created(self) -> None:
        self.sessions.labels("created").inc()

    def part_stored(self, *, created: bool, size: int, healed: bool = False) -> None:
        outcome = "accepted" if created else "healed" if healed else "duplicate"
        self.parts.labels(outcome).inc()
        self.part_bytes.labels(outcome).inc(size)

    def assembly_running(self, change: int) -> None:
        self.assemblies_running.inc(change)

    def session_reopened(self, lost_parts: int) -> None:
        self.sessions.labels("reopened").inc()
        self.parts_lost.inc(lost_parts)

    def session_completed(self, assembly_seconds: float) -> None:
        self.sessions.labels("completed").inc()
        self.assembly_duration.labels("completed").observe(assembly_seconds)

    def session_failed(self, assembly_seconds: float) -> None:
        self.sessions.labels("failed").inc()
        self.assembly_duration.labels("failed").observe(assembly_seconds)

    def session_aborted(self) -> None:
        self.sessions.labels("aborted").inc()

    def sessions_expired(self, count: int) -> None:
        self.sessions.labels("expired").inc(count)

    def reaper_run(self, *, succeeded: bool, counts: Mapping[str, int], seconds: float) -> None:
        self.reaper_runs.labels("succeeded" if succeeded else "failed").inc()
        self.reaper_duration.observe(seconds)
        for kind, count in counts.items():
            self.reaper_work.labels(kind).inc(count)

    def reaper_skipped(self) -> None:
        self.reaper_skips.inc()

    def webhook_delivered(self, latency: float | None) -> None:
        self.webhook_attempts.labels("delivered").inc()
        if latency is not None:
            self.webhook_latency.observe(latency)

    def webhook_failed(self, *, dead: bool) -> None:
        self.webhook_attempts.labels("failed").inc()
        if dead:
            self.webhook_attempts.labels("dead").inc()
