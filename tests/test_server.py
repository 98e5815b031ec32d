"""The service as ops run it: gunicorn with gunicorn.conf.py and chunksvc.wsgi:app, over real sockets."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunksvc.config import StorageSpec
from chunksvc.services import layout
from tests.helpers import payload, sha, split
from tools import harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(gunicorn_server, tmp_path_factory):
    storage_root = tmp_path_factory.mktemp("srv") / "storage"
    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_DEFAULT_PART_SIZE": "65536",
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
    }
    with gunicorn_server(StorageSpec(kind="file", root=storage_root), env, name="srv", client="e2e") as served:
        yield {"gunicorn": served.server, "port": served.server.port, "key": served.key, "root": storage_root}


def request(server, method, path, body=None, headers=None):
    status, response, data = server["gunicorn"].request(
        method, path, body, {"Authorization": f"Bearer {server['key']}", **(headers or {})}
    )
    return status, (json.loads(data) if data else None), response


def test_multi_part_upload_out_of_order_over_http(server):
    data = payload(3 * 65536 + 999)
    status, session, response = request(
        server,
        "POST",
        "/uploads/sessions",
        json.dumps({"filename": "x.bin", "size": len(data)}),
        {"Content-Type": "application/json"},
    )
    assert status == 201 and session["total_parts"] == 4
    assert response.getheader("X-Request-ID")
    parts = split(data, 65536)
    # One keep-alive connection for all parts, out of order.
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    for number in (4, 2, 3, 1):
        conn.request(
            "PUT",
            f"/uploads/sessions/{session['id']}/parts/{number}",
            body=parts[number - 1],
            headers={"Authorization": f"Bearer {server['key']}"},
        )
        response = conn.getresponse()
        assert response.status == 201, response.read()
        assert json.loads(response.read())["sha256"] == sha(parts[number - 1])
    conn.close()
    status, done, _ = request(server, "POST", f"/uploads/sessions/{session['id']}/complete")
    assert status == 200 and done["status"] == "COMPLETED"
    assert (server["root"] / done["object"]["key"]).read_bytes() == data


def test_client_disconnect_mid_body_leaves_nothing(server):
    status, session, _ = request(
        server,
        "POST",
        "/uploads/sessions",
        json.dumps({"filename": "y.bin", "size": 1_000_000, "part_size": 500_000}),
        {"Content-Type": "application/json"},
    )
    assert status == 201
    with socket.create_connection(("127.0.0.1", server["port"])) as sock:
        sock.sendall(
            f"PUT /uploads/sessions/{session['id']}/parts/1 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server['key']}\r\nContent-Length: 500000\r\n\r\n".encode()
        )
        sock.sendall(payload(200_000))
    # The worker notices the short body; give it a moment, then nothing must be recorded or stored.
    deadline = time.monotonic() + 10
    while True:
        leftovers = [p for p in (server["root"]).rglob("*") if p.is_file()]
        parts_dir = [p for p in leftovers if layout.parts_prefix(session["id"]) in str(p)]
        incoming = [p for p in leftovers if ".incoming" in p.parts]
        if not parts_dir and not incoming:
            break
        assert time.monotonic() < deadline, f"stored bytes left behind: {leftovers}"
        time.sleep(0.1)
    status, parts, _ = request(server, "GET", f"/uploads/sessions/{session['id']}/parts")
    assert status == 200 and parts["parts"] == []
    status, state, _ = request(server, "GET", f"/uploads/sessions/{session['id']}")
    assert (state["received_parts"], state["received_bytes"]) == (0, 0)


def test_rejection_comes_before_the_body_is_sent(server):
    """A bad part number is answered without the client sending a single body byte."""
    status, session, _ = request(
        server,
        "POST",
        "/uploads/sessions",
        json.dumps({"filename": "z.bin", "size": 10}),
        {"Content-Type": "application/json"},
    )
    assert status == 201
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as sock:
        sock.sendall(
            f"PUT /uploads/sessions/{session['id']}/parts/7 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server['key']}\r\nContent-Length: 10\r\n\r\n".encode()
        )
        reply = b""
        while b"invalid_part_number" not in reply:
            chunk = sock.recv(65536)  # times out (failing the test) if the server waits for the body
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")


def gunicorn_refusing_to_start(**env: str) -> subprocess.CompletedProcess[str]:
    """gunicorn -c gunicorn.conf.py with ``env`` added, which must refuse to start."""
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
    result = subprocess.run(
        [gunicorn, "-c", "gunicorn.conf.py", "chunksvc.wsgi:app"],
        cwd=ROOT,
        env={**os.environ, "CHUNKSVC_BIND": f"127.0.0.1:{harness.free_port()}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result


def test_gunicorn_refuses_a_bad_setting_by_name():
    """gunicorn.conf.py's CHUNKSVC_* settings are checked like the app's: no traceback, no start."""
    result = gunicorn_refusing_to_start(CHUNKSVC_WORKERS="0")
    assert "chunksvc: CHUNKSVC_WORKERS must be at least 1, got 0" in result.stderr


def test_gunicorn_refuses_statsd_rather_than_ignore_it():
    """gunicorn.conf.py's logger class would silently stand in for gunicorn's statsd logger."""
    result = gunicorn_refusing_to_start(GUNICORN_CMD_ARGS="--statsd-host 127.0.0.1:8125")
    assert "chunksvc: statsd_host is not supported" in result.stderr


def test_pipelined_parts_each_get_their_own_bytes(server):
    """Three requests sent back to back on one connection, before any answer: a small part (its
    whole body arrives with its head, and the next request's bytes with it), a part of several
    blocks, then a GET. The part body is received from gunicorn's socket past gunicorn's reader
    (resources.body.SocketBody), which must leave each next request's bytes where gunicorn finds them."""
    part_size = 2 * 1024 * 1024 + 12_345
    data = payload(part_size + 1000)
    status, session, _ = request(
        server,
        "POST",
        "/uploads/sessions",
        json.dumps({"filename": "p.bin", "size": len(data), "part_size": part_size}),
        {"Content-Type": "application/json"},
    )
    assert status == 201
    first, last = data[:part_size], data[part_size:]
    base = f"/uploads/sessions/{session['id']}"
    auth = f"Authorization: Bearer {server['key']}\r\nHost: x\r\n"
    wire = (
        f"PUT {base}/parts/2 HTTP/1.1\r\n{auth}Content-Length: {len(last)}\r\n\r\n".encode()
        + last
        + f"PUT {base}/parts/1 HTTP/1.1\r\n{auth}Content-Length: {len(first)}\r\n\r\n".encode()
        + first
        + f"GET {base} HTTP/1.1\r\n{auth}\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(wire)
        answers = []
        for _ in range(3):
            response = http.client.HTTPResponse(sock)
            response.begin()
            answers.append((response.status, json.loads(response.read())))
    assert [status for status, _ in answers] == [201, 201, 200]
    assert answers[0][1]["sha256"] == sha(last) and answers[0][1]["size"] == len(last)
    assert answers[1][1]["sha256"] == sha(first) and answers[1][1]["size"] == len(first)
    assert (answers[2][1]["received_parts"], answers[2][1]["received_bytes"]) == (2, len(data))
    status, done, _ = request(server, "POST", f"{base}/complete")
    assert status == 200 and (server["root"] / done["object"]["key"]).read_bytes() == data
