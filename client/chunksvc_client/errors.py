"""``ApiError``: every failure of a call, with the contract's ``code`` and whether to retry it."""

from __future__ import annotations

from typing import Any

# The contract's list ("Which errors a client retries"): a proxy's own 502/503/504 pages count
# too, whatever their body; 507 storage_full after a longer wait (see RetryPolicy).
RETRYABLE_STATUSES = frozenset({502, 503, 504, 507})
# 409 completion_in_progress: another request is assembling; wait, then repeat.
# rate_limited (v1.2): after its Retry-After. quota_exceeded, also a 429, is final: it lasts until the
# client's own sessions end.
RETRYABLE_CODES = frozenset({"completion_in_progress", "rate_limited"})
# What a connection failure or timeout is called (the request may or may not have been applied).
CONNECTION_ERROR = "connection_error"


class ApiError(Exception):
    """A call that failed: ``status`` (0 when no answer came), ``code``, ``detail``, ``retryable``.

    ``problem`` is the whole problem document (e.g. ``missing_parts`` of ``parts_missing``);
    ``request_id`` is the server's ``X-Request-ID``, which finds the request in its logs.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        problem: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}" if status == 0 else f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem or {}
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in RETRYABLE_STATUSES or self.code in RETRYABLE_CODES

    @classmethod
    def connection(cls, detail: str) -> ApiError:
        return cls(0, CONNECTION_ERROR, detail)
