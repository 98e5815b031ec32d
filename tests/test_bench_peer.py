"""The bench's peer comparison and server-CPU accounting, where they can be checked without timing:
/proc parsing, the arithmetic of exited processes, the figures' ratios, and the skip paths when
Node, npm or the install is missing. (The figures themselves are printed by ``make bench``.)"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tools import bench, peer_tus
from tools.bench import CpuMeter, PeerSide
from tools.measure import TICKS_PER_SECOND, ProcStat, cpu_ticks_between, parse_proc_stat, process_tree


def stat(pid: int, ppid: int, ticks: int, child_ticks: int = 0, start: int = 100) -> ProcStat:
    return ProcStat(pid=pid, ppid=ppid, start=start, ticks=ticks, child_ticks=child_ticks)


def test_proc_stat_fields_are_counted_from_the_last_parenthesis() -> None:
    # A command name may hold spaces and parentheses; utime 7, stime 3, cutime 20, cstime 5, starttime 4242.
    line = "1234 (a) b (c) S 99 1234 1234 0 -1 4194560 10 0 0 0 7 3 20 5 20 0 65 0 4242 1000 50 0\n"
    assert parse_proc_stat(line) == ProcStat(pid=1234, ppid=99, start=4242, ticks=10, child_ticks=25)


def test_proc_stat_of_this_process() -> None:
    own = parse_proc_stat(Path("/proc/self/stat").read_text())
    times = os.times()  # the kernel's own utime/stime of this process, through times(2)
    assert own.pid == os.getpid() and own.ppid == os.getppid() and own.start > 0
    assert abs(own.ticks - round((times.user + times.system) * TICKS_PER_SECOND)) <= 2


def test_cpu_between_snapshots_counts_growth_new_and_exited_processes() -> None:
    before = {1: stat(1, 0, 100, 50), 2: stat(2, 1, 30), 3: stat(3, 1, 40), 4: stat(4, 3, 5)}
    after = {
        1: stat(1, 0, 110, 50 + 45 + 2),  # waited for 2 (45 ticks of its life, 2 its own children's)
        3: stat(3, 1, 41, 9),  # waited for 4 (9 ticks: 5 before, 4 after the first snapshot)
        5: stat(5, 1, 12, 1),  # new
    }
    ticks, missed = cpu_ticks_between(before, after)
    # 1: 10 + (45 + 2 - 30 before); 3: 1 + (9 - 5 before); 5: 12 + 1.
    assert (ticks, missed) == (10 + 17 + 1 + 4 + 13, 0)


def test_cpu_between_snapshots_tells_a_reused_pid_and_a_lost_process() -> None:
    before = {1: stat(1, 0, 10), 2: stat(2, 1, 50, start=100), 6: stat(6, 2, 7)}
    # 2 exited (waited for by 1: 60 ticks) and its pid went to a new child; 6, child of the old 2, is
    # gone with it, its ticks counted only in the old 2's cutime: nothing counts what it used since.
    after = {1: stat(1, 0, 10, 60), 2: stat(2, 1, 3, start=900)}
    ticks, missed = cpu_ticks_between(before, after)
    assert ticks == (60 - 50) + 3
    assert missed == 1


def test_meter_counts_a_child_that_ran_and_exited_inside_the_interval() -> None:
    meter = CpuMeter({"self": os.getpid()})
    meter.start()
    # 0.3 s of CPU (not of wall time) in a child that is waited for before the interval ends.
    burn = "import time\nwhile time.process_time() < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    reading = meter.stop()
    assert reading.seconds["self"] >= 0.25  # /proc counts in clock ticks (1/100 s), rounded down
    assert reading.missed == 0


def test_the_postmaster_is_found_from_a_connection(pg_admin_url: str) -> None:
    if os.environ.get("DATABASE_URL"):
        pytest.skip("the server under DATABASE_URL may not run on this machine")
    found = {bench.postmaster_pid(pg_admin_url) for _ in range(3)}  # the backend exits with its connection
    assert len(found) == 1
    postmaster = found.pop()
    assert postmaster is not None
    assert Path(f"/proc/{postmaster}/comm").read_text().strip() == "postgres"
    assert len(process_tree(postmaster)) > 1  # its checkpointer, WAL writer, ...


def side(name: str, **values: list[float]) -> PeerSide:
    result = PeerSide(name, connect=lambda: None, meter=CpuMeter({}))  # type: ignore[arg-type, return-value]
    result.values = defaultdict(list, values)
    return result


VALUES = {
    "stream": [300.0, 400.0, 350.0],
    "clients4": [400.0, 400.0, 400.0],
    "clients16": [400.0, 400.0, 400.0],
    "small": [300.0, 300.0, 300.0],
    "cpu_gib": [2.0, 2.0, 2.0],
    "cpu_part": [1.5, 1.5, 1.5],
}


def test_peer_figures_are_per_round_ratios_against_the_goals() -> None:
    ours = side("chunksvc", **VALUES, **{"cpu_gib:gunicorn": [1.8] * 3, "cpu_gib:postgres": [0.2] * 3})
    theirs = side("tus", **{**VALUES, "stream": [200.0, 200.0, 350.0], "cpu_gib": [2.5, 2.5, 2.5]})
    figures = {figure.name: figure for figure in bench.peer_figures("file", ours, theirs)}
    stream = figures["peer 8 MiB parts, 1 client, chunksvc/tus"]
    assert stream.values == [1.5, 2.0, 1.0]
    assert stream.met is True
    assert "tus 200 (200-350) MiB/s" in stream.note
    cpu = figures["peer server CPU per GiB, 8 MiB parts, chunksvc/tus"]
    assert cpu.values == [0.8, 0.8, 0.8] and cpu.met is True and cpu.target == "<= 0.8"
    assert "[gunicorn 1.80 + PostgreSQL 0.20]" in cpu.note
    assert figures["peer server CPU per 4 KiB part, chunksvc/tus"].met is True
    assert figures["peer 4 KiB parts, 1 client, chunksvc/tus"].met is True


def test_without_the_peer_chunksvc_figures_are_printed_alone() -> None:
    figures = list(bench.peer_figures("file", side("chunksvc", **VALUES), None))
    assert figures[0].name == "peer 8 MiB parts, 1 client"
    assert all(figure.met is None and not figure.target for figure in figures)


# What npm 11 prints when the registry cannot be reached (shortened).
NPM_OFFLINE = """\
npm error code ECONNREFUSED
npm error syscall connect
npm error errno ECONNREFUSED
npm error FetchError: request to http://127.0.0.1:9/@tus%2fserver failed, reason: connect ECONNREFUSED 127.0.0.1:9
npm error     at ClientRequest.<anonymous> (/usr/lib/node_modules/npm/node_modules/minipass-fetch/lib/index.js:130:14)
npm error   code: 'ECONNREFUSED',
npm error }
npm error A complete log of this run can be found in: /root/.npm/_logs/2026-11-25T17_30_08_113Z-debug-0.log
"""


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_prepare_says_which_tool_is_missing() -> None:
    with pytest.raises(peer_tus.PeerUnavailable, match=r"^node and npm not found"):
        peer_tus.prepare(Path("/nonexistent"), which=lambda name: None)


def test_prepare_refuses_an_old_node(tmp_path: Path) -> None:
    tools = {"node": write_script(tmp_path / "node", "echo v18.19.0"), "npm": write_script(tmp_path / "npm", "exit 0")}
    with pytest.raises(peer_tus.PeerUnavailable, match=re.escape("Node v18.19.0 is older")):
        peer_tus.prepare(tmp_path / "cache", which=lambda name: str(tools[name]))


def test_a_failed_npm_install_leaves_nothing_behind(tmp_path: Path) -> None:
    tools = {
        "node": write_script(tmp_path / "node", "echo v20.20.0"),
        "npm": write_script(tmp_path / "npm", f"cat >&2 <<'EOF'\n{NPM_OFFLINE}EOF\nexit 1"),
    }
    cache = tmp_path / "cache"
    reason = "npm install failed (exit 1): ECONNREFUSED: FetchError: request to http://127.0.0.1:9/@tus%2fserver failed"
    with pytest.raises(peer_tus.PeerUnavailable, match="^" + re.escape(reason)):
        peer_tus.prepare(cache, which=lambda name: str(tools[name]))
    assert list(cache.iterdir()) == []


def test_npm_errors_are_told_in_one_line() -> None:
    etarget = (
        "npm error code ETARGET\n"
        "npm error notarget No matching version found for @tus/server@9.9.9.\n"
        "npm error A complete log of this run can be found in: /root/.npm/_logs/x-debug-0.log\n"
    )
    assert peer_tus.npm_error(etarget) == "ETARGET: notarget No matching version found for @tus/server@9.9.9."
    assert peer_tus.npm_error("npm ERR! code E404\nnpm ERR! 404 Not Found - GET https://x\n").startswith("E404: 404")
    assert peer_tus.npm_error("") == "no message"


def test_the_bench_goes_on_without_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    args = argparse.Namespace(peer="tus", peer_cache=None)
    assert bench.prepare_peer(args, ["stream", "peer"], ["file"]) is None
    assert bench.prepare_peer(args, ["peer"], ["s3"]) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "peer tus skipped: node and npm not found on PATH (tus-node-server needs Node >= 20.19 and npm)",
        "peer tus skipped: it is compared on the file backend only",
    ]


def test_unknown_figures_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--figures", "stream,bogus"])
