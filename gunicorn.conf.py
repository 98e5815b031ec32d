"""gunicorn settings for chunksvc: `gunicorn -c gunicorn.conf.py chunksvc.wsgi:app`.

Every value can be overridden from the environment (CHUNKSVC_*), see the README.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from gunicorn import glogging

from chunksvc.config import ServerSettings
from chunksvc.errors import ConfigError
from chunksvc.logs import logging_config

try:
    settings = ServerSettings.from_env()
except ConfigError as exc:
    raise SystemExit(f"chunksvc: {exc}") from None

bind = settings.bind

# gthread, cores+1 processes of 8 threads. A part upload spends its time in socket reads, hashing
# and storage writes, which release the GIL, so threads overlap them; and a sync worker is held by
# one body for as long as its client takes to send it, so a few slow clients stall everything else.
# Measured with `python -m tools.bench_workers --rounds 5 --config sync:3:1
# --config gthread:3:4 --config gthread:3:8` (2 CPUs, shared and noisy; 8 MiB parts on disk storage;
# median of 5 rounds; healthz = GET /healthz latency while the parts stream):
#   clients          sync 3x1                  gthread 3x4               gthread 3x8
#   4 fast           234 MB/s, healthz 51 ms   214 MB/s, healthz 4 ms    509 MB/s, healthz 3 ms
#   16 fast          295 MB/s, healthz 252 ms  249 MB/s, healthz 10 ms   595 MB/s, healthz 8 ms
#   6 at 8 MB/s      47 MB/s, healthz 1030 ms  48 MB/s, healthz 1.2 ms   48 MB/s, healthz 1.5 ms
# (An earlier, noisier run: sync with 5 workers, healthz 252 ms with 16 clients and up to 1 s with
# 6 slow ones.)
#
# 64 threads, not 8: a thread is also what a stalled client holds. A body that sends nothing for
# CHUNKSVC_BODY_TIMEOUT (60 s) is abandoned, but a request head that never ends holds its thread
# until the client leaves (only a proxy's client_header_timeout defends against that; see the
# README). Measured with `python -m tools.slow_clients` (2 workers; 30 connections
# stalled mid-body and 30 mid-head, then 10 honest uploads with a 30 s client timeout):
#   8 threads, no body timeout: 0 of 10 finished; 8 threads: 0 of 10; 32: 5 of 10 (one worker had
#   taken most stalled connections); 64: 10 of 10, p50 0.09 s.
# An idle thread costs little; a busy one holds at most 4 blocks (CHUNKSVC_BLOCK_SIZE) and a
# database connection only for its few statements, so the pool stays at 8 (CHUNKSVC_DB_POOL_MAX).
# A completion holds its connection for the whole assembly, so at most half the pool assembles at
# once per worker; further completions wait up to 30 s for a slot, then answer a retryable 503.
worker_class = settings.worker_class
workers = settings.workers
threads = settings.threads

# A gthread worker reports to the master from its main loop, whatever its threads are doing, so the
# timeout only catches a wedged process and can stay short. A sync worker reports only between
# requests: its timeout must outlast the longest part upload or assembly, or the master kills it.
timeout = settings.timeout
graceful_timeout = settings.graceful_timeout
keepalive = settings.keepalive

# Recycle workers now and then so slow leaks cannot accumulate; jitter avoids all at once.
max_requests = settings.max_requests
max_requests_jitter = settings.max_requests_jitter

# Headers are small in this API; refuse oversized request lines and headers early.
limit_request_line = 4094
limit_request_fields = 64
limit_request_field_size = 8190

# gunicorn's control socket (for gunicornc) defaults to one path per user, which every server that
# user runs would share; it is opened only when asked for, at a path of its own.
if settings.control_socket:
    control_socket = settings.control_socket
else:
    control_socket_disable = True

# Behind the reverse proxy: trust X-Forwarded-* only from it. The application reads the same
# variable for X-Forwarded-For (the client address in its logs); gunicorn for X-Forwarded-Proto.
forwarded_allow_ips = settings.forwarded_allow_ips

# JSON logs (chunksvc.logs): gunicorn's error log and the application's logs on stderr; one access
# line per request, written by the application (it knows the route, client, session, part and
# request id, which gunicorn's access log cannot), on stdout or in CHUNKSVC_ACCESS_LOG ("" for none).
# gunicorn's own access log is therefore off. Requests gunicorn refuses before the application
# sees them (oversized request line or headers) appear in the error log instead.
loglevel = settings.log_level
errorlog = "-"
accesslog = None
logconfig_dict = logging_config(loglevel, settings.access_log)


class _NoAccessLineLogger(glogging.Logger):
    """gunicorn's logger without its access line. Given a logging config, gunicorn gathers the
    line's fields on every request and only then hands them to its access logger, which drops
    them (chunksvc.logs): 3% of a worker's GIL time per 4 KiB part (py-spy --gil)."""

    @property
    def access_log_enabled(self) -> bool:
        return False

    def access(self, resp, req, environ, request_time) -> None:
        return None


