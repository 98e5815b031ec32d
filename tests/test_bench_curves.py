"""bench-curves' helpers, where they can be checked without timing: percentiles, the growth
exponent and the shape it names, /proc/stat parsing, and the SQL that fills upload_sessions (run
against the test PostgreSQL: every row passes the table's CHECK constraints, in the intended mix).
(The curves themselves are printed by ``make bench-curves``.)"""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg
import pytest

from tools.bench_curves import (
    OPEN_RECENT,
    STATUS_MIX,
    cost_shape,
    cpu_busy_and_total,
    fill_batches,
    fill_sessions_sql,
    growth_exponent,
    parse_int_list,
    status_case_sql,
    throughput_shape,
)
from tools.measure import percentile, spread


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.001) == 1
    assert percentile([7.0], 0.99) == 7
    # 300 latencies: p99 is the 297th smallest, not the largest.
    assert percentile([float(v) for v in range(1, 301)], 0.99) == 297


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_percentile_refuses_a_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], fraction)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_spread() -> None:
    assert spread([3.0, 1.0, 2.0, 10.0]) == (1.0, 2.5, 10.0)


def test_growth_exponent() -> None:
    assert growth_exponent(100, 2.0, 1000, 2.0) == pytest.approx(0)
    assert growth_exponent(100, 1.0, 1000, 10.0) == pytest.approx(1)
    assert growth_exponent(1e3, 1.0, 1e5, 1e4) == pytest.approx(2)
    with pytest.raises(ValueError):
        growth_exponent(100, 1.0, 100, 2.0)
    with pytest.raises(ValueError):
        growth_exponent(100, 0.0, 1000, 2.0)


def test_cost_shape_names_the_worst_step() -> None:
    assert cost_shape([1e3, 1e5, 1e6], [0.010, 0.011, 0.010]).startswith("flat")
    assert cost_shape([100, 1000, 10000], [0.1, 1.0, 10.0]).startswith("linear")
    assert cost_shape([100, 1000, 10000], [0.1, 0.3, 0.9]).startswith("sub-linear")
    # Linear, then quadratic: the second step decides.
    shape = cost_shape([100, 1000, 10000], [0.1, 1.0, 100.0])
    assert shape.startswith("SUPER-LINEAR") and "1.00, 2.00" in shape
    assert cost_shape([100], [1.0]) == "one point"


def test_throughput_shape() -> None:
    assert throughput_shape([1, 2, 4], [100, 200, 400]).startswith("scales")
    assert throughput_shape([1, 2, 4], [250, 240, 230]).startswith("flat")
    assert throughput_shape([1, 2, 4], [250, 150, 80]).startswith("FALLS")


def test_parse_int_list() -> None:
    assert parse_int_list("100, 1e3,10_000") == [100, 1000, 10000]
    for bad in ("", "0", "1.5", "ten"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


def test_cpu_busy_and_total_from_proc_stat() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = "cpu  100 5 50 1000 20 3 2 1 40 0\ncpu0 50 2 25 500 10 1 1 0 20 0\n"
    busy, total = cpu_busy_and_total(text)
    assert total == 100 + 5 + 50 + 1000 + 20 + 3 + 2 + 1  # guest is already inside user
    assert busy == total - 1000 - 20
    with pytest.raises(ValueError):
        cpu_busy_and_total("intr 1 2 3\n")


def test_fill_batches() -> None:
    assert fill_batches(0, 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert fill_batches(1000, 1000, 200) == []


def test_the_status_mix_adds_up() -> None:
    assert sum(share for _, share in STATUS_MIX) == 1000
    with pytest.raises(ValueError):
        status_case_sql((("COMPLETED", 999),))


def expected_status(i: int) -> str:
    """What fill row i should hold (STATUS_MIX's buckets; old open ones ran out)."""
    upper = 0
    for status, share in STATUS_MIX:
        upper += share
        if i % 1000 < upper:
            if status in ("INIT", "IN_PROGRESS") and i >= OPEN_RECENT:
                return "EXPIRED"
            return status
    raise AssertionError("unreachable")


def one_row(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The row a query that returns exactly one gives (an aggregate, or RETURNING of one insert)."""
    row = conn.execute(statement, params).fetchone()
    assert row is not None, statement
    return row


def test_fill_sql_makes_rows_the_table_accepts_in_the_intended_mix(database_url: str) -> None:
    rows = OPEN_RECENT + 2000  # open rows among the recent ones, expired ones further back
    with psycopg.connect(database_url, autocommit=True) as conn:
        client_ids = [
            one_row(conn, "INSERT INTO clients (name) VALUES (%s) RETURNING id", (name,))[0]
            for name in ("measuring", "tenant-b", "tenant-c")
        ]
        for start, stop in fill_batches(0, rows, 1500):
            conn.execute(fill_sessions_sql(), {"start": start, "stop": stop, "client_ids": client_ids})
        got: dict[str, int] = dict(
            conn.execute("SELECT status, count(*) FROM upload_sessions GROUP BY status").fetchall()
        )
        assert got == Counter(expected_status(i) for i in range(rows))
        per_client = [
            one_row(conn, "SELECT count(*) FROM upload_sessions WHERE client_id = %s", (cid,))[0] for cid in client_ids
        ]
        assert sum(per_client) == rows and max(per_client) - min(per_client) <= 1
        # Nothing for the reaper or the assembler to do: open sessions are not overdue, ended ones
        # are purged, none is COMPLETING.
        (overdue,) = one_row(
            conn,
            "SELECT count(*) FROM upload_sessions WHERE status IN ('INIT', 'IN_PROGRESS') AND expires_at <= now()",
        )
        (unpurged,) = one_row(
            conn,
            "SELECT count(*) FROM upload_sessions WHERE status NOT IN ('INIT', 'IN_PROGRESS') AND purged_at IS NULL",
        )
        assert (overdue, unpurged, got.get("COMPLETING", 0)) == (0, 0, 0)
        # Newest first is fill order (row 0 is the newest).
        (newest,) = one_row(conn, "SELECT filename FROM upload_sessions ORDER BY created_at DESC LIMIT 1")
        assert newest == "file-0.bin"
        # The ids are those of the rows: filling a range again is refused, not duplicated.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(fill_sessions_sql(), {"start": 0, "stop": 1, "client_ids": client_ids})
