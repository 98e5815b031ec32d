"""The one retry policy: what is retried, how often, and how long to wait in between."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import TypeVar

from chunksvc_client.errors import ApiError

T = TypeVar("T")
# Answers after which a request may or may not have been applied.
AMBIGUOUS_STATUSES = frozenset({0, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, a bounded number of attempts.

    Retried: exactly the errors ``ApiError.retryable`` names (connection errors and timeouts,
    502/503/504 including a proxy's own pages, 507 ``storage_full``, 409
    ``completion_in_progress``). A request that is not safe to repeat (a create without an
    ``Idempotency-Key``) is not retried when it may have been applied: after a connection error,
    or a 502, 503 or 504 (a proxy's timeout, say, after it forwarded the request).
    """

    attempts: int = 8
    base_delay: float = 0.5  # seconds before the first retry (on average half of it: full jitter)
    max_delay: float = 30.0
    # 507: the operator must free space first, so wait longer than for a passing fault.
    storage_full_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, error: ApiError) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        wait = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if error.status == 507:
            wait = max(wait, random.uniform(0.5, 1.0) * self.storage_full_delay)
        if error.retry_after is not None:
            wait = max(wait, min(error.retry_after, self.max_delay))
        return wait

    def run(self, call: Callable[[], T], *, repeatable: bool = True) -> T:
        """``call()``, retried as this policy says; the last error when it never succeeds."""
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except ApiError as error:
                unsafe = not repeatable and error.status in AMBIGUOUS_STATUSES
                if not error.retryable or unsafe or attempt == self.attempts:
                    raise
                self.sleep(self.delay(attempt, error))
        raise AssertionError("unreachable: the last attempt returns or raises")
