"""``python -m chunksvc``: the ops interface (migrate, keys, sessions, webhooks, limits, deliver, psql, serve, reap).

With no ``DATABASE_URL`` every command uses the embedded PostgreSQL under ``CHUNKSVC_VAR_DIR``
(``./var``), started on demand and stopped when the last process using it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from chunksvc import dao, embedded, migrations
from chunksvc.config import Config
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError, ConfigError
from chunksvc.metrics import Metrics
from chunksvc.resources.uploads import EventRenderer, SessionRenderer
from chunksvc.rows import OpsSessionRow
from chunksvc.services import rules, states
from chunksvc.services.auth import Client, KeyManager
from chunksvc.services.completion import CompletionService
from chunksvc.services.quotas import QuotaService
from chunksvc.services.ratelimit import RateLimiter
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.services.uploads import UploadService
from chunksvc.services.webhook_deliverer import DeliverySettings, WebhookDeliverer
from chunksvc.services.webhook_registry import WebhookRegistry
from chunksvc.services.webhook_signing import SigningKey
from chunksvc.storage import open_storage
from chunksvc.storage.spill import Spill


@contextlib.contextmanager
def database_url(config: Config) -> Iterator[str]:
    """The configured database, or the embedded one (kept running while the block runs)."""
    if config.database_url:
        yield config.database_url
        return
    data_dir = (config.var_dir / "pgdata").resolve()
    embedded.require()  # without the embedded extra: what to do, before any warning about a new database
    if not embedded.is_initialised(data_dir):
        warn_new_embedded_database(data_dir)
    server = embedded.start(data_dir)
    yield embedded.ensure_database(server.get_uri(), embedded.DATABASE)


def require_schema(config: Config, url: str) -> None:
    """Refuse a configured database whose schema is older than this release (``SchemaOutdated``):
    only ``migrate`` changes it, since the release in service may still be running on it. The
    embedded default under CHUNKSVC_VAR_DIR is this checkout's own, and is migrated here."""
    if config.database_url:
        migrations.require_current(url)
    else:
        migrations.migrate(url)


def warn_new_embedded_database(data_dir: Path) -> None:
    """Say loudly that this command is about to create a database nobody else may be using: run
    from another directory or without the server's CHUNKSVC_VAR_DIR, a key created here is one
    the server has never heard of (401)."""
    print(
        f"chunksvc: WARNING: no DATABASE_URL, and no embedded database in {data_dir} yet:"
        " creating a new, empty one there now.\n"
        "chunksvc: WARNING: a server using another CHUNKSVC_VAR_DIR (or a DATABASE_URL) will not see"
        " anything done here (an API key created here is refused there with 401). Run this command"
        " with the server's CHUNKSVC_VAR_DIR (or DATABASE_URL) if that is what you meant.",
        file=sys.stderr,
        flush=True,
    )


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    with database_url(config) as url:
        applied = migrations.migrate(url)
    print("applied: " + ", ".join(applied) if applied else "database schema is up to date")
    return 0


def _keys(url: str) -> tuple[KeyManager, Database]:
    db = Database(url, min_size=1, max_size=1)
    return KeyManager(db), db


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    with database_url(config) as url:
        require_schema(config, url)
        manager, db = _keys(url)
        try:
            if args.action == "create":
                key, prefix = manager.create(args.name)
                print(f"API key for client {args.name!r} (prefix {prefix}); it is shown only once:")
                print(key)  # the last line is the key alone, for scripts
            elif args.action == "list":
                print(f"{'CLIENT':<24} {'PREFIX':<14} {'CREATED':<20} {'LAST USED':<20} REVOKED")
                for key_row in manager.list_keys():
                    print(
                        f"{key_row.client_name:<24} {key_row.prefix:<14} {_when(key_row.created_at):<20}"
                        f" {_when(key_row.last_used_at):<20} {_when(key_row.revoked_at)}"
                    )
            else:
                revoked = manager.revoke(args.target)
                if not revoked:
                    print(f"no active key has prefix or client name {args.target!r}", file=sys.stderr)
                    return 1
                for revoked_key in revoked:
                    print(f"revoked {revoked_key.prefix} ({revoked_key.client_name})")
        finally:
            db.close()
    return 0


