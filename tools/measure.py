"""The measuring tools' one home for statistics and process readings, so every bench's figures
mean the same thing.

- ``percentile``: the nearest rank (the smallest value with at least ``fraction`` of the values at
  or below it): the p50 of 1..10 is 5, the p99 of 1..300 is 297. No interpolation, so a reported
  latency is one that was measured.
- ``spread``: (min, median, max) of rounds; ``fmt_spread``: "median (min-max)".
- ``/proc`` readers: a process tree's CPU (utime+stime, clock ticks) and a process's memory
  (VmRSS, VmHWM in KiB).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below it."""
    if not values:
        raise ValueError("no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered) - 1e-9)) - 1]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def fmt_spread(values: Sequence[float], fmt: Callable[[float], str] = lambda v: f"{v:.2f}") -> str:
    """``median (min-max)``, each formatted by ``fmt``."""
    low, mid, high = spread(values)
    return f"{fmt(mid)} ({fmt(low)}-{fmt(high)})"


# --- CPU: utime+stime of process trees from /proc/<pid>/stat, in clock ticks ---------------------


@dataclasses.dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    start: int  # starttime (ticks after boot): tells a reused pid from the process it replaced
    ticks: int  # utime + stime: all of the process's threads
    child_ticks: int  # cutime + cstime: children it has waited for (and theirs)


def parse_proc_stat(text: str) -> ProcStat:
    """The fields of one ``/proc/<pid>/stat`` line that CPU accounting needs. The command name
    (field 2, in parentheses) may itself hold spaces and parentheses: fields are counted from the
    last ``)``."""
    pid = int(text[: text.index("(")])
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): field n is fields[n - 3].
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        start=int(fields[19]),
        ticks=int(fields[11]) + int(fields[12]),
        child_ticks=int(fields[13]) + int(fields[14]),
    )


def read_proc_stat(pid: int) -> ProcStat:
    return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())


def cpu_seconds(pid: int) -> float:
    """Seconds of CPU (utime+stime, all threads) that process ``pid`` has used."""
    return read_proc_stat(pid).ticks / TICKS_PER_SECOND


def process_tree(root: int) -> dict[int, ProcStat]:
    """``root`` and its descendants now (one that exits while it is read is left out)."""
    tree: dict[int, ProcStat] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            tree[pid] = read_proc_stat(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            if pid == root:
                raise RuntimeError(f"process {root} is gone") from None
    return tree


def cpu_ticks_between(before: Mapping[int, ProcStat], after: Mapping[int, ProcStat]) -> tuple[int, int]:
    """``(ticks, missed)``: the CPU a process tree used between two snapshots.

    A process in both counts its growth; a new one all of its ticks. One that exited was counted by
    the kernel into its parent's cutime/cstime when the parent waited for it (gunicorn's master
    for a recycled worker, the postmaster for a backend): so the growth of those of every process
    in both counts, less what exited children had used before the first snapshot. ``missed``: the
    processes that exited whose parent is not in both snapshots (their last ticks are lost), and
    children exited but not yet waited for when the interval ended are counted in the next one.
    """

    def same(pid: int) -> bool:
        return pid in before and pid in after and before[pid].start == after[pid].start

    ticks, missed = 0, 0
    for pid, now in after.items():
        if same(pid):
            ticks += now.ticks - before[pid].ticks + now.child_ticks - before[pid].child_ticks
        else:
            ticks += now.ticks + now.child_ticks
    for pid, then in before.items():
        if same(pid):
            continue
        if same(then.ppid):
            ticks -= then.ticks + then.child_ticks
        else:
            missed += 1
    return ticks, missed


# --- memory: /proc/<pid>/status and /proc/meminfo, in KiB -----------------------------------------


def _kib_field(path: Path, field: str) -> int | None:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def status_kib(pid: int, field: str) -> int:
    """A KiB field of ``/proc/<pid>/status``: ``VmRSS`` (resident now), ``VmHWM`` (peak)."""
    value = _kib_field(Path(f"/proc/{pid}/status"), field)
    if value is None:
        raise RuntimeError(f"no {field} for process {pid}")
    return value


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets the kernel's peak (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def meminfo_kib(field: str) -> int:
    """A KiB field of ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``), 0 when absent."""
    return _kib_field(Path("/proc/meminfo"), field) or 0
