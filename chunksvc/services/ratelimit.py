"""Per-client request-rate limits (contract v1.2, "Sharing one service").

A token bucket per client, held in PostgreSQL (``client_rate_buckets``, migration 0013), which
every worker on every host takes tokens from with one statement (``take_rate_token``). The row's
lock orders one client's takers; another client's requests touch another row and never wait.

A worker takes a few tokens at a time and spends them on the client's next requests itself: up to
``BATCH_SECONDS`` of the client's rate (1 token for a rate under 50 a second, so small limits are
checked request by request). The sum over every process can never pass the bucket, so the limit
is never exceeded; a worker's unspent tokens are dropped after ``HOLD`` seconds, so a client can
lose at most one batch per process that stopped getting its requests. Why batches: one round trip
per request cost about 0.3 ms of wall time and 0.7 ms of CPU per 4 KiB part (331 against 435 parts
a second); a batch divides that by its size where rates are high enough for it to matter.

Why not local buckets that share their counts every few hundred milliseconds: each process would
admit up to its own share between two exchanges, and with processes coming and going (a rolling
restart, a host added) the sum is right only on average. Tokens taken from the shared row are
right by construction.

The limits are the configured defaults (``config.Quotas.rate``/``burst``) unless an operator set
an override (``python -m chunksvc limits set CLIENT --rate R --burst B``). Each process keeps the
overrides for ``refresh`` seconds, so a client with no limit (the default) costs no statement,
and a changed override takes effect within that time.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

from chunksvc import dao
from chunksvc.config import Quotas
from chunksvc.db import Database
from chunksvc.errors import RateLimited

#: Seconds each process keeps the operators' overrides before reading them again.
OVERRIDES_REFRESH = 5.0
#: A worker takes at most this many seconds of a client's rate from the shared bucket at once.
BATCH_SECONDS = 0.02
#: Seconds a worker keeps tokens it took but has not spent; then they are dropped.
HOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Rate:
    """A client's request rate (per second; 0: no limit) and burst (requests at once)."""

    limit: float
    burst: int

    @property
    def on(self) -> bool:
        return self.limit > 0


def effective_rate(limit: float, burst: int) -> Rate:
    """The rate as enforced: an unset burst (0) is one second's worth of the rate, at least 1."""
    if limit <= 0:
        return Rate(0.0, burst)
    return Rate(limit, burst if burst > 0 else max(1, math.ceil(limit)))


class RateLimiter:
    def __init__(
        self,
        db: Database,
        defaults: Quotas,
        *,
        refresh: float = OVERRIDES_REFRESH,
        refused: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._defaults = defaults
        self._refresh = refresh
        self._refused = refused
        self._clock = clock
        self._lock = threading.Lock()
        self._overrides: dict[int, tuple[float | None, int | None]] = {}
        self._read_at: float | None = None
        # Per client: tokens this process took from the shared bucket and has not spent, and until
        # when it may spend them.
        self._held: dict[int, tuple[int, float]] = {}

    def rate_of(self, client_id: int) -> Rate:
        """The client's rate now: its override, column by column, else the default."""
        limit, burst = self._current_overrides().get(client_id, (None, None))
        return self.resolve(limit, burst)

    def resolve(self, limit: float | None, burst: int | None) -> Rate:
        return effective_rate(
            self._defaults.rate if limit is None else limit, self._defaults.burst if burst is None else burst
        )

    def admit(self, client_id: int, client_name: str) -> None:
        """Spend one of the client's tokens, or raise ``RateLimited`` with the seconds until the
        next one. Does nothing for a client without a limit."""
        rate = self.rate_of(client_id)
        if not rate.on:
            return
        now = self._clock()
        with self._lock:
            held, until = self._held.get(client_id, (0, 0.0))
            if held > 0 and now < until:
                self._held[client_id] = (held - 1, until)
                return
        want = max(1, min(rate.burst, math.floor(rate.limit * BATCH_SECONDS)))
        with self._db.connection() as conn:
            taken = dao.take_rate_tokens(conn, client_id, rate.limit, float(rate.burst), want)
        if taken.taken > 0:
            with self._lock:
                # Tokens another thread took meanwhile are kept too: both were taken from the row.
                held, until = self._held.get(client_id, (0, 0.0))
                held = held if now < until else 0
                self._held[client_id] = (held + taken.taken - 1, now + HOLD)
            return
        if self._refused is not None:
            self._refused(client_name)
        # Whole seconds (Retry-After's unit), rounded up: a retry at that time finds a token.
        retry_after = max(1, math.ceil((1 - taken.tokens) / rate.limit))
        raise RateLimited(
            f"the client may send {rate.limit:g} requests a second (bursts of {rate.burst}); retry after"
            f" {retry_after} s",
            retry_after=retry_after,
            limit=rate.limit,
            burst=rate.burst,
        )

    def _current_overrides(self) -> dict[int, tuple[float | None, int | None]]:
        now = self._clock()
        with self._lock:
            if self._read_at is not None and now - self._read_at < self._refresh:
                return self._overrides
        with self._db.connection() as conn:
            rows = dao.rate_overrides(conn)
        overrides = {row.client_id: (row.rate_limit, row.rate_burst) for row in rows}
        with self._lock:
            self._overrides, self._read_at = overrides, now
        return overrides
