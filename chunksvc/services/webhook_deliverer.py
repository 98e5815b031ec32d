"""The webhook deliverer: it claims due deliveries from the outbox (``FOR UPDATE SKIP LOCKED`` and a
lease, so any number of processes on any number of hosts share the work and, while all is well,
never send one twice), POSTs each with no transaction or pooled connection held, and records the
outcome: delivered on a 2xx, else due again after an exponential backoff with jitter, dead once it
has been retried for ``retry_for`` seconds. At most ``per_endpoint`` attempts to one endpoint run at
once in a process, so a slow or dead endpoint holds a few of its threads and no more.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError, ConfigError
from chunksvc.rows import ClaimedDeliveryRow, SessionRow
from chunksvc.services.events import UploadEvents
from chunksvc.services.webhook_post import post
from chunksvc.services.webhook_signing import SigningKey, sign

# One logger for every webhook module: docs/operations.md tells ops its name.
log = logging.getLogger("chunksvc.services.webhooks")

# How long a deliverer remembers an endpoint failed (or was slow) after its last try.
FAILURE_MEMORY = 3600.0

# (delivery, the session it carries) -> the event's JSON body, as bytes. Rendering is the HTTP
# representation's business (chunksvc.resources); the app hands the deliverer its renderer.
EventRenderer = Callable[[ClaimedDeliveryRow, SessionRow], bytes]


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
                with self._slots:
                    idle = not self._in_flight
                claimed = self._claim_and_start()
                if not claimed:
                    # Done only when a claim that began with nothing in flight found nothing: one
                    # made while an attempt ran may have left out that attempt's endpoint's
                    # other events (a failing endpoint takes one attempt at a time).
                    if idle:
                        break
                    with self._slots:
                        if self._in_flight:
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
        answered = status is not None and 200 <= status < 300
        with self._slots:
            # Known here before the outcome is recorded: the endpoint's other due events are
            # claimable meanwhile, and a claim that still took it for healthy would pass the
            # failing endpoints' share. A 2xx that took half the timeout or more is a slow
            # endpoint: it shares the failing endpoints' slots too.
            if not answered or time.monotonic() - started >= self._settings.timeout / 2:
                self._failing[delivery.endpoint_id] = time.monotonic()
            else:
                self._failing.pop(delivery.endpoint_id, None)
        with self._db.connection() as conn:
            if answered:
                assert status is not None
                latency = dao.record_webhook_delivered(conn, delivery.event_id, delivery.endpoint_id, status)
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
