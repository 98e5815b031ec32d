"""gunicorn as ops run it (gunicorn.conf.py, chunksvc.wsgi:app), on a port of its own, for end-to-end tests."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gunicorn(
    env: dict[str, str], stderr_path: Path, unset: Iterable[str] = ()
) -> Iterator[tuple[subprocess.Popen, int]]:
    """Start gunicorn with ``env`` added to ours (less ``unset``); yield ``(process, port)`` once it
    answers; stop it.

    Its stderr goes to a file: a pipe nobody reads would fill up and stall the server.
    """
    port = free_port()
    full_env = dict(os.environ, CHUNKSVC_BIND=f"127.0.0.1:{port}", **env)
    for name in unset:
        full_env.pop(name, None)
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "chunksvc.wsgi:app"],
            cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        wait_until_serving(process, port, stderr_path)
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(process: subprocess.Popen, port: int, stderr_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("gunicorn did not start: " + stderr_path.read_text()[-3000:])
        time.sleep(0.1)


def worker_pids(master_pid: int) -> set[int]:
    """The master's live worker processes, from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # Fields after the parenthesised command: state, then the parent pid.
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                    pids.add(int(entry.name))
    return pids


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request on a fresh connection: ``(status, headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response, data
