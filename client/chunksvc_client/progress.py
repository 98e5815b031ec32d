"""How an upload reports its progress: a bar on a terminal, plain lines elsewhere, or nothing."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Protocol


class Progress(Protocol):
    """What ``Client.upload_file`` calls as it goes (from several threads at once)."""

    def start(self, total: int, done: int) -> None:
        """The upload has ``total`` bytes, of which the server already has ``done``."""

    def advance(self, count: int) -> None:
        """``count`` more bytes were sent (negative: an attempt failed and will be sent again)."""

    def assembling(self, assembled: int | None, total: int) -> None:
        """Every part is in; the server is assembling (``assembled`` bytes so far, if it says)."""

    def close(self) -> None:
        """The upload ended (either way)."""


class NoProgress:
    def start(self, total: int, done: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def assembling(self, assembled: int | None, total: int) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar: bytes, rate and ETA."""

    def __init__(self, description: str, stream: IO[str] | None = None) -> None:
        self._description = description
        self._stream = stream or sys.stderr
        self._bar = None
        self._lock = threading.Lock()

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.close()  # a second start (parts sent again after a completion asked for them)
        self._bar = tqdm(
            total=total,
            initial=done,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self._description,
            file=self._stream,
            dynamic_ncols=True,
        )

    def advance(self, count: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(count)

    def assembling(self, assembled: int | None, total: int) -> None:
        with self._lock:
            if self._bar is not None:
                shown = "" if assembled is None else f" {100 * assembled // max(total, 1)}%"
                self._bar.set_postfix_str(f"assembling{shown}")

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


class LineProgress:
    """Plain lines (for logs and pipes): at most one every ``interval`` seconds, and at the end."""

    def __init__(self, description: str, stream: IO[str] | None = None, interval: float = 5.0) -> None:
        self._description = description
        self._stream = stream or sys.stderr
        self._interval = interval
        self._lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._started = time.monotonic()
        self._last = 0.0
        self._resumed_at = 0

    def start(self, total: int, done: int) -> None:
        with self._lock:
            self._total, self._done, self._resumed_at = total, done, done
            self._started = time.monotonic()
            already = f" ({done} already on the server)" if done else ""
            self._line(f"uploading {total} bytes{already}")

    def advance(self, count: int) -> None:
        with self._lock:
            self._done += count
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._line(self._status(now))

    def assembling(self, assembled: int | None, total: int) -> None:
        with self._lock:
            shown = "" if assembled is None else f": {assembled} of {total} bytes"
            self._line(f"all parts sent; the server is assembling{shown}")

    def close(self) -> None:
        with self._lock:
            if self._total:
                self._line(self._status(time.monotonic()))

    def _status(self, now: float) -> str:
        percent = 100 * self._done // max(self._total, 1)
        rate = (self._done - self._resumed_at) / max(now - self._started, 1e-9)
        return f"{self._done} of {self._total} bytes ({percent}%), {rate / 2**20:.1f} MiB/s"

    def _line(self, text: str) -> None:
        print(f"{self._description}: {text}", file=self._stream, flush=True)