def cmd_sessions(config: Config, args: argparse.Namespace) -> int:
    """The operator's view of any client's uploads: list, show (parts received and missing,
    assembly progress), abort (as the client's own DELETE would)."""
    with database_url(config) as url:
        require_schema(config, url)
        db = Database(url, min_size=1, max_size=2)
        storage = open_storage(config.storage) if args.action == "abort" else None
        try:
            if args.action == "list":
                with db.connection() as conn:
                    listed = dao.ops_list_sessions(conn, args.client, args.status, args.limit)
                print(
                    f"{'ID':<36}  {'CLIENT':<16} {'STATUS':<11} {'PARTS':>11} {'SIZE':>14}  {'UPDATED':<19}  FILENAME"
                )
                for s in listed:
                    parts = f"{s.received_parts}/{s.total_parts}"
                    print(
                        f"{s.id!s:<36}  {s.client_name:<16} {s.effective_status:<11} {parts:>11}"
                        f" {s.size:>14}  {_when(s.updated_at):<19}  {s.filename}"
                    )
                return 0
            session_id = rules.parse_session_id(args.id)
            with db.connection() as conn:
                session = dao.ops_get_session(conn, session_id)
                if session is None:
                    print(f"no session {args.id}", file=sys.stderr)
                    return 1
                missing = dao.missing_parts(conn, session_id, session.total_parts, 20)
            if args.action == "show":
                _show_session(session, missing)
            else:
                assert storage is not None  # opened above for abort
                uploads = UploadService(db, storage, config.limits, config.block_size)
                uploads.abort(Client(id=session.client_id, name=session.client_name), args.id)
                print(f"aborted {args.id} (client {session.client_name}, was {session.effective_status})")
        finally:
            if storage is not None:
                storage.close()
            db.close()
    return 0


def _show_session(s: OpsSessionRow, missing: list[int]) -> None:
    absent = s.total_parts - s.received_parts
    fields: list[tuple[str, object]] = [
        ("id", s.id),
        ("client", s.client_name),
        ("status", s.effective_status),
        ("filename", s.filename),
        ("size", s.size),
        ("part size", s.part_size),
        ("parts", f"{s.received_parts} of {s.total_parts} received ({s.received_bytes} bytes)"),
        ("missing", (", ".join(map(str, missing)) + (" ..." if absent > len(missing) else "")) if absent else "none"),
        ("sha256", s.sha256 or "-"),
        ("created", _when(s.created_at)),
        ("updated", _when(s.updated_at)),
        ("expires", _when(s.expires_at)),
    ]
    if s.effective_status == states.COMPLETING:
        done = s.assembled_bytes or 0
        fields.append(("assembled", f"{done} of {s.size} bytes ({100 * done // s.size}%)"))
        # A lease that ran out is taken over by the next poll of any worker (CHUNKSVC_LEASE).
        lease = f"{s.completion_owner} until {_when(s.completion_lease_until)}" if s.completion_owner else "none"
        fields.append(("lease", lease))
    if s.object_key:
        fields.append(("object", f"{s.object_key} ({s.object_size} bytes, sha256 {s.object_sha256})"))
    for name, value in fields:
        print(f"{name + ':':<11} {value}")


def _signing_key(config: Config) -> SigningKey:
    """The webhook signing key. Made (in the key file) only on the embedded default, where one
    host serves; with a DATABASE_URL ops give every host the same CHUNKSVC_WEBHOOK_KEY."""
    key = SigningKey.load(config.webhook_key, config.webhook_key_file, create=config.database_url is None)
    if key is None:
        raise ConfigError(
            f"no webhook signing key: set CHUNKSVC_WEBHOOK_KEY (`openssl rand -hex 32`, the same on every"
            f" host) or put one in {config.webhook_key_file} (CHUNKSVC_WEBHOOK_KEY_FILE)"
        )
    return key


def cmd_webhooks(config: Config, args: argparse.Namespace) -> int:
    """A client's webhook endpoints: add (prints the secret), list (with delivery state), events
    (deliveries, to find one to redeliver), remove, rotate (a new secret; the old one signs beside
    it for a while), redeliver an event."""
    with database_url(config) as url:
        require_schema(config, url)
        db = Database(url, min_size=1, max_size=1)
        try:
            # Only a new secret needs the key (add, rotate); the rest work on any host.
            making_secret = args.action in ("add", "rotate")
            registry = WebhookRegistry(
                db,
                _signing_key(config)
                if making_secret
                else SigningKey.load(config.webhook_key, config.webhook_key_file, create=False),
            )
            if args.action == "add":
                endpoint, secret = registry.add(args.client, args.url)
                print(f"webhook endpoint {endpoint.id} for client {endpoint.client_name!r}: {endpoint.url}")
                print("its signing secret (verify Chunksvc-Signature with it); it is shown only once:")
                print(secret)  # the last line is the secret alone, for scripts
            elif args.action == "list":
                print(f"{'ID':>5}  {'CLIENT':<20} {'PENDING':>8} {'FAILING':>8} {'DEAD':>6}  {'CREATED':<19}  URL")
                for row in registry.endpoints(args.client):
                    notes = [f"secret roll until {_when(row.previous_until)}"] if row.previous_until else []
                    if registry.key_id is not None and row.key_id != registry.key_id:
                        notes.append("its secret comes from another signing key: hosts with this key do not send")
                    print(
                        f"{row.id:>5}  {row.client_name:<20} {row.pending:>8} {row.failing:>8} {row.dead:>6}"
                        f"  {_when(row.created_at):<19}  {row.url}" + "".join(f"  ({note})" for note in notes)
                    )
            elif args.action == "set-url":
                endpoint = registry.set_url(args.id, args.url)
                print(f"webhook endpoint {endpoint.id} now sends to {endpoint.url} (same secret, pending events kept)")
            elif args.action == "events":
                session_id = rules.parse_session_id(args.session) if args.session else None
                listed = registry.deliveries(
                    endpoint_id=args.endpoint, session_id=session_id, state=args.state, limit=args.limit
                )
                print(
                    f"{'EVENT':<36}  {'TYPE':<17} {'SESSION':<36}  {'ENDPOINT':>8} {'STATE':<9}"
                    f" {'TRIES':>5}  {'CREATED':<19}  LAST ERROR"
                )
                for d in listed:
                    state = "failing" if d.state == "pending" and d.last_error else d.state
                    print(
                        f"{d.event_id!s:<36}  {d.type:<17} {d.session_id!s:<36}  {d.endpoint_id:>8} {state:<9}"
                        f" {d.attempts:>5}  {_when(d.event_created_at):<19}  {d.last_error or '-'}"
                    )
            elif args.action == "remove":
                dropped = registry.remove(args.id)
                print(f"removed webhook endpoint {args.id} ({dropped} undelivered events dropped)")
            elif args.action == "rotate":
                endpoint, secret = registry.rotate(args.id, round(args.overlap))
                until = f"until {_when(endpoint.previous_until)} UTC" if endpoint.previous_until else "no longer"
                print(f"webhook endpoint {endpoint.id}: new signing secret; the previous one also signs {until}")
                print(secret)
            else:
                endpoints = registry.redeliver(args.event_id)
                print(f"event {args.event_id} due again to endpoint(s) {', '.join(map(str, endpoints))}")
        finally:
            db.close()
    return 0


def cmd_deliver(config: Config, args: argparse.Namespace) -> int:
    """Deliver the webhook events due now, then exit (the server's deliverers do this all along)."""
    logging.basicConfig(level=logging.WARNING, format="chunksvc: %(levelname)s %(message)s")
    with database_url(config) as url:
        require_schema(config, url)
        settings = DeliverySettings(concurrency=config.webhook_concurrency, retry_for=config.webhook_retry_for)
        db = Database(url, min_size=1, max_size=settings.concurrency + 1)
        try:
            deliverer = WebhookDeliverer(
                db,
                _signing_key(config),
                EventRenderer(SessionRenderer(config.storage.bucket)),
                settings,
                events=Metrics.for_process(),
            )
            counts = deliverer.deliver_due()
        finally:
            db.close()
    print(
        f"delivered {counts.delivered}, failed {counts.failed - counts.dead} (to be retried),"
        f" dead {counts.dead} (failed, not to be retried)"
    )
    return 1 if counts.failed else 0


def cmd_limits(config: Config, args: argparse.Namespace) -> int:
    """Per-client quotas and request rates: overrides of CHUNKSVC_QUOTA_SESSIONS / _BYTES and
    CHUNKSVC_RATE_LIMIT / _BURST, and use."""
    with database_url(config) as url:
        require_schema(config, url)
        db = Database(url, min_size=1, max_size=1)
        quotas = QuotaService(db, config.quotas)
        rates = RateLimiter(db, config.quotas)
        try:
            with db.connection() as conn:
                if args.action == "set":
                    given = (args.sessions, args.bytes, args.rate, args.burst)
                    if all(value is None for value in given):
                        print("limits set: give --sessions, --bytes, --rate and/or --burst", file=sys.stderr)
                        return 2
                    if not dao.set_client_limits(conn, args.client, *given):
                        print(f"no client is named {args.client!r}", file=sys.stderr)
                        return 1
                elif args.action == "reset":
                    if not dao.client_exists(conn, args.client):
                        print(f"no client is named {args.client!r}", file=sys.stderr)
                        return 1
                    dao.reset_client_limits(conn, args.client)
                rows = dao.client_usage(conn, client_name=getattr(args, "client", None))
            if args.action == "show" and args.client and not rows:
                print(f"no client is named {args.client!r}", file=sys.stderr)
                return 1
            print(f"{'CLIENT':<24} {'SESSIONS':>21} {'BYTES':>33} {'RATE/S':>9} {'BURST':>6}  OVERRIDES")
            for row in rows:
                usage = quotas.usage_of(row)
                rate = rates.resolve(row.rate_limit, row.rate_burst)
                overrides = ", ".join(
                    f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in (
                        ("sessions", row.max_sessions),
                        ("bytes", row.max_bytes),
                        ("rate", row.rate_limit),
                        ("burst", row.rate_burst),
                    )
                    if value is not None
                )
                rate_text, burst_text = (f"{rate.limit:g}", str(rate.burst)) if rate.on else ("off", "-")
                print(
                    f"{row.client_name:<24} {usage.sessions_used:>10} / {usage.sessions_limit:<8}"
                    f" {usage.bytes_used:>16} / {usage.bytes_limit:<14} {rate_text:>9} {burst_text:>6}"
                    f"  {overrides or '(defaults)'}"
                )
        finally:
            db.close()
    return 0


def cmd_psql(config: Config, args: argparse.Namespace) -> int:
    """psql on the configured database, or on the embedded one (started for the session)."""
    psql = shutil.which("psql")
    if psql is None:
        print("chunksvc: psql is not installed (Debian: apt-get install postgresql-client)", file=sys.stderr)
        return 2
    with database_url(config) as url:
        print(f"chunksvc: psql on {embedded.describe(url)}", file=sys.stderr)
        return subprocess.run([psql, url, *args.psql_args], check=False).returncode


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    """Migrate, then run gunicorn exactly as ops do, on the embedded defaults where unset."""
    with database_url(config) as url:
        require_schema(config, url)
        # Before the workers start, so each finds the signing key (made here on the embedded default).
        SigningKey.load(config.webhook_key, config.webhook_key_file, create=config.database_url is None)
        env = dict(os.environ, DATABASE_URL=url, CHUNKSVC_STORAGE_URL=_storage_url(config))
        if config.storage.root is not None:  # local-disk storage
            config.storage.root.mkdir(parents=True, exist_ok=True)
        print(f"chunksvc: serving on http://{config.bind} (storage {config.storage.redacted()})")
        print("chunksvc: get an API key with `make api-key NAME=me` (or python -m chunksvc keys create me)")
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
        child = subprocess.Popen([gunicorn, "-c", args.config, "chunksvc.wsgi:app"], env=env)

        # Pass SIGTERM/SIGINT on to gunicorn and wait for it, so that this process exits
        # normally afterwards and the embedded PostgreSQL is stopped with it.
        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return child.wait()


def cmd_reap(config: Config, args: argparse.Namespace) -> int:
    """One reaper pass; prints its one-line summary (after a dry run, first what it would touch);
    exit 1 if anything could not be cleaned."""
    logging.basicConfig(level=logging.WARNING, format="chunksvc: %(levelname)s %(message)s")
    settings = ReaperSettings(
        batch_size=args.batch_size,
        orphan_grace=args.orphan_grace,
        completing_lease=args.completing_lease,
        dry_run=args.dry_run,
        lease=config.lease,
        webhook_retention=config.webhook_retention,
    )
    with database_url(config) as url:
        require_schema(config, url)
        # Two connections: a sweep holds one while its lease is renewed on the other.
        db = Database(url, min_size=1, max_size=2)
        storage = open_storage(config.storage)
        try:
            # Counted in PROMETHEUS_MULTIPROC_DIR when it is set (the reaper on a serving host).
            metrics = Metrics.for_process()
            completion = CompletionService(
                db, storage, config.limits, config.block_size, events=metrics, lease=config.lease
            )
            spill = Spill(config.spill_dir) if config.spill_dir is not None and storage.staged is not None else None
            result = Reaper(db, storage, completion, settings, events=metrics, spill=spill).run()
        finally:
            storage.close()
            db.close()
    if result.dry_run:
        # What each phase would touch, by session id and storage key (the first few of each), then the counts.
        print("reap --dry-run: what a pass would do now (nothing was changed)")
        print("\n".join(result.listing() or ["nothing to do"]))
    print(result.summary())
    return 1 if result.errors else 0


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {raw!r}")
    return value


def _non_negative_int(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {raw!r}")
    return int(raw)


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number of requests a second >= 0, got {raw!r}")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {raw!r}")
    return value


def _storage_url(config: Config) -> str:
    return os.environ.get("CHUNKSVC_STORAGE_URL") or f"file://{config.storage.root}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chunksvc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help="apply pending SQL migrations").set_defaults(func=cmd_migrate)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="mint a key for a client (shown once)")
    create.add_argument("name", help="client name")
    keys.add_parser("list", help="list keys: client, prefix, created, last used, revoked")
    revoke = keys.add_parser("revoke", help="revoke a key by prefix, or all keys of a client by name")
    revoke.add_argument("target", help="key prefix (csk_xxxxxxxx) or client name")
    for sub in keys.choices.values():
        sub.set_defaults(func=cmd_keys)

    sessions = commands.add_parser("sessions", help="any client's uploads: list, show, abort").add_subparsers(
        dest="action", required=True
    )
    listing = sessions.add_parser("list", help="sessions, newest first")
    listing.add_argument("--client", help="only this client's (by name)")
    listing.add_argument("--status", choices=states.ALL, help="only sessions in this status (as clients see it)")
    listing.add_argument("--limit", type=_positive_int, default=50)
    show = sessions.add_parser("show", help="one session: parts received and missing, assembly progress")
    show.add_argument("id")
    abort = sessions.add_parser("abort", help="abort a session and remove its parts (as its client's DELETE)")
    abort.add_argument("id")
    for sub in sessions.choices.values():
        sub.set_defaults(func=cmd_sessions)

    webhooks = commands.add_parser(
        "webhooks", help="clients' webhook endpoints: add, list, events, set-url, remove, rotate, redeliver"
    ).add_subparsers(dest="action", required=True)
    add = webhooks.add_parser("add", help="register an endpoint for a client (prints its signing secret, once)")
    add.add_argument("client", help="client name")
    add.add_argument("url", help="http:// or https:// URL the events are POSTed to")
    webhook_list = webhooks.add_parser("list", help="endpoints with their deliveries: pending, failing, dead")
    webhook_list.add_argument("client", nargs="?", help="only this client's")
    events = webhooks.add_parser("events", help="deliveries, newest first: find an event to redeliver, see failures")
    events.add_argument("--endpoint", type=_positive_int, help="only to this endpoint")
    events.add_argument("--session", help="only of this session")
    events.add_argument("--state", choices=("pending", "failing", "dead", "delivered"), help="only in this state")
    events.add_argument("--limit", type=_positive_int, default=50)
    remove = webhooks.add_parser("remove", help="stop sending to an endpoint (its undelivered events are dropped)")
    remove.add_argument("id", type=_positive_int)
    set_url = webhooks.add_parser("set-url", help="move an endpoint to a new URL (secret and pending events kept)")
    set_url.add_argument("id", type=_positive_int)
    set_url.add_argument("url")
    rotate = webhooks.add_parser("rotate", help="a new signing secret; the old one signs beside it for --overlap")
    rotate.add_argument("id", type=_positive_int)
    rotate.add_argument(
        "--overlap",
        type=_seconds,
        default=24 * 3600,
        metavar="SECONDS",
        help="how long the previous secret keeps signing too (default a day; 0: stop at once)",
    )
    redeliver = webhooks.add_parser("redeliver", help="send an event again (a dead one, say), now")
    redeliver.add_argument("event_id")
    for sub in webhooks.choices.values():
        sub.set_defaults(func=cmd_webhooks)

    limits = commands.add_parser(
        "limits",
        help="per-client quotas and rates: set, show, reset (defaults: CHUNKSVC_QUOTA_*, CHUNKSVC_RATE_*)",
    ).add_subparsers(dest="action", required=True)
    limits_set = limits.add_parser("set", help="override a client's quotas or rate (others keep the defaults)")
    limits_set.add_argument("client", help="client name")
    limits_set.add_argument("--sessions", type=_non_negative_int, help="open sessions at most")
    limits_set.add_argument("--bytes", type=_non_negative_int, help="bytes of open sessions at most")
    limits_set.add_argument("--rate", type=_rate, help="requests a second at most (0: no limit)")
    limits_set.add_argument("--burst", type=_non_negative_int, help="requests at once beyond the rate (0: a second's)")
    limits_show = limits.add_parser("show", help="each client's limits and use (or one client's)")
    limits_show.add_argument("client", nargs="?", help="only this client")
    limits_reset = limits.add_parser("reset", help="back to the configured defaults")
    limits_reset.add_argument("client", help="client name")
    for sub in limits.choices.values():
        sub.set_defaults(func=cmd_limits)

    deliver = commands.add_parser("deliver", help="deliver the webhook events due now")
    deliver.add_argument(
        "--once", action="store_true", required=True, help="deliver what is due, then exit (the server runs it always)"
    )
    deliver.set_defaults(func=cmd_deliver)

    psql = commands.add_parser(
        "psql",
        help="psql on the database (the embedded one under CHUNKSVC_VAR_DIR if unset); further"
        " arguments go to psql, e.g. -c 'SELECT 1'",
    )
    psql.set_defaults(func=cmd_psql)

    serve = commands.add_parser("serve", help="migrate and run gunicorn (embedded defaults when unset)")
    serve.add_argument("--config", default="gunicorn.conf.py", help="gunicorn configuration file")
    serve.set_defaults(func=cmd_serve)

    defaults = ReaperSettings()
    reap = commands.add_parser(
        "reap",
        help="expire, re-drive and purge sessions, sweep orphaned bytes, prune old completion events"
        " (cron-safe on several hosts)",
    )
    reap.add_argument("--dry-run", action="store_true", help="change nothing; report what would be done")
    reap.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="rows or keys per batch")
    reap.add_argument(
        "--orphan-grace",
        type=_seconds,
        default=defaults.orphan_grace,
        metavar="SECONDS",
        help="sweep orphaned keys and unfinished writes only when older than this",
    )
    reap.add_argument(
        "--completing-lease",
        type=_seconds,
        default=defaults.completing_lease,
        metavar="SECONDS",
        help="re-drive a completion with a dead assembler only when untouched this long",
    )
    reap.set_defaults(func=cmd_reap)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "psql":
        args.psql_args = extra[1:] if extra[:1] == ["--"] else extra  # psql's own options pass through
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        config = Config.from_env()
        command: Callable[[Config, argparse.Namespace], int] = args.func
        return command(config, args)
    except ChunksvcError as exc:
        print(f"chunksvc: {exc.detail}", file=sys.stderr)
        return 2
    except migrations.SchemaOutdated as exc:
        print(f"chunksvc: {exc}", file=sys.stderr)
        return 2
    except migrations.MigrationError as exc:
        print(f"chunksvc: migration failed: {exc}", file=sys.stderr)
        return 2
