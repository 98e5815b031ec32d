"""gunicorn settings for chunksvc: `gunicorn -c gunicorn.conf.py chunksvc.wsgi:app`.

Every value can be overridden from the environment (CHUNKSVC_*), see the README.
"""

import multiprocessing
import os


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


bind = os.environ.get("CHUNKSVC_BIND", "127.0.0.1:8000")

# gthread: a part upload spends its time in socket reads, hashing and storage writes, which
# release the GIL, so a few threads per worker overlap them; processes use the other cores.
worker_class = os.environ.get("CHUNKSVC_WORKER_CLASS", "gthread")
workers = _env_int("CHUNKSVC_WORKERS", multiprocessing.cpu_count() + 1)
threads = _env_int("CHUNKSVC_THREADS", 4)

# A part of several hundred MiB over a slow link takes minutes; the worker is not stuck.
timeout = _env_int("CHUNKSVC_WORKER_TIMEOUT", 300)
graceful_timeout = _env_int("CHUNKSVC_GRACEFUL_TIMEOUT", 60)
keepalive = _env_int("CHUNKSVC_KEEPALIVE", 15)

# Recycle workers now and then so slow leaks cannot accumulate; jitter avoids all at once.
max_requests = _env_int("CHUNKSVC_MAX_REQUESTS", 10_000)
max_requests_jitter = _env_int("CHUNKSVC_MAX_REQUESTS_JITTER", 1_000)

# Headers are small in this API; refuse oversized request lines and headers early.
limit_request_line = 4094
limit_request_fields = 64
limit_request_field_size = 8190

# Behind the reverse proxy: trust X-Forwarded-* only from it.
forwarded_allow_ips = os.environ.get("CHUNKSVC_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

accesslog = os.environ.get("CHUNKSVC_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("CHUNKSVC_LOG_LEVEL", "info")