logger_class = _NoAccessLineLogger

# Metrics: each worker keeps its values in files of this directory and /metrics merges them all
# (prometheus_client multiprocess mode). prometheus_client reads the variable when first imported,
# so it is set here, in the master, before any worker imports the application. The default is one
# directory per master, so two servers on one host never mix (or wipe) each other's values.
_DEFAULT_METRICS_DIR = os.path.join(tempfile.gettempdir(), f"chunksvc-metrics-{os.getpid()}")
metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _DEFAULT_METRICS_DIR)


def on_starting(server):
    """Start from zero: no values left by an earlier server (a reused pid, a configured directory)."""
    if server.cfg.statsd_host:
        # gunicorn switches to its statsd logger only when logger_class is its default one.
        raise SystemExit(
            "chunksvc: statsd_host is not supported (gunicorn.conf.py sets its own logger_class, which"
            " gunicorn's statsd logger would need to replace); scrape GET /metrics instead"
        )
    # Before any worker forks: a schema older than this release needs stops the server here,
    # with the message that says to run `migrate` (each worker checks again as it boots).
    from chunksvc.app import require_current_schema
    from chunksvc.config import Config
    from chunksvc.errors import ChunksvcError
    from chunksvc.migrations import MigrationError

    try:
        require_current_schema(Config.from_env())
    except (MigrationError, ChunksvcError) as exc:  # an old schema, or a configuration workers refuse too
        raise SystemExit(f"chunksvc: {exc}") from None
    directory = Path(metrics_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def post_worker_init(worker):
    """Open this worker's own connection pool (a pool must never cross a fork), so that its
    connections are being made before the first request needs one; start the worker's background
    assembler, periodic reaper and webhook deliverer (threads: made after the fork, as they must be).

    Not post_fork: without preload_app the application is not imported yet there, and importing
    it there would run before the worker installs its signal handlers (a SIGTERM during boot was
    lost and shutdown waited the whole graceful_timeout) and before it switches user and applies
    raw_env. This hook runs in the worker right after gunicorn loaded chunksvc.wsgi:app.
    """
    from chunksvc import wsgi

    wsgi.db.open()
    wsgi.assembler.start()
    wsgi.reaper.start()
    wsgi.deliverer.start()


def worker_exit(server, worker):
    """Close the pool on the way out, so PostgreSQL sees the connections end rather than drop."""
    wsgi = sys.modules.get("chunksvc.wsgi")
    if wsgi is not None:
        # The assembler first: it gives back its completion leases, which other workers wait
        # for; the deliverer does not wait for its attempts (they are sent again later).
        wsgi.assembler.stop()
        wsgi.reaper.stop()
        wsgi.deliverer.stop()
        wsgi.db.close()


def child_exit(server, worker):
    """Drop the dead worker's gauges (its counters and histograms stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, metrics_dir)


def on_exit(server):
    if metrics_dir == _DEFAULT_METRICS_DIR:
        shutil.rmtree(metrics_dir, ignore_errors=True)
