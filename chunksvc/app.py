"""Wiring: ``create_app(config)`` builds every dependency and hands it to the resources.

No module-level state: tests build as many independent apps as they like.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import falcon
from falcon.routing import CompiledRouter

from chunksvc import migrations
from chunksvc.config import Config
from chunksvc.db import Database
from chunksvc.errors import ConfigError, DatabaseUnavailable
from chunksvc.metrics import Metrics
from chunksvc.resources import health, openapi, problems, tus, uploads
from chunksvc.resources.middleware import BearerAuth, Cors, RequestId
from chunksvc.resources.observability import MetricsResource, RequestTelemetry
from chunksvc.services.assembler import BackgroundAssembler
from chunksvc.services.auth import Authenticator, UploadTokens
from chunksvc.services.census import ClientLimitsCensus, SessionCensus
from chunksvc.services.completion import CompletionService
from chunksvc.services.events import Observers
from chunksvc.services.frontier import FRONTIER_LEASE, HashFrontier
from chunksvc.services.health import HealthService
from chunksvc.services.quotas import QuotaService
from chunksvc.services.ratelimit import RateLimiter
from chunksvc.services.reaper import PeriodicReaper, Reaper, ReaperSettings
from chunksvc.services.staging import Stager
from chunksvc.services.tus import TusService
from chunksvc.services.uploads import UploadService
from chunksvc.services.webhook_deliverer import DeliverySettings, WebhookDeliverer
from chunksvc.services.webhook_signing import SigningKey
from chunksvc.storage import Storage, open_storage
from chunksvc.storage.spill import Spill


def build_database(config: Config) -> Database:
    """The connection pool (not opened yet: each gunicorn worker opens its own after fork)."""
    if not config.database_url:
        raise ConfigError(
            "DATABASE_URL is not set; `make run` (python -m chunksvc serve) starts an embedded PostgreSQL"
        )
    return Database(
        config.database_url,
        config.pool_min_size,
        config.pool_max_size,
        prepare_threshold=config.db_prepare_threshold,
    )


def require_current_schema(config: Config) -> None:
    """Refuse to serve on a schema older than this release needs (``SchemaOutdated``).

    Only ``migrate`` changes the schema. A database that cannot be reached now is not a reason to
    refuse: the server starts as before and ``/readyz`` answers 503 until it is back.
    """
    if not config.database_url:
        return  # build_database refuses this with its own message
    try:
        migrations.require_current(config.database_url)
    except DatabaseUnavailable:
        logging.getLogger(__name__).warning("could not check the database schema: PostgreSQL did not answer")


WsgiApp = falcon.App[falcon.Request, falcon.Response]


def create_app(
    config: Config,
    *,
    db: Database | None = None,
    storage: Storage | None = None,
    metrics: Metrics | None = None,
) -> WsgiApp:
    """The WSGI application. ``db``/``storage``/``metrics`` may be passed in to share them (tests, CLI)."""
    return build(config, db=db, storage=storage, metrics=metrics).app


class Service(NamedTuple):
    """The WSGI application and the threads each server process runs beside it (gunicorn.conf.py
    starts and stops them in every worker)."""

    app: WsgiApp
    assembler: BackgroundAssembler
    reaper: PeriodicReaper
    deliverer: WebhookDeliverer


def build(
    config: Config,
    *,
    db: Database | None = None,
    storage: Storage | None = None,
    metrics: Metrics | None = None,
) -> Service:
    """The WSGI application with its background assembler, periodic reaper and webhook deliverer."""
    if db is None:
        db = build_database(config)
    if metrics is None:
        metrics = Metrics.for_process()
    if storage is None:
        storage = open_storage(config.storage)
    storage.validate_limits(config.limits)

    render_session = uploads.SessionRenderer(storage.bucket)
    # Completion events: delivered from the outbox by this thread pool, woken at once when a
    # session ends in this process (the services report endings to it as to the metrics).
    deliverer = WebhookDeliverer(
        db,
        SigningKey.load(config.webhook_key, config.webhook_key_file, create=False),
        uploads.EventRenderer(render_session),
        DeliverySettings(
            concurrency=config.webhook_concurrency,
            poll_interval=config.webhook_poll_interval,
            retry_for=config.webhook_retry_for,
        ),
        events=metrics,
    )
    events = Observers([metrics, deliverer])
    quotas = QuotaService(db, config.quotas)
    # The whole-file SHA-256 carried on as parts arrive (for parts written in place), and where the
    # store builds objects from stored keys (S3), each object staged as its parts pass.
    # Its lease no longer than the completion lease: a completion waits out a killed holder's.
    stager = Stager(db, storage.staged) if storage.staged is not None else None
    # There, parts are sent straight into the staging, from local copies the frontier then hashes.
    spill = (
        Spill(config.spill_dir, keep_free=config.storage_min_free)
        if stager is not None and config.spill_dir is not None
        else None
    )
    frontier = HashFrontier(
        db,
        storage,
        config.block_size,
        lease=min(config.lease, FRONTIER_LEASE),
        min_part=config.in_place_min_part,
        stager=stager,
        spill=spill,
    )
    upload_service = UploadService(
        db,
        storage,
        config.limits,
        config.block_size,
        events=events,
        quotas=quotas,
        frontier=frontier,
        stager=stager,
        spill=spill,
    )
    completion = CompletionService(
        db,
        storage,
        config.limits,
        config.block_size,
        events=events,
        # Half the pool: completions hold a connection for their whole assembly.
        max_assemblies=max(1, config.pool_max_size // 2),
        sync_complete_max=config.sync_complete_max,
        lease=config.lease,
        frontier=frontier,
        stager=stager,
    )
    assembler = BackgroundAssembler(completion, db, config.background_assemblies, config.assembly_poll_interval)
    # The reaper pass every CHUNKSVC_REAP_INTERVAL seconds, by one process at a time across all
    # hosts, its figures in this worker's metrics (so in /metrics with no cron to set up).
    reaper = PeriodicReaper(
        db,
        Reaper(
            db,
            storage,
            completion,
            ReaperSettings(lease=config.lease, webhook_retention=config.webhook_retention),
            events=events,
            spill=spill,
        ),
        config.reap_interval,
        metrics,
        lease=config.lease,
    )
    # Sessions by status, counted from the database by whichever worker answers a scrape.
    metrics.session_gauges.census = SessionCensus(db).count
    router = CompiledRouter()
    rate_limiter = RateLimiter(db, config.quotas, refused=metrics.request_rate_limited)
    authenticator = Authenticator(db)
    bearer_auth = BearerAuth(authenticator, rate_limiter=rate_limiter)
    # /tus/ (contract v1.2) authenticates as /uploads does, under the same rate limit; its
    # protocol checks come after.
    tus_auth = BearerAuth(authenticator, prefix=tus.PREFIX, rate_limiter=rate_limiter)
    # Each client's limits and use, read from the database by whichever worker answers a scrape.
    metrics.client_gauges.read = ClientLimitsCensus(db, quotas, rate_limiter).read
    app = falcon.App(
        middleware=(
            RequestId(),
            RequestTelemetry(router, metrics, db.stats, config.trusted_proxies),
            # Before authentication: a browser's preflight carries no credentials.
            Cors(config.cors),
            bearer_auth,
            tus_auth,
            tus.TusProtocol(),
        ),
        router=router,
        # Bodies are read by the resources themselves (parts stream; JSON is parsed strictly).
        request_type=falcon.Request,
    )
    app.req_options.auto_parse_form_urlencoded = False
    app.resp_options.default_media_type = falcon.MEDIA_JSON
    problems.install(app)
    # Paths under /uploads that no route matches: 401 before their 404, as on the routes.
    app.add_sink(bearer_auth.unrouted, bearer_auth.sink_prefix)
    app.add_sink(tus_auth.unrouted, tus_auth.sink_prefix)

    app.add_route("/healthz", health.Healthz())
    app.add_route("/readyz", health.Readyz(HealthService(db, storage, min_free=config.storage_min_free)))
    app.add_route("/metrics", MetricsResource(metrics, db.stats))
    app.add_route("/openapi.json", openapi.OpenApi(config.limits))
    app.add_route("/uploads/limits", uploads.LimitsResource(quotas, rate_limiter))
    app.add_route("/uploads/sessions", uploads.SessionsResource(upload_service, render_session))
    app.add_route("/uploads/sessions/{session_id}", uploads.SessionResource(upload_service, render_session))
    app.add_route("/uploads/sessions/{session_id}/parts", uploads.PartsResource(upload_service))
    app.add_route(
        "/uploads/sessions/{session_id}/parts/{part_number}", uploads.PartResource(upload_service, config.body_timeout)
    )
    app.add_route(
        "/uploads/sessions/{session_id}/complete", uploads.CompleteResource(completion, assembler, render_session)
    )
    app.add_route(
        "/uploads/sessions/{session_id}/tokens",
        uploads.TokensResource(UploadTokens(db, config.token_ttl, config.token_max_ttl)),
    )
    tus_service = TusService(
        db, storage, config.limits, config.block_size, upload_service, completion, assembler, events=events
    )
    app.add_route(tus.PREFIX + "/", tus.TusUploadsResource(tus_service, config.body_timeout))
    app.add_route(tus.PREFIX + "/{upload_id}", tus.TusUploadResource(tus_service, config.body_timeout))
    return Service(app, assembler, reaper, deliverer)
