"""tools/measure.py: the one percentile definition (nearest rank) and the /proc readers."""

from __future__ import annotations

import os

import pytest

from tools import measure


def test_the_p50_of_one_to_ten_is_five_the_nearest_rank() -> None:
    assert measure.percentile([float(v) for v in range(1, 11)], 0.5) == 5
    assert measure.percentile([float(v) for v in range(1, 11)], 0.9) == 9
    assert measure.percentile([float(v) for v in range(1, 11)], 1.0) == 10


def test_spread_and_its_format() -> None:
    assert measure.spread([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert measure.fmt_spread([3.0, 1.0, 2.0], lambda v: f"{v:.0f}") == "2 (1-3)"


def test_the_proc_readers_see_this_process() -> None:
    assert measure.rss_kib(os.getpid()) > 1024
    assert measure.peak_rss_kib(os.getpid()) >= measure.rss_kib(os.getpid())
    assert measure.cpu_seconds(os.getpid()) > 0
    assert os.getpid() in measure.process_tree(os.getpid())
    assert measure.meminfo_kib("MemTotal") > 0
    with pytest.raises(RuntimeError):
        measure.status_kib(os.getpid(), "NoSuchField")
