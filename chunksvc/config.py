"""Configuration from the environment, validated once at start-up.

A leaf module: it imports nothing from chunksvc but ``errors``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from chunksvc.errors import ConfigError

# S3 bucket naming rules (the minio SDK would otherwise fail later with a bare ValueError).
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

KiB = 1024
MiB = 1024 * KiB
# The longest CHUNKSVC_WEBHOOK_RETENTION: 100 years, in seconds.
_MAX_RETENTION = 100 * 365 * 24 * 3600
GiB = 1024 * MiB
TiB = 1024 * GiB

# gunicorn's own default for forwarded_allow_ips: a proxy on the same host.
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"


@dataclasses.dataclass(frozen=True)
class Limits:
    min_part_size: int = 5 * MiB
    max_part_size: int = 5 * GiB
    default_part_size: int = 8 * MiB
    max_parts: int = 10_000
    max_upload_size: int = 5 * TiB
    session_ttl: int = 24 * 3600  # seconds

    def validate(self) -> None:
        problems = []
        if self.min_part_size < 1:
            problems.append("CHUNKSVC_MIN_PART_SIZE must be at least 1")
        if not self.min_part_size <= self.default_part_size <= self.max_part_size:
            problems.append(
                "need CHUNKSVC_MIN_PART_SIZE <= CHUNKSVC_DEFAULT_PART_SIZE <= CHUNKSVC_MAX_PART_SIZE"
                f" (got {self.min_part_size} <= {self.default_part_size} <= {self.max_part_size})"
            )
        if self.max_parts < 1:
            problems.append("CHUNKSVC_MAX_PARTS must be at least 1")
        if self.max_upload_size < 1:
            problems.append("CHUNKSVC_MAX_UPLOAD_SIZE must be at least 1")
        # Every admitted size must fit in max_parts parts of at most max_part_size.
        if self.max_upload_size > self.max_parts * self.max_part_size:
            problems.append(
                f"CHUNKSVC_MAX_UPLOAD_SIZE ({self.max_upload_size}) is larger than "
                f"CHUNKSVC_MAX_PARTS * CHUNKSVC_MAX_PART_SIZE ({self.max_parts * self.max_part_size}):"
                " some admitted uploads could not be split into parts"
            )
        if self.session_ttl < 1:
            problems.append("CHUNKSVC_SESSION_TTL must be at least 1 second")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    """Where objects live: ``file`` (a directory) or ``s3`` (a bucket on MinIO/S3)."""

    kind: str  # "file" | "s3"
    root: Path | None = None
    endpoint: str | None = None  # host:port
    access_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)  # never in logs or tracebacks
    bucket: str | None = None
    secure: bool = True
    region: str = "us-east-1"

    @classmethod
    def from_url(cls, url: str) -> StorageSpec:
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ConfigError(f"CHUNKSVC_STORAGE_URL: file URL must be file:///absolute/path, got {url!r}")
            return cls(kind="file", root=Path(unquote(parts.path)))
        if parts.scheme in ("s3", "s3+http"):
            bucket = parts.path.strip("/")
            if not parts.hostname or not bucket or "/" in bucket:
                raise ConfigError("CHUNKSVC_STORAGE_URL: expected s3://ACCESS_KEY:SECRET_KEY@host:port/bucket")
            if not parts.username or parts.password is None:
                raise ConfigError("CHUNKSVC_STORAGE_URL: the S3 URL needs ACCESS_KEY:SECRET_KEY@")
            if not _BUCKET_NAME.match(bucket):
                raise ConfigError(
                    f"CHUNKSVC_STORAGE_URL: {bucket!r} is not a valid bucket name"
                    " (3-63 characters: lowercase letters, digits, dots and hyphens)"
                )
            host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
            endpoint = f"{host}:{parts.port}" if parts.port else host
            return cls(
                kind="s3",
                endpoint=endpoint,
                access_key=unquote(parts.username),
                secret_key=unquote(parts.password),
                bucket=bucket,
                secure=parts.scheme == "s3",
            )
        raise ConfigError(
            f"CHUNKSVC_STORAGE_URL: unsupported scheme {parts.scheme!r} (use file://, s3:// or s3+http://)"
        )

    def redacted(self) -> str:
        """A description safe to log: never the secret key."""
        if self.kind == "file":
            return f"file://{self.root}"
        scheme = "s3" if self.secure else "s3+http"
        return f"{scheme}://{self.access_key}:***@{self.endpoint}/{self.bucket}"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class TrustedProxies:
    """The peers whose ``X-Forwarded-For`` names the client (``CHUNKSVC_FORWARDED_ALLOW_IPS``).

    A comma-separated list of addresses or networks (``10.0.0.0/8``), or ``*`` for any peer (only
    where nothing but the proxy can reach the service). The same variable tells gunicorn whose
    ``X-Forwarded-Proto`` to believe, so the two never disagree.
    """

    networks: tuple[IPNetwork, ...] = ()
    trust_all: bool = False

    @classmethod
    def parse(cls, raw: str) -> TrustedProxies:
        networks = []
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            if item == "*":
                return cls(trust_all=True)
            try:
                networks.append(ipaddress.ip_network(item))  # strict, as gunicorn parses it
            except ValueError:
                raise ConfigError(
                    f"CHUNKSVC_FORWARDED_ALLOW_IPS: {item!r} is not an address or network"
                    " (e.g. 10.0.0.5, 10.0.0.0/8, *)"
                ) from None
        return cls(networks=tuple(networks))

    def trusts(self, address: str) -> bool:
        if self.trust_all:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a unix socket peer, say: not an address anyone configured
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """Who sent the request: ``peer``, unless a trusted proxy reports the client.

        ``X-Forwarded-For`` is read from the right: each trusted proxy appended the address it
        received from, so the first untrusted entry is the client as far as any trusted hop can
        vouch; whatever lies left of it the client itself wrote, and is ignored. An entry that is
        not an address ends the walk at the last hop that gave one.
        """
        if not forwarded_for or not self.trusts(peer):
            return peer
        address = peer
        for entry in reversed(forwarded_for.split(",")):
            candidate = entry.strip()
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return address
            address = candidate
            if not self.trusts(candidate):
                return candidate
        return address


# An origin as a browser sends it: scheme, host and an optional port, nothing after them.
_ORIGIN = re.compile(r"^https?://[^/?#\s,]+$")


@dataclasses.dataclass(frozen=True)
class CorsOrigins:
    """The browser origins allowed to call the API (``CHUNKSVC_CORS_ORIGINS``, contract v1.2).

    Comma-separated exact origins (``https://portal.example.com``), or ``*`` for any. Empty, the
    default, allows none: no response carries a CORS header. Origins are compared exactly, as the
    browser sends them (``https://portal.example.com:8443``; never a trailing slash or a path).
    """

    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def parse(cls, raw: str) -> CorsOrigins:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if items == ["*"]:
            return cls(any_origin=True)
        for item in items:
            if item == "*":
                raise ConfigError("CHUNKSVC_CORS_ORIGINS: `*` allows every origin; give it alone, not in a list")
            if not _ORIGIN.match(item):
                raise ConfigError(
                    f"CHUNKSVC_CORS_ORIGINS: {item!r} is not an origin"
                    " (scheme://host[:port], no path or trailing slash: https://portal.example.com)"
                )
        return cls(origins=frozenset(items))

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        return self.any_origin or origin in self.origins


@dataclasses.dataclass(frozen=True)
class Quotas:
    """Each client's default quotas (contract v1.2); `python -m chunksvc limits set` overrides
    them per client. High by default, so a deployment sees no change until an operator sets them."""

    sessions: int = 1000  # open sessions: INIT, IN_PROGRESS, COMPLETING
    bytes: int = 1 * TiB  # the sum of `size` over open sessions
    # Requests a second per client (CHUNKSVC_RATE_LIMIT), across every worker and host; 0: off.
    rate: float = 0.0
    # Requests a client may send at once beyond its rate (CHUNKSVC_RATE_BURST); 0: one second's
    # worth of its rate (at least 1).
    burst: int = 0

    def validate(self) -> None:
        if self.sessions < 0 or self.bytes < 0:
            raise ConfigError("CHUNKSVC_QUOTA_SESSIONS and CHUNKSVC_QUOTA_BYTES must be at least 0")
        if not (0 <= self.rate < 1e9) or self.burst < 0:
            raise ConfigError("CHUNKSVC_RATE_LIMIT and CHUNKSVC_RATE_BURST must be at least 0")


@dataclasses.dataclass(frozen=True)
class Config:
    # None: the embedded PostgreSQL under var_dir. Out of the repr: it may carry a password.
    database_url: str | None = dataclasses.field(repr=False)
    storage: StorageSpec
    limits: Limits = dataclasses.field(default_factory=Limits)
    quotas: Quotas = dataclasses.field(default_factory=Quotas)
    var_dir: Path = Path("var")
    bind: str = "127.0.0.1:8000"
    pool_min_size: int = 1
    pool_max_size: int = 8
    # psycopg's prepare_threshold for the pool's connections (CHUNKSVC_DB_PREPARE_THRESHOLD):
    # None, the default, never prepares a statement on the server. Server-side prepared statements
    # belong to a server connection, and behind a PgBouncer in transaction pooling mode (before
    # 1.21's max_prepared_statements; Debian 12 ships 1.18) the next execution may run on another
    # one ("prepared statement "_pg3_0" does not exist", or "already exists"). A number n prepares
    # each statement on its n-th execution on a connection (psycopg's default is 5): for direct
    # connections, or a PgBouncer that keeps prepared statements. It buys little since the part
    # path's two statements became PL/pgSQL functions (migration 0007), whose plans the server keeps
    # either way: PostgreSQL CPU per 4 KiB part 0.50 / 0.53 ms unset, 0.40 / 0.53 ms with 0 (before the
    # functions, 0.93-0.97 ms unset: python -m tools.bench --backends file --figures small --rounds 3,
    # with this unset and then 0, twice each; python -m tools.bench_pgbouncer --figures prepared
    # isolates it).
    db_prepare_threshold: int | None = None
    # Seconds a claim on shared work outlives its holder's last renewal: a completion's lease on
    # its session (a crashed assembler is taken over after it), and the reaper's on a sweep or on
    # the periodic run. Holders renew about once a second (completions) or every third of it.
    lease: int = 30
    # Request bodies are read and written in blocks of this size.
    block_size: int = 1 * MiB
    # Seconds a part body may send nothing before it is abandoned (a stalled client's thread is
    # freed). Long enough for any live link; bounds what a few dozen stalled clients can hold.
    body_timeout: float = 60.0
    # /readyz answers 503 while local storage has less free space than this (bytes): the host
    # can no longer take parts, and a load balancer should send them elsewhere.
    storage_min_free: int = 256 * MiB
    # Uploads larger than this complete in the background: complete answers 202 at once.
    sync_complete_max: int = 256 * MiB
    # On local storage, sessions whose parts are at least this large have them written in place
    # (one file per session, linked as the object: nothing copied at completion) and hashed as
    # they arrive. Smaller parts cost more in locking and per-part bookkeeping than a copy saves.
    # 0: never.
    in_place_min_part: int = 1 * MiB
    # On S3, where parts are sent straight into the session's staged object, their local copies
    # (hashed by the frontier: ``storage.spill``) are kept here; None: parts are not sent that way.
    spill_dir: Path | None = None
    # Background assemblies each worker process runs at once, and how often (seconds) each
    # worker looks for accepted completions no one is running (a host that died, say).
    background_assemblies: int = 1
    assembly_poll_interval: float = 5.0
    # Seconds between the reaper passes the server runs itself (one process at a time across all
    # hosts; the others skip that turn); 0: none, reap from cron only. See the README, Reaper.
    reap_interval: float = 300.0
    # Completion events. The signing key every endpoint's secret is derived from: hex in
    # CHUNKSVC_WEBHOOK_KEY (the same on every host), else read from this file, made on first use
    # (one host). Outside the database, so a dump of it cannot sign (README, Webhooks).
    webhook_key: str | None = dataclasses.field(default=None, repr=False)  # a secret: never in a repr
    webhook_key_file: Path = Path("var/webhook-signing.key")
    # Delivery attempts at once per worker process (failing endpoints share at most half), seconds
    # between looks for events other processes produced, and how long a failing delivery is
    # retried (from its first try) before it is dead.
    webhook_concurrency: int = 8
    webhook_poll_interval: float = 1.0
    webhook_retry_for: float = 24 * 3600.0
    # Seconds an event is kept once every delivery of it is delivered or dead (counted from the
    # event): then the reaper removes it with its deliveries. 0 keeps them all for ever.
    webhook_retention: int = 30 * 24 * 3600
    # Proxies whose X-Forwarded-For names the client in logs (default: the same host).
    trusted_proxies: TrustedProxies = dataclasses.field(
        default_factory=lambda: TrustedProxies.parse(DEFAULT_FORWARDED_ALLOW_IPS)
    )
    # Browser origins that may call /uploads and /tus (none by default: no CORS headers at all).
    cors: CorsOrigins = dataclasses.field(default_factory=CorsOrigins)
    # Upload tokens (POST .../tokens): seconds a token lives when the request names none, and the
    # most it may ask for (never past its session's expires_at either).
    token_ttl: int = 3600
    token_max_ttl: int = 24 * 3600

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        var_dir = Path(env.get("CHUNKSVC_VAR_DIR", "var")).resolve()
        storage_url = env.get("CHUNKSVC_STORAGE_URL") or f"file://{var_dir / 'storage'}"
        defaults = Limits()
        limits = Limits(
            min_part_size=_int(env, "CHUNKSVC_MIN_PART_SIZE", defaults.min_part_size),
            max_part_size=_int(env, "CHUNKSVC_MAX_PART_SIZE", defaults.max_part_size),
            default_part_size=_int(env, "CHUNKSVC_DEFAULT_PART_SIZE", defaults.default_part_size),
            max_parts=_int(env, "CHUNKSVC_MAX_PARTS", defaults.max_parts),
            max_upload_size=_int(env, "CHUNKSVC_MAX_UPLOAD_SIZE", defaults.max_upload_size),
            session_ttl=_int(env, "CHUNKSVC_SESSION_TTL", defaults.session_ttl),
        )
        quotas = Quotas(
            sessions=_int(env, "CHUNKSVC_QUOTA_SESSIONS", Quotas.sessions),
            bytes=_int(env, "CHUNKSVC_QUOTA_BYTES", Quotas.bytes),
            rate=_float(env, "CHUNKSVC_RATE_LIMIT", Quotas.rate),
            burst=_int(env, "CHUNKSVC_RATE_BURST", Quotas.burst),
        )
        config = cls(
            database_url=env.get("DATABASE_URL") or None,
            quotas=quotas,
            storage=StorageSpec.from_url(storage_url),
            limits=limits,
            var_dir=var_dir,
            bind=env.get("CHUNKSVC_BIND", "127.0.0.1:8000"),
            pool_min_size=_int(env, "CHUNKSVC_DB_POOL_MIN", 1),
            pool_max_size=_int(env, "CHUNKSVC_DB_POOL_MAX", 8),
            db_prepare_threshold=_optional_int(env, "CHUNKSVC_DB_PREPARE_THRESHOLD"),
            lease=_int(env, "CHUNKSVC_LEASE", 30),
            block_size=_int(env, "CHUNKSVC_BLOCK_SIZE", 1 * MiB),
            body_timeout=_int(env, "CHUNKSVC_BODY_TIMEOUT", 60),
            storage_min_free=_int(env, "CHUNKSVC_STORAGE_MIN_FREE", 256 * MiB),
            sync_complete_max=_int(env, "CHUNKSVC_SYNC_COMPLETE_MAX", 256 * MiB),
            in_place_min_part=_int(env, "CHUNKSVC_IN_PLACE_MIN_PART", 1 * MiB),
            spill_dir=Path(spill).resolve()
            if (spill := env.get("CHUNKSVC_SPILL_DIR", str(var_dir / "spill")))
            else None,
            background_assemblies=_int(env, "CHUNKSVC_BACKGROUND_ASSEMBLIES", 1),
            assembly_poll_interval=_int(env, "CHUNKSVC_ASSEMBLY_POLL", 5),
            reap_interval=_int(env, "CHUNKSVC_REAP_INTERVAL", 300),
            trusted_proxies=TrustedProxies.parse(env.get("CHUNKSVC_FORWARDED_ALLOW_IPS", DEFAULT_FORWARDED_ALLOW_IPS)),
            cors=CorsOrigins.parse(env.get("CHUNKSVC_CORS_ORIGINS", "")),
            token_ttl=_int(env, "CHUNKSVC_TOKEN_TTL", 3600),
            token_max_ttl=_int(env, "CHUNKSVC_TOKEN_MAX_TTL", 24 * 3600),
            webhook_key=env.get("CHUNKSVC_WEBHOOK_KEY") or None,
            webhook_key_file=Path(env.get("CHUNKSVC_WEBHOOK_KEY_FILE") or var_dir / "webhook-signing.key").resolve(),
            webhook_concurrency=_int(env, "CHUNKSVC_WEBHOOK_CONCURRENCY", 8),
            webhook_poll_interval=_int(env, "CHUNKSVC_WEBHOOK_POLL", 1),
            webhook_retry_for=_int(env, "CHUNKSVC_WEBHOOK_RETRY_FOR", 24 * 3600),
            webhook_retention=_int(env, "CHUNKSVC_WEBHOOK_RETENTION", 30 * 24 * 3600),
        )
        config.validate()
        return config

    def validate(self) -> None:
        self.limits.validate()
        self.quotas.validate()
        if not 1 <= self.pool_min_size <= self.pool_max_size:
            raise ConfigError("need 1 <= CHUNKSVC_DB_POOL_MIN <= CHUNKSVC_DB_POOL_MAX")
        if self.db_prepare_threshold is not None and self.db_prepare_threshold < 0:
            raise ConfigError("CHUNKSVC_DB_PREPARE_THRESHOLD must be unset (never prepare) or at least 0")
        if self.lease < 1:
            raise ConfigError("CHUNKSVC_LEASE must be at least 1 second")
        if not 4 * KiB <= self.block_size <= 64 * MiB:
            raise ConfigError("CHUNKSVC_BLOCK_SIZE must be between 4 KiB and 64 MiB")
        if self.body_timeout < 1:
            raise ConfigError("CHUNKSVC_BODY_TIMEOUT must be at least 1 second")
        if self.in_place_min_part < 0:
            raise ConfigError("CHUNKSVC_IN_PLACE_MIN_PART must not be negative")
        if self.sync_complete_max < 0:
            raise ConfigError("CHUNKSVC_SYNC_COMPLETE_MAX must not be negative")
        if self.background_assemblies < 1 or self.assembly_poll_interval < 1:
            raise ConfigError("CHUNKSVC_BACKGROUND_ASSEMBLIES and CHUNKSVC_ASSEMBLY_POLL must be at least 1")
        if self.reap_interval < 0:
            raise ConfigError("CHUNKSVC_REAP_INTERVAL must not be negative (0 turns the server's own reaper off)")
        if not 1 <= self.token_ttl <= self.token_max_ttl:
            raise ConfigError("need 1 <= CHUNKSVC_TOKEN_TTL <= CHUNKSVC_TOKEN_MAX_TTL")
        if self.storage_min_free < 0:
            raise ConfigError("CHUNKSVC_STORAGE_MIN_FREE must not be negative")
        if self.webhook_concurrency < 1 or self.webhook_poll_interval < 1 or self.webhook_retry_for < 1:
            raise ConfigError(
                "CHUNKSVC_WEBHOOK_CONCURRENCY, CHUNKSVC_WEBHOOK_POLL and CHUNKSVC_WEBHOOK_RETRY_FOR must be at least 1"
            )
        if not 0 <= self.webhook_retention <= _MAX_RETENTION:
            # Far larger, PostgreSQL's timestamp arithmetic overflows and every reaper pass fails.
            raise ConfigError(
                f"CHUNKSVC_WEBHOOK_RETENTION must be between 0 (keep every event for ever) and {_MAX_RETENTION}"
                " (100 years)"
            )
        if self.webhook_key is not None:
            try:
                key = bytes.fromhex(self.webhook_key.strip())
            except ValueError:
                key = b""
            if len(key) < 32:
                raise ConfigError("CHUNKSVC_WEBHOOK_KEY must be at least 64 hex digits (`openssl rand -hex 32`)")


_WORKER_CLASSES = ("gthread", "sync")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings (``gunicorn.conf.py``), read from the same environment as ``Config`` and
    checked the same way: a bad value stops the server with a message that names it."""

    bind: str
    worker_class: str
    workers: int
    threads: int
    timeout: int
    graceful_timeout: int
    keepalive: int
    max_requests: int
    max_requests_jitter: int
    control_socket: str | None
    forwarded_allow_ips: str
    log_level: str
    access_log: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cpu_count: int | None = None) -> ServerSettings:
        env = os.environ if environ is None else environ
        cores = cpu_count or os.cpu_count() or 1
        worker_class = env.get("CHUNKSVC_WORKER_CLASS", "gthread")
        if worker_class not in _WORKER_CLASSES:
            raise ConfigError(
                f"CHUNKSVC_WORKER_CLASS must be one of {', '.join(_WORKER_CLASSES)}, got {worker_class!r}"
            )
        log_level = env.get("CHUNKSVC_LOG_LEVEL", "info").lower()
        if log_level not in _LOG_LEVELS:
            raise ConfigError(f"CHUNKSVC_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
        forwarded = env.get("CHUNKSVC_FORWARDED_ALLOW_IPS", DEFAULT_FORWARDED_ALLOW_IPS)
        TrustedProxies.parse(forwarded)  # refused here, before gunicorn parses it its own way
        settings = cls(
            bind=env.get("CHUNKSVC_BIND", "127.0.0.1:8000"),
            worker_class=worker_class,
            workers=_int(env, "CHUNKSVC_WORKERS", cores + 1),
            threads=_int(env, "CHUNKSVC_THREADS", 64),
            timeout=_int(env, "CHUNKSVC_WORKER_TIMEOUT", 30 if worker_class == "gthread" else 900),
            graceful_timeout=_int(env, "CHUNKSVC_GRACEFUL_TIMEOUT", 60),
            keepalive=_int(env, "CHUNKSVC_KEEPALIVE", 15),
            max_requests=_int(env, "CHUNKSVC_MAX_REQUESTS", 10_000),
            max_requests_jitter=_int(env, "CHUNKSVC_MAX_REQUESTS_JITTER", 1_000),
            control_socket=env.get("CHUNKSVC_CONTROL_SOCKET") or None,
            forwarded_allow_ips=forwarded,
            log_level=log_level,
            access_log=env.get("CHUNKSVC_ACCESS_LOG", "-"),
        )
        problems = [
            f"{name} must be at least {least}, got {value}"
            for name, value, least in (
                ("CHUNKSVC_WORKERS", settings.workers, 1),
                ("CHUNKSVC_THREADS", settings.threads, 1),
                ("CHUNKSVC_WORKER_TIMEOUT", settings.timeout, 1),
                ("CHUNKSVC_GRACEFUL_TIMEOUT", settings.graceful_timeout, 1),
                ("CHUNKSVC_KEEPALIVE", settings.keepalive, 0),
                ("CHUNKSVC_MAX_REQUESTS", settings.max_requests, 0),
                ("CHUNKSVC_MAX_REQUESTS_JITTER", settings.max_requests_jitter, 0),
            )
            if value < least
        ]
        if problems:
            raise ConfigError("; ".join(problems))
        return settings


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    """An integer setting that may be left unset (or empty, or ``none``): None."""
    raw = env.get(name)
    if raw is None or raw.strip().lower() in ("", "none"):
        return None
    return _int(env, name, 0)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value:  # NaN compares false with everything, so validate() would pass it
        raise ConfigError(f"{name} must be a number, got {raw!r}")
    return value


def _optional_path(raw: str) -> Path | None:
    """A directory setting that may be set empty to turn its feature off."""
    return Path(raw).resolve() if raw else None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
