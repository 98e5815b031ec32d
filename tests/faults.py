"""Fault injection for the tests: a TCP proxy that misbehaves on demand, and a disk that fills up.

``FaultProxy`` sits between the service and one dependency (PostgreSQL, S3) on loopback and
can, at any moment, pass traffic, refuse connections, hang, or forward a request and then drop
the reply and reset the connection (the "committed, but the client never heard" case). It is a
real socket proxy: the service and the dependency see a real TCP peer behave badly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PASS = "pass"
REFUSE = "refuse"  # new connections are refused (nothing listens); open ones are reset
HANG = "hang"  # connections are accepted, and no byte moves either way until the mode changes
RESET = "reset"  # every open connection is reset now; new ones pass

# PostgreSQL's ReadyForQuery message: the statement (and, in autocommit, its commit) is done.
PG_READY_FOR_QUERY = b"Z" + struct.pack("!I", 5)


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.dropping = False  # swallowing upstream's reply, to reset once it is complete
        self.holding = False  # forwarding nothing more from the client (it waits forever)
        self.closed = False

    def reset(self) -> None:
        self.closed = True
        _reset(self.client)
        _reset(self.upstream)


class FaultProxy:
    """``127.0.0.1:port`` forwarding to ``upstream`` ((host, port), or a Unix socket's path),
    with switchable faults."""

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._mode = PASS
        self._links: list[_Link] = []
        self._drop_marker: bytes | None = None
        self._drops_left = 0
        self._drop_end = PG_READY_FOR_QUERY
        self._hold_marker: bytes | None = None
        self.replies_dropped = 0
        self.requests_held = 0
        self._stopped = threading.Event()
        # The accepting thread owns the listening socket: closing it from another thread while
        # it waits in select() would keep it alive (and accepting) until that select() returns.
        self._listening = threading.Event()
        listener = self._bind(0)
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name="fault-proxy-accept", daemon=True
        )
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # --- switching faults -------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """Switch to ``mode``; it is in force when this returns."""
        with self._lock:
            self._mode = PASS if mode == RESET else mode
            links = list(self._links)
        if mode in (REFUSE, RESET):
            for link in links:
                link.reset()
        deadline = time.monotonic() + 10
        while self._listening.is_set() != (mode != REFUSE):
            assert time.monotonic() < deadline, "the fault proxy did not switch its listener"
            time.sleep(0.005)

    def drop_reply_after(self, marker: bytes, times: int = 1, reply_end: bytes = PG_READY_FOR_QUERY) -> None:
        """The next ``times`` requests containing ``marker`` reach upstream, but their reply is
        swallowed until it contains ``reply_end``, then both sides are reset."""
        with self._lock:
            self._drop_marker = marker
            self._drops_left = times
            self._drop_end = reply_end

    def hold_after(self, marker: bytes) -> None:
        """The next request containing ``marker`` never reaches upstream, nor does anything after
        it on that connection: its sender waits, as on a peer that stopped answering."""
        with self._lock:
            self._hold_marker = marker

    def close(self) -> None:
        self._stopped.set()
        self._acceptor.join(timeout=5)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.reset()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _bind(port: int) -> socket.socket:
        deadline = time.monotonic() + 5
        while True:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", port))
                listener.listen(128)
                return listener
            except OSError as exc:
                listener.close()
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _accept_loop(self, listener: socket.socket | None) -> None:
        self._listening.set()
        try:
            while not self._stopped.is_set():
                with self._lock:
                    refuse = self._mode == REFUSE
                if refuse and listener is not None:
                    listener.close()  # nothing listens: connections are refused
                    listener = None
                    self._listening.clear()
                elif not refuse and listener is None:
                    listener = self._bind(self.port)
                    self._listening.set()
                if listener is None:
                    time.sleep(0.005)
                    continue
                ready, _, _ = select.select([listener], [], [], 0.02)
                if ready:
                    client, _ = listener.accept()
                    self._connect(client)
        finally:
            if listener is not None:
                listener.close()

    def _connect(self, client: socket.socket) -> None:
        try:
            if isinstance(self.upstream, str):
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(self.upstream)
            else:
                upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        link = _Link(client, upstream)
        with self._lock:
            self._links.append(link)
        threading.Thread(target=self._pump, args=(link,), name="fault-proxy-link", daemon=True).start()

    def _pump(self, link: _Link) -> None:
        sockets = [link.client, link.upstream]
        try:
            while not link.closed and not self._stopped.is_set():
                with self._lock:
                    mode = self._mode
                if mode == HANG:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select(sockets, [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        link.closed = True
                        break
                    if sock is link.client:
                        self._from_client(link, data)
                    elif not self._from_upstream(link, data):
                        break
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                link.client.close()
            with contextlib.suppress(OSError):
                link.upstream.close()
            with self._lock:
                if link in self._links:
                    self._links.remove(link)

    def _from_client(self, link: _Link, data: bytes) -> None:
        with self._lock:
            if self._hold_marker is not None and self._hold_marker in data:
                self._hold_marker = None
                self.requests_held += 1
                link.holding = True
            if self._drop_marker is not None and self._drops_left > 0 and self._drop_marker in data:
                self._drops_left -= 1
                link.dropping = True
        if not link.holding:
            link.upstream.sendall(data)

    def _from_upstream(self, link: _Link, data: bytes) -> bool:
        """Forward ``data`` to the client, or swallow it; False once the link was reset."""
        if not link.dropping:
            link.client.sendall(data)
            return True
        if self._drop_end in data:
            with self._lock:
                self.replies_dropped += 1
            link.reset()
            return False
        return True


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a disk that really fills up); the test is skipped,
    with the reason, where this machine does not allow mounting."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full-disk test here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of ``directory`` until at most ``leave`` bytes are free; the filler file."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb") as f:
        try:
            while True:
                stats = os.statvfs(directory)
                free = stats.f_bavail * stats.f_frsize
                if free <= leave:
                    break
                f.write(block[: max(1, min(len(block), free - leave))])
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler
