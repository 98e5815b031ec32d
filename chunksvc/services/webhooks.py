"""Completion events: webhook endpoints, their signing secrets, and delivery from the outbox.

The outbox is written by PostgreSQL itself (the trigger of migration 0005): every change of a
session to ``COMPLETED``, ``FAILED``, ``ABORTED`` or ``EXPIRED`` adds, in the same transaction,
one event and one pending delivery per endpoint of its client. This module reads that outbox:

- ``WebhookRegistry``: the ops commands (add, list, remove, rotate a secret, redeliver).
- ``WebhookDeliverer``: claims due deliveries (``FOR UPDATE SKIP LOCKED`` and a lease, so any
  number of processes on any number of hosts share the work and, while all is well, never send
  one twice), POSTs each with no transaction or pooled connection held, and records the outcome:
  delivered on a 2xx, else due again after an exponential backoff with jitter, dead once it has
  been retried for ``retry_for`` seconds. At most ``per_endpoint`` attempts to one endpoint run
  at once in a process, so a slow or dead endpoint holds a few of its threads and no more.

Secrets. HMAC needs the sender to hold the secret, so it must be recoverable; it is not stored.
Each endpoint's secret is derived, ``HMAC-SHA256(signing key, nonce)``, from a random per-endpoint
nonce in the database and the server's signing key, which lives outside it (``CHUNKSVC_WEBHOOK_KEY``
or a key file). A database dump alone (a backup, a replica, a read-only SQL hole) holds nonces
only and cannot sign. Each endpoint records the ``key_id`` of the key that derived its secret: a
process with another key does not claim its deliveries (it could only send signatures that fail).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError, ConfigError, InvalidRequest
from chunksvc.rows import (
    ClaimedDeliveryRow,
    SessionRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEndpointStateRow,
)
from chunksvc.services.events import UploadEvents

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Chunksvc-Signature"
SECRET_PREFIX = "whsec_"
KEY_BYTES = 32
# How long a deliverer remembers an endpoint failed (or was slow) after its last try.
FAILURE_MEMORY = 3600.0
MAX_URL_LENGTH = 2048

# (delivery, the session it carries) -> the event's JSON body, as bytes. Rendering is the HTTP
# representation's business (chunksvc.resources); the app hands the deliverer its renderer.
EventRenderer = Callable[[ClaimedDeliveryRow, SessionRow], bytes]


class SigningKey:
    """The server's webhook signing key: every endpoint's secret is derived from it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ConfigError(f"the webhook signing key must be at least {KEY_BYTES} bytes")
        self._key = key
        # Names the key without revealing it: endpoints record which key derived their secret.
        self.key_id = hmac.new(key, b"chunksvc webhook key id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_hex(cls, text: str, source: str) -> SigningKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError:
            raise ConfigError(f"{source} must be hex (64 digits or more: `openssl rand -hex 32`)") from None

    @classmethod
    def load(cls, hex_key: str | None, key_file: Path, *, create: bool) -> SigningKey | None:
        """The key from ``CHUNKSVC_WEBHOOK_KEY`` if set, else from ``key_file``, which is made
        (mode 0600, a fresh random key) when absent and ``create`` says so; None when absent."""
        if hex_key:
            return cls.from_hex(hex_key, "CHUNKSVC_WEBHOOK_KEY")
        with contextlib.suppress(FileNotFoundError):
            return cls.from_hex(key_file.read_text("ascii"), str(key_file))
        if not create:
            return None
        key_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as written:
            written.write(secrets.token_hex(KEY_BYTES) + "\n")
            written.flush()
            os.fsync(written.fileno())
        try:
            # link, not rename: two processes creating it at once keep the first one's key.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, key_file)
        finally:
            temporary.unlink()
        # The directory too: a key lost to a power cut would strand every endpoint made with it.
        directory = os.open(key_file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        log.warning(
            "made a new webhook signing key in %s (set CHUNKSVC_WEBHOOK_KEY on every host to share one)", key_file
        )
        return cls.from_hex(key_file.read_text("ascii"), str(key_file))

    def secret(self, nonce: bytes) -> str:
        """The endpoint's secret: what its receiver verifies with (the whole string, as UTF-8)."""
        derived = hmac.new(self._key, b"chunksvc webhook secret\x00" + nonce, hashlib.sha256).digest()
        return SECRET_PREFIX + base64.urlsafe_b64encode(derived).decode("ascii").rstrip("=")


def sign(secrets_in_use: list[str], timestamp: int, body: bytes) -> str:
    """The ``Chunksvc-Signature`` header: ``t=<unix>,v1=<hex>``, one ``v1`` per secret in use
    (two only during a secret roll, the newest first)."""
    signed = str(timestamp).encode("ascii") + b"." + body
    signatures = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets_in_use]
    return ",".join([f"t={timestamp}", *(f"v1={signature}" for signature in signatures)])


def validate_url(raw: str) -> str:
    """An endpoint URL ops may register: http or https, with a host, no fragment."""
    url = raw.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"the URL must be http:// or https:// with a host, got {raw!r}")
    if parts.fragment or len(url) > MAX_URL_LENGTH or any(c.isspace() for c in url):
        raise InvalidRequest(f"the URL must have no fragment or spaces and at most {MAX_URL_LENGTH} characters")
    if parts.username is not None or parts.password is not None:
        # Never sent (the signature authenticates chunksvc), and it would be shown by `list`.
        raise InvalidRequest("the URL must not carry a user name or password")
    try:
        parts.port  # noqa: B018 - urllib checks the port only when asked
    except ValueError:
        raise InvalidRequest(f"the URL's port is not a number in range: {raw!r}") from None
    return url


