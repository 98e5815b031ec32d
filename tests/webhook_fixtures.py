"""The completion-event tests' receiver, fixtures and helpers (a pytest plugin, registered in
tests/conftest.py, shared by tests/test_webhooks_*.py): a real HTTP receiver on loopback
(answering 2xx or 500, hanging, trickling, or down: its port closed), the registry, in-process
deliverers, the ops commands run in this process or as one, and queries of the outbox.

In-process deliverers get small ``DeliverySettings`` (retries after 0.2 s, not 10 s); the apps of
the ``app`` fixture run no deliverer of their own, so a test decides who delivers and when. Waits
are bounded polls for something another thread or process does (``wait_for``), never sleeps that
assert a speed. Each test file keeps its own ``storage_spec`` (local disk only): a plugin's would
narrow every other test file too.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import webtest

from chunksvc import cli
from chunksvc.db import Database
from chunksvc.metrics import Metrics
from chunksvc.resources.uploads import EventRenderer, SessionRenderer
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings
from chunksvc.services.webhooks import DeliverySettings, SigningKey, WebhookDeliverer, WebhookRegistry
from chunksvc.storage import Storage
from tests.conftest import TEST_LIMITS
from tests.helpers import complete, create, payload, put_part, sha, wait_for
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
KEY_HEX = "5e" * 32
OTHER_KEY_HEX = "a7" * 32
KEY = SigningKey.from_hex(KEY_HEX, "test")
# Retries 0.2 s after the first failure (then 0.4, 0.8, 1 s): a test sees several in a second.
FAST = DeliverySettings(first_retry=0.2, max_retry=1.0, poll_interval=0.05, timeout=5.0)
HANG = "hang"
TRICKLE = "trickle"  # a 200 whose head comes a byte every 0.02 s (about 3 s in all)


# --- a webhook receiver ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answer: int | str  # the status answered, or HANG

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.event["id"]


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records every POST. It answers ``scripted`` answers first,
    then ``answer``: a status, or ``HANG`` (reads the request and never answers, until released;
    ``hanging`` counts such requests whose sender still waits).
    ``stop()`` closes its port (the endpoint is down); ``start()`` opens the same port again.
    Given ``tls`` (a certificate and its key), it serves HTTPS."""

    def __init__(self, answer: int | str = 204, port: int | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.port = port or harness.free_port()
        self.answer = answer
        self.tls = tls
        self.scripted: list[int | str] = []
        self.received: list[Received] = []
        self.hanging = 0
        self.max_hanging = 0
        self.hung_up_mid_answer = 0
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    answer = receiver.scripted.pop(0) if receiver.scripted else receiver.answer
                    receiver.received.append(Received(self.path, dict(self.headers.items()), body, answer))
                    if answer == HANG:
                        receiver.hanging += 1
                        receiver.max_hanging = max(receiver.max_hanging, receiver.hanging)
                if answer == HANG:
                    self._hang()
                    with receiver._lock:
                        receiver.hanging -= 1
                    self.close_connection = True
                    return
                if answer == TRICKLE:
                    self._trickle()
                    self.close_connection = True
                    return
                self.send_response(int(answer))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _hang(self) -> None:
                """Until released, or until the deliverer hangs up (it gave up), at most 30 s."""
                deadline = time.monotonic() + 30
                while not receiver.released.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    try:
                        if readable and not self.connection.recv(1, socket.MSG_PEEK):
                            return
                    except OSError:
                        return

            def _trickle(self) -> None:
                head = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"." * 80 + b"\r\nContent-Length: 0\r\n\r\n"
                try:
                    for index in range(len(head)):
                        self.wfile.write(head[index : index + 1])
                        if receiver.released.wait(0.02):
                            return
                except OSError:
                    receiver.hung_up_mid_answer += 1

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 64  # several deliverers connect at once

            def handle_error(self, request, client_address) -> None:  # a hung-up deliverer: not news
                pass

        self.released.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:  # each accepted connection does its handshake first
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None

    def ids(self, answer: int | str | None = None) -> list[str]:
        """Event ids received, in arrival order (only those answered ``answer``, if given)."""
        with self._lock:
            return [r.event_id for r in self.received if answer is None or r.answer == answer]


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Receivers made by a test (not started: call ``.start()``), all stopped at its end."""
    made: list[Receiver] = []

    def make(answer: int | str = 204, port: int | None = None, tls: tuple[Path, Path] | None = None) -> Receiver:
        made.append(Receiver(answer, port, tls))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def receiver(receivers) -> Receiver:
    return receivers().start()


# --- the service's side ------------------------------------------------------------------------


@pytest.fixture
def registry(db: Database) -> WebhookRegistry:
    return WebhookRegistry(db, KEY)


@pytest.fixture
def deliverers(db: Database, storage: Storage) -> Iterator[Callable[..., WebhookDeliverer]]:
    """In-process deliverers with FAST settings (overridable); stopped at the test's end."""
    made: list[WebhookDeliverer] = []

    def make(key: SigningKey | None = KEY, metrics: Metrics | None = None, **settings: Any) -> WebhookDeliverer:
        deliverer = WebhookDeliverer(
            db,
            key,
            EventRenderer(SessionRenderer(storage.bucket)),
            dataclasses.replace(FAST, **settings),  # settings: its fields, ints and floats
            events=metrics,
        )
        made.append(deliverer)
        return deliverer

    yield make
    for deliverer in made:
        deliverer.stop()


@pytest.fixture
def ops(database_url: str, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path):
    """``python -m chunksvc ARGS`` run in this process (``cli.main``): ``(exit code, stdout, stderr)``."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CHUNKSVC_WEBHOOK_KEY", KEY_HEX)
    monkeypatch.setenv("CHUNKSVC_WEBHOOK_KEY_FILE", str(tmp_path / "absent.key"))
    monkeypatch.setenv("CHUNKSVC_VAR_DIR", str(tmp_path / "var"))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# --- the ops commands as a process, and the outbox as PostgreSQL holds it --------------------------


def chunksvc(database_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m chunksvc ARGS`` as a process, as ops run it."""
    environ = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CHUNKSVC_WEBHOOK_KEY": KEY_HEX,
        "CHUNKSVC_WEBHOOK_KEY_FILE": str(tmp_path / "absent.key"),
        "CHUNKSVC_VAR_DIR": str(tmp_path / "var"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "chunksvc", *args], env=environ, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def query(database_url: str, statement: str, params: tuple | dict = ()) -> list[tuple]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def events(database_url: str, session_id: str | None = None) -> list[tuple[str, str, str]]:
    """``(event id, type, session id)`` of every event (of one session), oldest first."""
    rows = query(
        database_url,
        "SELECT id::text, type, session_id::text FROM webhook_events"
        " WHERE %(s)s::uuid IS NULL OR session_id = %(s)s::uuid ORDER BY seq",
        {"s": session_id},
    )
    return [(event_id, kind, of_session) for event_id, kind, of_session in rows]


def deliveries(database_url: str, endpoint_id: int | None = None) -> list[dict]:
    rows = query(
        database_url,
        "SELECT d.event_id::text AS event_id, d.endpoint_id, d.state, d.attempts, d.last_status, d.last_error,"
        "       ev.type, d.session_id::text AS session_id"
        "  FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id"
        " WHERE %(e)s::bigint IS NULL OR d.endpoint_id = %(e)s ORDER BY d.event_seq, d.endpoint_id",
        {"e": endpoint_id},
    )
    names = ("event_id", "endpoint_id", "state", "attempts", "last_status", "last_error", "type", "session_id")
    return [dict(zip(names, row, strict=True)) for row in rows]


def states(database_url: str, endpoint_id: int | None = None) -> collections.Counter[str]:
    return collections.Counter(d["state"] for d in deliveries(database_url, endpoint_id))


def uploaded(app: webtest.TestApp, auth: dict, seed: int = 0, size: int = 100, sha256: str | None = None) -> str:
    """A session with every part received (1 KiB each); its id."""
    data = payload(size, seed)
    session_id = create(app, auth, size=len(data), part_size=1024, sha256=sha256 or sha(data)).json["id"]
    for number, start in enumerate(range(0, size, 1024), start=1):
        put_part(app, auth, session_id, number, data[start : start + 1024])
    return session_id


def completed(app: webtest.TestApp, auth: dict, seed: int = 0) -> str:
    session_id = uploaded(app, auth, seed)
    complete(app, auth, session_id)
    return session_id


def failed(app: webtest.TestApp, auth: dict, seed: int = 0) -> str:
    """A session FAILED by a checksum mismatch found at completion."""
    session_id = uploaded(app, auth, seed, sha256=sha(b"not these bytes"))
    assert complete(app, auth, session_id, status=422).json["code"] == "checksum_mismatch"
    return session_id


def aborted(app: webtest.TestApp, auth: dict, session_id: str) -> None:
    app.delete(f"/uploads/sessions/{session_id}", headers=auth, status=204)


def make_overdue(database_url: str, session_id: str) -> None:
    query(
        database_url, "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (session_id,)
    )


def reap(db: Database, storage: Storage) -> None:
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    result = Reaper(db, storage, completion, ReaperSettings()).run()
    assert result.errors == 0


def drain(deliverer: WebhookDeliverer, database_url: str, describe: str, timeout: float = 30) -> None:
    """``deliver_due`` until no delivery is pending (retries come due every fraction of a second)."""

    def done() -> bool:
        deliverer.deliver_due()
        return not states(database_url)["pending"]

    wait_for(done, describe, timeout=timeout, interval=0.05)


def get(app: webtest.TestApp, auth: dict, session_id: str) -> dict:
    return app.get(f"/uploads/sessions/{session_id}", headers=auth).json


def listed(ops, *client: str) -> list[dict[str, str]]:
    """``webhooks list`` as rows of its columns (URL last; a roll's note left out)."""
    code, out, err = ops("webhooks", "list", *client)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "CLIENT", "PENDING", "FAILING", "DEAD", "CREATED", "URL"]
    rows = []
    for line in lines:
        fields = line.split()
        # CREATED is a date and a time: two fields.
        rows.append(
            dict(zip(["id", "client", "pending", "failing", "dead", "date", "time", "url"], fields[:8], strict=False))
        )
    return rows
