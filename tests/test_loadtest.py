"""``make loadtest`` says how it is going while it runs: a progress line on stderr every few seconds."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools.loadtest import MiB, Progress

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"loadtest: (\d+) s: (\d+) uploads completed \((\d+) started\), parts ([\d.]+) MiB/s now,"
    r" ([\d.]+) MiB/s overall; (\d+) requests failed, (\d+) retried"
)


def test_a_progress_line_gives_elapsed_uploads_throughput_and_failures():
    now = [100.0]
    totals = {"files": 3, "completed": 1, "bytes": 0}
    stats = SimpleNamespace(errors={})
    progress = Progress(totals, stats, clock=lambda: now[0])

    now[0], totals["bytes"] = 105.0, 50 * MiB
    assert progress.line() == (
        "loadtest: 5 s: 1 uploads completed (3 started), parts 10.0 MiB/s now, 10.0 MiB/s overall;"
        " 0 requests failed, 0 retried"
    )
    now[0], totals["bytes"], totals["completed"] = 110.0, 60 * MiB, 2
    stats.errors = {
        "a": SimpleNamespace(error="storage_unavailable (retried)", occurrences=4),
        "b": SimpleNamespace(error="internal_error", occurrences=1),
    }
    assert progress.line() == (
        "loadtest: 10 s: 2 uploads completed (3 started), parts 2.0 MiB/s now, 6.0 MiB/s overall;"
        " 1 requests failed, 4 retried"
    )


# Looked up, not imported: importing locust patches this process's standard library with gevent.
@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="the load test's extra: pip install -e '.[bench]'"
)
def test_make_loadtest_prints_progress_while_it_runs():
    env = {**os.environ, "CHUNKSVC_MIN_PART_SIZE": "1"}  # the local server takes the small parts below
    env.pop("DATABASE_URL", None)
    command = [
        sys.executable,
        "-m",
        "tools.loadtest",
        "--users",
        "2",
        "--file-size",
        "2MiB",
        "--part-size",
        "1MiB",
        "--max-files",
        "0",
        "--run-time",
        "4",
        "--progress-every",
        "1",
        "--conflict-rate",
        "0",
    ]
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[float, str]] = []
    try:
        assert child.stderr is not None
        for line in child.stderr:
            if LINE.search(line):
                seen.append((time.monotonic(), line.strip()))
        stdout = child.stdout.read() if child.stdout else ""
        assert child.wait(timeout=120) == 0, stdout
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    ended = time.monotonic()
    assert len(seen) >= 2, seen
    # The first line came while the load was still running, not with the report at the end.
    assert ended - seen[0][0] > 1.5, seen
    last = LINE.search(seen[-1][1])
    assert int(last.group(2)) >= 1 and float(last.group(5)) > 0, seen[-1]
    assert "files completed" in stdout and "no errors" in stdout
