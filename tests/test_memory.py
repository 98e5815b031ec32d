"""The part path under gunicorn as ops run it: a 64 MiB part does not grow the worker's memory
by more than 16 MiB on either storage (nothing holds a whole part), and reading the body in a
pipeline of threads keeps the connection's framing intact."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunksvc.config import KiB, MiB, StorageSpec
from tests.helpers import payload
from tests.storage_fixtures import make_s3_spec
from tools import harness

PART = 64 * MiB
MAX_GROWTH = 16 * MiB

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


class Served:
    def __init__(self, server: harness.Server, key: str) -> None:
        self.server = server
        self.port = server.port
        self.key = key

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {self.key}", **(headers or {})})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, (json.loads(data) if data else {})

    def create_session(self, size: int, part_size: int) -> str:
        status, session = self.request(
            "POST",
            "/uploads/sessions",
            json.dumps({"filename": "big.bin", "size": size, "part_size": part_size}),
            {"Content-Type": "application/json"},
        )
        assert status == 201, session
        return session["id"]


@pytest.fixture(scope="module", params=["file", "s3"])
def served(request, gunicorn_server, tmp_path_factory) -> Iterator[Served]:
    """gunicorn with one worker (so the one that serves is known) on a database of its own."""
    if request.param == "file":
        spec = StorageSpec(kind="file", root=tmp_path_factory.mktemp("mem") / "storage")
    else:
        spec = make_s3_spec(request.getfixturevalue("radosgw_server"))  # radosgw's memory is not ours
    env = {"CHUNKSVC_WORKERS": "1", "CHUNKSVC_MIN_PART_SIZE": "1", "CHUNKSVC_LOG_LEVEL": "warning"}
    with gunicorn_server(spec, env, name="mem", client="memory") as running:
        yield Served(running.server, running.key)


def status_kib(pid: int, field: str) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def generated(length: int, digest) -> Iterator[bytes]:
    """``length`` bytes, 1 MiB at a time from one buffer whose first bytes change (never held whole)."""
    block = bytearray(payload(MiB))
    for index in range(0, length, MiB):
        block[:8] = index.to_bytes(8, "big")
        chunk = bytes(block[: min(MiB, length - index)])
        digest.update(chunk)
        yield chunk


def test_a_64_mib_part_does_not_grow_the_worker_by_more_than_16_mib(served: Served) -> None:
    (worker,) = served.server.worker_pids()
    # Warm up: the worker has served a part, so its code, pools and connections are loaded.
    warm = served.create_session(4 * KiB, 4 * KiB)
    assert served.request("PUT", f"/uploads/sessions/{warm}/parts/1", payload(4 * KiB))[0] == 201

    session = served.create_session(PART, PART)
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    before = status_kib(worker, "VmRSS") * KiB
    digest = hashlib.sha256()
    status, body = served.request(
        "PUT",
        f"/uploads/sessions/{session}/parts/1",
        generated(PART, digest),
        {"Content-Length": str(PART), "Content-Type": "application/octet-stream"},
    )
    peak = status_kib(worker, "VmHWM") * KiB

    assert status == 201, body
    assert body["sha256"] == digest.hexdigest()  # the whole part went through
    assert peak - before <= MAX_GROWTH, f"the worker grew by {(peak - before) / MiB:.1f} MiB"


def read_response(sock: socket.socket, pending: bytearray) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body (``pending``: bytes already received)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {bytes(pending)!r}"
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        rest += chunk
    pending[:] = rest[length:]
    return int(lines[0].split()[1]), rest[:length]


def test_requests_pipelined_behind_a_part_are_served(served: Served) -> None:
    """Parts and a GET sent in one write: nothing past a part's body is taken as part of it, and
    gunicorn serves what follows on the same connection."""
    first, second = payload(3 * 65536 + 5), payload(3 * 65536 + 5, seed=1)
    session = served.create_session(2 * len(first), len(first))
    auth = f"Authorization: Bearer {served.key}\r\n"

    def put(number: int, data: bytes) -> bytes:
        head = f"PUT /uploads/sessions/{session}/parts/{number} HTTP/1.1\r\nHost: x\r\n{auth}"
        return f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data

    get = f"GET /uploads/sessions/{session} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(put(1, first) + get + put(2, second))
        pending = bytearray()
        status, body = read_response(sock, pending)
        assert status == 201 and json.loads(body)["sha256"] == hashlib.sha256(first).hexdigest()
        status, body = read_response(sock, pending)
        assert status == 200 and json.loads(body)["received_parts"] == 1
        status, body = read_response(sock, pending)
        assert status == 201 and json.loads(body)["sha256"] == hashlib.sha256(second).hexdigest()