class WebhookRegistry:
    """The ops commands: endpoints and their secrets, and redelivery of events. Only making a
    secret (``add``, ``rotate``) needs the signing key; looking and managing do not."""

    def __init__(self, db: Database, signing_key: SigningKey | None) -> None:
        self._db = db
        self._key = signing_key
        self.key_id = signing_key.key_id if signing_key else None

    def _signing_key(self) -> SigningKey:
        if self._key is None:
            raise ConfigError("no webhook signing key (CHUNKSVC_WEBHOOK_KEY): a secret cannot be made without it")
        return self._key

    def add(self, client_name: str, url: str) -> tuple[WebhookEndpointRow, str]:
        """The new endpoint and its secret (shown once: it is not stored)."""
        key = self._signing_key()
        nonce = secrets.token_bytes(KEY_BYTES)
        with self._db.connection() as conn:
            endpoint = dao.insert_webhook_endpoint(conn, client_name, validate_url(url), nonce, key.key_id)
        if endpoint is None:
            raise InvalidRequest(f"no client named {client_name!r} (a client exists once it has an API key)")
        return endpoint, key.secret(nonce)

    def endpoints(self, client_name: str | None = None) -> list[WebhookEndpointStateRow]:
        with self._db.connection() as conn:
            return dao.list_webhook_endpoints(conn, client_name)

    def remove(self, endpoint_id: int) -> int:
        """Stop sending to the endpoint; the count of its undelivered events dropped."""
        with self._db.transaction() as conn:
            if not dao.remove_webhook_endpoint(conn, endpoint_id):
                raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
            return dao.drop_pending_deliveries(conn, endpoint_id)

    def rotate(self, endpoint_id: int, overlap: int) -> tuple[WebhookEndpointRow, str]:
        """A new secret for the endpoint; the old one signs beside it for ``overlap`` seconds."""
        key = self._signing_key()
        nonce = secrets.token_bytes(KEY_BYTES)
        with self._db.connection() as conn:
            current = dao.get_webhook_endpoint(conn, endpoint_id)
            if current is not None and current.key_id != key.key_id and overlap > 0:
                # The previous secret would be derived with this key, not the one that made it:
                # a signature no receiver could verify.
                raise InvalidRequest(
                    f"endpoint {endpoint_id}'s secret came from another signing key: rotate with --overlap 0"
                    " (the old secret cannot be derived with this key)"
                )
            endpoint = dao.rotate_webhook_secret(conn, endpoint_id, nonce, key.key_id, overlap)
        if endpoint is None:
            raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
        return endpoint, key.secret(nonce)

    def set_url(self, endpoint_id: int, url: str) -> WebhookEndpointRow:
        """Move the endpoint: its secret and its undelivered events go with it."""
        with self._db.connection() as conn:
            endpoint = dao.set_webhook_url(conn, endpoint_id, validate_url(url))
        if endpoint is None:
            raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
        return endpoint

    def deliveries(
        self,
        *,
        endpoint_id: int | None = None,
        session_id: UUID | None = None,
        state: str | None = None,
        limit: int = 50,
    ) -> list[WebhookDeliveryRow]:
        """Deliveries, newest event first (``state``: pending, failing, dead or delivered)."""
        with self._db.connection() as conn:
            return dao.list_webhook_deliveries(
                conn, endpoint_id=endpoint_id, session_id=session_id, state=state, limit=limit
            )

    def redeliver(self, event_id: UUID | str) -> list[int]:
        """Send the event again to its endpoints still in use, now; their ids."""
        if isinstance(event_id, str):
            try:
                event_id = UUID(event_id)
            except ValueError:
                raise InvalidRequest(f"an event id is a UUID (as in Chunksvc-Event-Id), got {event_id!r}") from None
        with self._db.connection() as conn:
            endpoints = dao.redeliver_webhook_event(conn, event_id)
        if endpoints is None:
            raise InvalidRequest(
                f"no event {event_id}: never made, or pruned with its deliveries (events whose deliveries"
                " all ended are kept CHUNKSVC_WEBHOOK_RETENTION seconds)"
            )
        if not endpoints:
            raise InvalidRequest(
                f"no delivered or dead delivery of event {event_id} to an endpoint still in use"
                " (a pending one is being sent anyway: `webhooks events` shows it)"
            )
        return endpoints


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    concurrency: int = 8  # attempts at once in this process
    per_endpoint: int = 2  # of which at most this many to one endpoint
    timeout: float = 10.0  # seconds for the whole attempt: connect, send, the answer's head
    lease: float = 60.0  # a claimed delivery is due again after this (its deliverer died)
    poll_interval: float = 1.0  # seconds between looks for due work when nothing wakes us
    retry_for: float = 24 * 3600.0  # retried this long (from the first try), then dead
    first_retry: float = 10.0  # backoff: about this after the first failure, doubling ...
    max_retry: float = 3600.0  # ... up to this; each with +-20% jitter

    @property
    def failing_share(self) -> int:
        """Slots endpoints that are failing may hold at once (one each); the rest are kept for
        endpoints that answer."""
        return max(1, self.concurrency // 2)

    def retry_in(self, attempts: int) -> float:
        """Seconds until the next try after ``attempts`` failed ones (jittered, so the retries
        of a burst of events to an endpoint that was down do not arrive together)."""
        base = min(self.first_retry * 2.0 ** min(attempts - 1, 30), self.max_retry)
        return base * random.uniform(0.8, 1.2)


@dataclasses.dataclass
class DeliveryCounts:
    delivered: int = 0
    failed: int = 0
    dead: int = 0


class WebhookDeliverer(UploadEvents):
    """Delivers the outbox. An ``UploadEvents`` observer too: a session ending in this process
    wakes it at once (other processes' events are found by polling)."""

    def __init__(
        self,
        db: Database,
        signing_key: SigningKey | None,
        render: EventRenderer,
        settings: DeliverySettings | None = None,
        events: UploadEvents | None = None,
    ) -> None:
        self._db = db
        self._key = signing_key
        self._render = render
        self._settings = settings or DeliverySettings()
        self._events = events or UploadEvents()
        self._slots = threading.Condition()
        self._in_flight: dict[int, int] = {}  # endpoint -> attempts running in this process
        # Endpoints whose last attempt here failed or was slow, and when (forgotten after an
        # hour without a try: a removed endpoint, or one whose retries are far apart).
        self._failing: dict[int, float] = {}
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._counts: DeliveryCounts | None = None  # what `deliver_due` did, while it runs

    # --- the server's thread ----------------------------------------------------------------

    def start(self) -> None:
        if self._key is None:
            log.warning(
                "webhooks: no signing key on this host (CHUNKSVC_WEBHOOK_KEY): it delivers no events;"
                " `python -m chunksvc webhooks list` shows what waits"
            )
            return
        if self._thread is None:
            self._pool = ThreadPoolExecutor(self._settings.concurrency, thread_name_prefix="chunksvc-webhook")
            self._thread = threading.Thread(target=self._run, name="chunksvc-webhooks", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop claiming, without waiting for attempts under way (up to the 10 s timeout each,
        and a worker on its way out has little time): one cut short leaves its delivery claimed,
        due again once the claim's lease runs out, and sent again then (at least once)."""
        self._stopping.set()
        self._wakeup.set()
        with self._slots:
            self._slots.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wakeup.set()

    def session_completed(self, assembly_seconds: float) -> None:
        self.wake()

    def session_failed(self, assembly_seconds: float) -> None:
        self.wake()

    def session_aborted(self) -> None:
        self.wake()

    def sessions_expired(self, count: int) -> None:
        self.wake()

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the claim: a wake-up that comes during it is not lost.
            self._wakeup.clear()
            try:
                claimed = self._claim_and_start()
            except ChunksvcError as exc:
                log.warning("webhooks: could not claim deliveries: %s", exc.detail)
                claimed = 0
            except Exception:
                log.exception("webhooks: the delivery loop failed; trying again")
                claimed = 0
            if not claimed:
                # Until a session ends here, an attempt ends (its endpoint may take the next
                # event), or the next poll finds what other processes' sessions produced.
                self._wakeup.wait(self._settings.poll_interval)

    # --- `deliver --once` -------------------------------------------------------------------

    def deliver_due(self) -> DeliveryCounts:
        """Deliver everything due now (and what becomes due as earlier events of a session are
        delivered), then return; for ``python -m chunksvc deliver --once``."""
        if self._key is None:
            raise ConfigError("no webhook signing key (CHUNKSVC_WEBHOOK_KEY or the key file): nothing can be signed")
        counts = DeliveryCounts()
        self._pool = ThreadPoolExecutor(self._settings.concurrency, thread_name_prefix="chunksvc-webhook")
        self._counts = counts
        try:
            while True:
                claimed = self._claim_and_start()
                if not claimed:
                    with self._slots:
                        if not self._in_flight:
                            break
                        self._slots.wait(self._settings.timeout)
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._counts = None
        return counts

    # --- claiming and attempting ------------------------------------------------------------

    def _claim_and_start(self) -> int:
        """Claim as many due deliveries as there are free slots and start them; how many.

        Endpoints whose last attempt here failed (down, hanging, answering 5xx) share at most
        ``failing_share`` of the slots, one attempt each at a time: however many endpoints hang,
        the rest of the slots stay with endpoints that answer, so other clients' events go on.
        """
        assert self._key is not None and self._pool is not None
        settings = self._settings
        with self._slots:
            while sum(self._in_flight.values()) >= settings.concurrency and not self._stopping.is_set():
                self._slots.wait()
            if self._stopping.is_set():
                return 0
            free = settings.concurrency - sum(self._in_flight.values())
            failing_running = sum(self._in_flight.get(endpoint, 0) for endpoint in self._failing)
            failing_free = min(free, settings.failing_share - failing_running)
            busy = [endpoint for endpoint, running in self._in_flight.items() if running >= settings.per_endpoint]
            self._forget_old_failures()
            failing = list(self._failing)
            failing_idle = [endpoint for endpoint in failing if endpoint not in self._in_flight]
        with self._db.transaction() as conn:
            # Endpoints that answer first, then what is left of the failing endpoints' share.
            claimed = dao.claim_webhook_deliveries(conn, free, settings.lease, busy + failing, self._key.key_id)
            if failing_idle and failing_free > 0 and len(claimed) < free:
                claimed += dao.claim_webhook_deliveries(
                    conn,
                    min(failing_free, free - len(claimed)),
                    settings.lease,
                    busy,
                    self._key.key_id,
                    only_endpoints=failing_idle,
                )
            sessions = dao.event_sessions(conn, [delivery.event_id for delivery in claimed]) if claimed else {}
        with self._slots:
            for delivery in claimed:
                self._in_flight[delivery.endpoint_id] = self._in_flight.get(delivery.endpoint_id, 0) + 1
        for delivery in claimed:
            self._pool.submit(self._attempt, delivery, sessions[delivery.event_id])
        return len(claimed)

    def _attempt(self, delivery: ClaimedDeliveryRow, session: SessionRow) -> None:
        try:
            self._deliver(delivery, session)
        except Exception:
            # Recording the outcome failed (the database is down): the lease runs out and the
            # delivery is tried again, by whichever deliverer claims it first.
            log.warning(
                "webhooks: event %s to endpoint %d: outcome not recorded",
                delivery.event_id,
                delivery.endpoint_id,
                exc_info=True,
            )
        finally:
            with self._slots:
                self._in_flight[delivery.endpoint_id] -= 1
                if not self._in_flight[delivery.endpoint_id]:
                    del self._in_flight[delivery.endpoint_id]
                self._slots.notify_all()
            self._wakeup.set()

    def _deliver(self, delivery: ClaimedDeliveryRow, session: SessionRow) -> None:
        assert self._key is not None
        body = self._render(delivery, session)
        in_use = [self._key.secret(delivery.secret_nonce)]
        if delivery.previous_nonce is not None:
            in_use.append(self._key.secret(delivery.previous_nonce))
        signature = sign(in_use, int(time.time()), body)
        started = time.monotonic()
        status, error = post(delivery.url, body, signature, delivery.event_id, self._settings.timeout)
        with self._db.connection() as conn:
            if status is not None and 200 <= status < 300:
                latency = dao.record_webhook_delivered(conn, delivery.event_id, delivery.endpoint_id, status)
                with self._slots:
                    # A 2xx that took half the timeout or more is a slow endpoint: it shares the
                    # failing endpoints' slots, so a few slow ones cannot hold every thread.
                    if time.monotonic() - started >= self._settings.timeout / 2:
                        self._failing[delivery.endpoint_id] = time.monotonic()
                    else:
                        self._failing.pop(delivery.endpoint_id, None)
                self._count("delivered")
                self._events.webhook_delivered(latency)
                return
            state = dao.record_webhook_failed(
                conn,
                delivery.event_id,
                delivery.endpoint_id,
                claim=delivery.claim,
                status=status,
                error=error or f"HTTP {status}",
                retry_in=self._settings.retry_in(delivery.attempts),
                retry_for=self._settings.retry_for,
            )
        with self._slots:
            self._failing[delivery.endpoint_id] = time.monotonic()
        self._count("failed")
        self._events.webhook_failed(dead=state == "dead")
        if state == "dead":
            self._count("dead")
            log.error(
                "webhooks: event %s to endpoint %d is dead after %d attempts: %s",
                delivery.event_id,
                delivery.endpoint_id,
                delivery.attempts,
                error or f"HTTP {status}",
            )
        else:
            log.info(
                "webhooks: event %s to endpoint %d failed (attempt %d): %s",
                delivery.event_id,
                delivery.endpoint_id,
                delivery.attempts,
                error or f"HTTP {status}",
            )

    def _forget_old_failures(self) -> None:
        """Called holding ``_slots``."""
        forget_before = time.monotonic() - FAILURE_MEMORY
        for endpoint in [endpoint for endpoint, when in self._failing.items() if when < forget_before]:
            del self._failing[endpoint]

    def _count(self, outcome: str) -> None:
        with self._slots:
            if self._counts is not None:
                setattr(self._counts, outcome, getattr(self._counts, outcome) + 1)


def post(url: str, body: bytes, signature: str, event_id: UUID, timeout: float) -> tuple[int | None, str | None]:
    """POST the event; ``(status, None)`` when the endpoint answered within ``timeout`` seconds
    (the whole exchange up to the answer's head), else ``(None, what went wrong)``."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection
    # The port always given: with none, http.client would read "::1" (an IPv6 literal) as host:port.
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    late = f"no answer within {timeout:g} s"
    stopwatch: threading.Timer | None = None

    def within_deadline() -> None:
        """Each step's socket timeout is what is left of the attempt's ``timeout``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(late)
        if connection.sock is not None:
            connection.sock.settimeout(remaining)

    try:
        connection.connect()
        within_deadline()
        # A receiver that trickles its answer a byte at a time stays within every socket
        # timeout; at the deadline the socket is shut, which ends any read or write on it.
        stopwatch = threading.Timer(deadline - time.monotonic(), _shut, (connection,))
        stopwatch.daemon = True
        stopwatch.start()
        connection.request(
            "POST",
            target,
            body=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature,
                "Chunksvc-Event-Id": str(event_id),
                "User-Agent": "chunksvc-webhooks/1",
                "Connection": "close",
            },
        )
        within_deadline()
        # The status decides; the answer's body is not read (a receiver that sends a 2xx
        # head and then holds the connection has still answered).
        status = connection.getresponse().status
        if time.monotonic() > deadline:
            return None, late
        return status, None
    except TimeoutError:
        return None, late
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            return None, late  # the stopwatch shut the socket
        return None, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if stopwatch is not None:
            stopwatch.cancel()
        connection.close()


def _shut(connection: http.client.HTTPConnection) -> None:
    with contextlib.suppress(OSError):
        if connection.sock is not None:
            connection.sock.shutdown(socket.SHUT_RDWR)
