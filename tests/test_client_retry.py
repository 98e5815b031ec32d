"""The client's one retry policy, by itself: what is retried, how often, and how long it waits."""

from __future__ import annotations

import pytest

from chunksvc_client import ApiError, RetryPolicy


def attempts_until_given_up(policy: RetryPolicy, error: ApiError, repeatable: bool = True) -> int:
    calls = []

    def failing() -> None:
        calls.append(1)
        raise error

    with pytest.raises(ApiError):
        policy.run(failing, repeatable=repeatable)
    return len(calls)


@pytest.mark.parametrize(
    ("status", "code", "retried"),
    [
        (0, "connection_error", True),
        (502, "http_502", True),  # a proxy's own page: no problem document
        (503, "database_unavailable", True),
        (504, "http_504", True),
        (507, "storage_full", True),
        (409, "completion_in_progress", True),
        (409, "part_conflict", False),
        (400, "digest_mismatch", False),
        (401, "unauthorized", False),
        (404, "session_not_found", False),
        (500, "internal_error", False),
    ],
)
def test_exactly_the_contracts_errors_are_retried(status, code, retried):
    policy = RetryPolicy(attempts=4, sleep=lambda seconds: None)
    error = ApiError(status, code, "detail")
    assert error.retryable is retried
    assert attempts_until_given_up(policy, error) == (4 if retried else 1)


@pytest.mark.parametrize("status", [0, 502, 503, 504])
def test_a_request_not_safe_to_repeat_is_not_retried_when_it_may_have_been_applied(status):
    policy = RetryPolicy(attempts=4, sleep=lambda seconds: None)
    assert attempts_until_given_up(policy, ApiError(status, "x", "detail"), repeatable=False) == 1
    assert attempts_until_given_up(policy, ApiError(507, "storage_full", "d"), repeatable=False) == 4


def test_waits_grow_with_jitter_within_bounds_and_honour_retry_after():
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, storage_full_delay=30.0)
    passing = ApiError(503, "storage_unavailable", "d")
    for attempt in range(1, 12):
        assert 0 <= policy.delay(attempt, passing) <= min(30.0, 0.5 * 2 ** (attempt - 1))
    assert policy.delay(1, ApiError(507, "storage_full", "d")) >= 15.0  # a longer wait: space must be freed
    assert policy.delay(1, ApiError(503, "x", "d", retry_after=7.0)) >= 7.0
    assert policy.delay(1, ApiError(503, "x", "d", retry_after=3600.0)) <= 30.0  # capped


def test_success_after_failures_returns_the_value():
    answers = iter([ApiError(0, "connection_error", "reset"), ApiError(503, "database_unavailable", "d"), "done"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    assert RetryPolicy(sleep=lambda seconds: None).run(flaky) == "done"
