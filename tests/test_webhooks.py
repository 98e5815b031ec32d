"""Completion events (issue 12): the outbox the trigger writes, delivery to a real HTTP receiver on
loopback (answering 2xx or 500, hanging, or down: its port closed), signatures, retries, dead
deliveries, the ops commands, the metrics, and gunicorn servers on one database (a worker killed
mid-delivery, two hosts sharing the work). Real PostgreSQL; local-disk storage (the outbox does
not depend on where the bytes are).

In-process deliverers get small ``DeliverySettings`` (retries after 0.2 s, not 10 s); the apps of
the ``app`` fixture run no deliverer of their own, so a test decides who delivers and when. Waits
are bounded polls for something another thread or process does (``wait_for``), never sleeps that
assert a speed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import hmac
import http.server
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import psycopg
import pytest
import webtest
from prometheus_client import CollectorRegistry

from chunksvc import cli, dao
from chunksvc.app import build
from chunksvc.config import Config, StorageSpec
from chunksvc.db import QUERIES, Database
from chunksvc.errors import ConfigError, InvalidRequest
from chunksvc.metrics import Metrics
from chunksvc.resources.uploads import EventRenderer, SessionRenderer
from chunksvc.services import webhook_deliverer, webhooks
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings, ReapResult
from chunksvc.services.webhooks import (
    SIGNATURE_HEADER,
    DeliveryCounts,
    DeliverySettings,
    SigningKey,
    WebhookDeliverer,
    WebhookRegistry,
    post,
    sign,
    validate_url,
)
from chunksvc.storage import Storage
from chunksvc_client import Client, SignatureError, verify_event
from tests.conftest import TEST_LIMITS
from tests.helpers import complete, create, payload, put_part, sha, wait_for
from tests.test_metrics import parse, value
from tools import harness
from tools.nginx import throwaway_certificate

ROOT = Path(__file__).resolve().parents[1]
KEY_HEX = "5e" * 32
OTHER_KEY_HEX = "a7" * 32
KEY = SigningKey.from_hex(KEY_HEX, "test")
# Retries 0.2 s after the first failure (then 0.4, 0.8, 1 s): a test sees several in a second.
FAST = {"first_retry": 0.2, "max_retry": 1.0, "poll_interval": 0.05, "timeout": 5.0}
SERVER_ENV = {
    "CHUNKSVC_MIN_PART_SIZE": "1",
    "CHUNKSVC_ACCESS_LOG": "/dev/null",
    "CHUNKSVC_DB_POOL_MAX": "4",
    "CHUNKSVC_WEBHOOK_KEY": KEY_HEX,
    "CHUNKSVC_WEBHOOK_POLL": "1",
    "CHUNKSVC_REAP_INTERVAL": "0",
}
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
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


@pytest.fixture
def registry(db: Database) -> WebhookRegistry:
    return WebhookRegistry(db, KEY)


@pytest.fixture
def deliverers(db: Database, storage: Storage) -> Iterator[Callable[..., WebhookDeliverer]]:
    """In-process deliverers with FAST settings (overridable); stopped at the test's end."""
    made: list[WebhookDeliverer] = []

    def make(key: SigningKey | None = KEY, metrics: Metrics | None = None, **settings: float) -> WebhookDeliverer:
        deliverer = WebhookDeliverer(
            db,
            key,
            EventRenderer(SessionRenderer(storage.bucket)),
            DeliverySettings(**{**FAST, **settings}),
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


# --- the outbox ----------------------------------------------------------------------------------


def test_a_state_change_commits_its_event_with_no_deliverer_running(app, auth, database_url, registry, receiver):
    endpoint, _ = registry.add("alice", receiver.url)
    session_id = completed(app, auth)

    [(event_id, kind, of_session)] = events(database_url)
    assert (kind, of_session) == ("session.completed", session_id)
    [delivery] = deliveries(database_url)
    assert delivery["endpoint_id"] == endpoint.id
    assert (delivery["event_id"], delivery["state"], delivery["attempts"]) == (event_id, "pending", 0)
    # The event keeps the session as the change left it.
    [(stored,)] = query(database_url, "SELECT session FROM webhook_events WHERE id = %s", (event_id,))
    assert stored["status"] == "COMPLETED" and stored["object_sha256"] == get(app, auth, session_id)["object"]["sha256"]
    assert receiver.received == []  # nobody delivered anything


def test_a_rolled_back_change_leaves_no_event(app, auth, database_url, registry, receiver):
    registry.add("alice", receiver.url)
    session_id = uploaded(app, auth)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE upload_sessions SET status = 'ABORTED' WHERE id = %s", (session_id,))
        # The trigger wrote it in this transaction ...
        assert conn.execute("SELECT count(*) FROM webhook_events").fetchone() == (1,)
        assert events(database_url) == []  # ... invisible to others until commit
        conn.rollback()
    assert events(database_url) == [] and deliveries(database_url) == []
    assert get(app, auth, session_id)["status"] == "IN_PROGRESS"


def test_only_a_change_to_an_ending_status_makes_an_event_and_only_with_an_endpoint(
    app, auth, other_auth, database_url, registry, receiver
):
    silent = completed(app, auth, seed=1)  # alice has no endpoint yet: no event
    registry.add("alice", receiver.url)
    open_session = uploaded(app, auth, seed=2)  # INIT -> IN_PROGRESS: no event
    completed(app, other_auth, seed=3)  # bob has no endpoint
    assert events(database_url) == []
    aborted(app, auth, open_session)
    aborted(app, auth, open_session)  # ABORTED again changes nothing: no second event
    query(database_url, "UPDATE upload_sessions SET updated_at = now() WHERE id = %s", (silent,))
    assert [(kind, s) for _, kind, s in events(database_url)] == [("session.aborted", open_session)]


def test_each_active_endpoint_of_the_client_gets_its_own_delivery(app, auth, database_url, registry, receivers):
    first, second, removed = (registry.add("alice", receivers().url)[0] for _ in range(3))
    registry.remove(removed.id)
    completed(app, auth)
    assert sorted(d["endpoint_id"] for d in deliveries(database_url)) == [first.id, second.id]


# --- signatures and the body ------------------------------------------------------------------


def test_the_signature_verifies_with_the_secret_add_prints_and_the_body_is_the_session_as_get_shows_it(
    app, auth, database_url, ops, receiver, deliverers
):
    code, out, err = ops("webhooks", "add", "alice", receiver.url + "?source=chunksvc")
    assert code == 0, err
    secret = out.splitlines()[-1]  # the last line is the secret alone
    assert secret.startswith("whsec_") and len(out.splitlines()) == 3
    [(endpoint_id,)] = query(database_url, "SELECT id FROM webhook_endpoints")
    # Not stored: the database holds a nonce, from which the secret cannot be made without the key.
    [(nonce,)] = query(database_url, "SELECT secret_nonce FROM webhook_endpoints")
    assert secret.encode() not in bytes(nonce) and KEY.secret(bytes(nonce)) == secret
    data = payload(100)  # a body in UTF-8, not ASCII: the signature covers the bytes sent
    session_id = create(
        app, auth, filename="naïve ✓.bin", size=100, sha256=sha(data), metadata={"team": "données"}
    ).json["id"]
    put_part(app, auth, session_id, 1, data)
    complete(app, auth, session_id)

    assert deliverers().deliver_due().delivered == 1

    [request] = receiver.received
    header = request.headers[SIGNATURE_HEADER]
    event = verify_event(request.body, header, [secret])
    assert set(event) == {"id", "type", "created_at", "session"}
    assert event["type"] == "session.completed" and event["session"]["status"] == "COMPLETED"
    assert event["session"] == get(app, auth, session_id)
    assert "naïve ✓.bin".encode() in request.body  # as UTF-8, not escaped
    assert event["id"] == events(database_url)[0][0] == request.headers["Chunksvc-Event-Id"]
    assert request.path == "/hooks?source=chunksvc" and request.headers["Content-Type"] == "application/json"
    assert abs(int(header.split(",")[0].removeprefix("t=")) - time.time()) < 300
    with pytest.raises(SignatureError):
        verify_event(request.body.replace(b"COMPLETED", b"COMPLETEX"), header, [secret])
    with pytest.raises(SignatureError):
        verify_event(request.body, header, [KEY.secret(b"\0" * 32)])
    with pytest.raises(SignatureError):
        verify_event(request.body, header, [secret[:-1] + ("A" if secret[-1] != "A" else "B")])

    # A roll: both secrets sign for the overlap; the new one is the last line.
    code, out, err = ops("webhooks", "rotate", str(endpoint_id), "--overlap", "3600")
    assert code == 0, err
    new_secret = out.splitlines()[-1]
    assert new_secret.startswith("whsec_") and new_secret != secret
    assert "previous one also signs until" in out
    assert "secret roll until" in ops("webhooks", "list")[1]
    completed(app, auth, seed=1)
    assert deliverers().deliver_due().delivered == 1
    rolled = receiver.received[-1]
    for secrets in ([secret], [new_secret], [new_secret, secret]):
        assert verify_event(rolled.body, rolled.headers[SIGNATURE_HEADER], secrets)["type"] == "session.completed"
    assert rolled.headers[SIGNATURE_HEADER].count("v1=") == 2

    # Overlap 0: only the newest secret signs from now on.
    code, out, err = ops("webhooks", "rotate", str(endpoint_id), "--overlap", "0")
    assert code == 0 and "the previous one also signs no longer" in out, err
    newest = out.splitlines()[-1]
    completed(app, auth, seed=2)
    assert deliverers().deliver_due().delivered == 1
    last = receiver.received[-1]
    assert verify_event(last.body, last.headers[SIGNATURE_HEADER], [newest])
    assert last.headers[SIGNATURE_HEADER].count("v1=") == 1
    for stale in (secret, new_secret):
        with pytest.raises(SignatureError):
            verify_event(last.body, last.headers[SIGNATURE_HEADER], [stale])


def test_a_roll_whose_overlap_has_passed_signs_with_the_new_secret_only(
    app, auth, database_url, registry, receiver, deliverers
):
    endpoint, old = registry.add("alice", receiver.url)
    _, new = registry.rotate(endpoint.id, 3600)
    query(database_url, "UPDATE webhook_endpoints SET previous_until = now() - interval '1 second'")
    completed(app, auth)
    deliverers().deliver_due()
    [request] = receiver.received
    assert verify_event(request.body, request.headers[SIGNATURE_HEADER], [new])
    with pytest.raises(SignatureError):
        verify_event(request.body, request.headers[SIGNATURE_HEADER], [old])


def test_sign_puts_the_newest_secret_first_and_verify_event_reads_what_sign_writes():
    header = sign(["whsec_new", "whsec_old"], 1_800_000_000, b"{}")
    assert header.startswith("t=1800000000,v1=") and header.count(",v1=") == 2
    first = hmac.new(b"whsec_new", b"1800000000.{}", hashlib.sha256).hexdigest()
    assert header.split(",")[1] == f"v1={first}"
    assert verify_event(b"{}", header, ["whsec_old"], now=1_800_000_000) == {}


def test_the_signing_key():
    assert KEY.key_id == SigningKey.from_hex(KEY_HEX.upper(), "again").key_id  # names the key ...
    assert KEY.key_id != SigningKey.from_hex(OTHER_KEY_HEX, "other").key_id
    assert KEY_HEX not in KEY.key_id  # ... without showing it
    nonce = os.urandom(32)
    assert KEY.secret(nonce) == KEY.secret(nonce) != SigningKey.from_hex(OTHER_KEY_HEX, "o").secret(nonce)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        SigningKey.from_hex("ab" * 31, "short")
    with pytest.raises(ConfigError, match="must be hex"):
        SigningKey.from_hex("xyz" * 30, "CHUNKSVC_WEBHOOK_KEY")


def test_a_key_file_is_made_once_with_mode_0600(tmp_path):
    path = tmp_path / "var" / "webhook-signing.key"
    assert SigningKey.load(None, path, create=False) is None
    made = SigningKey.load(None, path, create=True)
    assert made is not None and path.stat().st_mode & 0o777 == 0o600
    again = SigningKey.load(None, path, create=True)
    assert again is not None and again.key_id == made.key_id  # read, not made again
    assert SigningKey.load(KEY_HEX, path, create=True).key_id == KEY.key_id  # the variable wins
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_backoff_first_retry_within_30_s_doubling_with_jitter_to_the_cap():
    settings = DeliverySettings()
    for _ in range(50):
        assert 8 <= settings.retry_in(1) <= 12 <= 30
        assert 16 <= settings.retry_in(2) <= 24
        assert 0.8 * 3600 <= settings.retry_in(40) <= 1.2 * 3600
    assert len({settings.retry_in(1) for _ in range(20)}) > 1  # jittered
    assert settings.retry_for >= 24 * 3600 and settings.timeout == 10


# --- retries -------------------------------------------------------------------------------------


def test_a_receiver_answering_500_gets_the_same_event_again_then_it_is_delivered(
    app, auth, database_url, ops, registry, receiver, deliverers
):
    endpoint, secret = registry.add("alice", receiver.url)
    receiver.scripted = [500]
    completed(app, auth)

    first = deliverers(first_retry=30, max_retry=60).deliver_due()

    assert (first.delivered, first.failed, first.dead) == (0, 1, 0)
    [row] = listed(ops, "alice")
    assert (row["id"], row["pending"], row["failing"], row["dead"]) == (str(endpoint.id), "1", "1", "0")
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("pending", 1, 500)
    assert delivery["last_error"] == "HTTP 500"
    [(retry_in,)] = query(database_url, "SELECT extract(epoch FROM next_attempt_at - now()) FROM webhook_deliveries")
    assert 0.8 * 30 - 5 <= retry_in <= 1.2 * 30  # the first backoff, jittered
    query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now()")  # ... has passed

    drain(deliverers(), database_url, "the retry")

    assert [r.answer for r in receiver.received] == [500, 204]
    assert receiver.ids()[0] == receiver.ids()[1] == delivery["event_id"]  # the same event id
    assert receiver.received[0].body == receiver.received[1].body  # the same bytes, signed anew
    for request in receiver.received:
        verify_event(request.body, request.headers[SIGNATURE_HEADER], [secret])
    [row] = listed(ops)
    assert (row["pending"], row["failing"], row["dead"]) == ("0", "0", "0")
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("delivered", 2, 204)


def test_only_a_2xx_is_a_delivery(app, auth, database_url, registry, receiver, deliverers):
    """A redirect is not followed and a 4xx is retried like a 5xx; any 2xx delivers."""
    registry.add("alice", receiver.url)
    receiver.scripted = [301, 404, 202]
    completed(app, auth)

    drain(deliverers(), database_url, "the third try")

    assert [r.answer for r in receiver.received] == [301, 404, 202]
    assert len(set(receiver.ids())) == 1
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("delivered", 3, 202)


def test_a_receiver_down_for_a_while_gets_everything_in_order_per_session(
    app, auth, db, storage, database_url, registry, receivers, deliverers
):
    receiver = receivers()  # not started: its port is closed
    registry.add("alice", receiver.url)
    deliverer = deliverers()
    deliverer.start()
    # Sessions with two events each (FAILED then ABORTED, EXPIRED then ABORTED) and with one.
    two_events = [failed(app, auth, seed) for seed in range(3)]
    expiring = uploaded(app, auth, seed=10)
    make_overdue(database_url, expiring)
    reap(db, storage)
    for session_id in two_events:
        aborted(app, auth, session_id)
    aborted(app, auth, expiring)
    one_event = [completed(app, auth, seed) for seed in range(20, 23)]
    wait_for(
        lambda: all(d["attempts"] >= 2 for d in deliveries(database_url) if d["type"] != "session.aborted"),
        "every session's first event to have failed twice",
    )
    # While the first event of a session is undelivered, the next one is not even tried.
    assert all(d["attempts"] == 0 for d in deliveries(database_url) if d["type"] == "session.aborted")
    assert receiver.received == []

    receiver.start()
    wait_for(lambda: not states(database_url)["pending"], "the backlog to be delivered")

    expected = {s: [e for e, _, _ in events(database_url, s)] for s in [*two_events, expiring, *one_event]}
    assert [len(ids) for ids in expected.values()] == [2, 2, 2, 2, 1, 1, 1]
    arrived: dict[str, list[str]] = collections.defaultdict(list)
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    for request in receiver.received:
        arrived[request.event["session"]["id"]].append(request.event_id)
        kinds[request.event["session"]["id"]].append(request.event["type"])
    assert arrived == expected  # everything, once each, and in order within each session
    assert all(kinds[s] == ["session.failed", "session.aborted"] for s in two_events)
    assert kinds[expiring] == ["session.expired", "session.aborted"]
    assert all(kinds[s] == ["session.completed"] for s in one_event)
    assert all(d["attempts"] == 1 for d in deliveries(database_url) if d["type"] == "session.aborted")
    assert states(database_url) == {"delivered": 11}


def test_a_dead_delivery_is_redelivered_on_request(app, auth, database_url, ops, registry, receiver, deliverers):
    endpoint, _ = registry.add("alice", receiver.url)
    receiver.answer = 500
    completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    deliverer = deliverers(retry_for=0.5)
    dead = wait_for(
        lambda: deliverer.deliver_due().dead and deliveries(database_url)[0]["state"] == "dead",
        "the delivery to be given up",
    )
    assert dead
    [row] = listed(ops)
    assert (row["pending"], row["failing"], row["dead"]) == ("0", "0", "1")
    tries = len(receiver.received)
    assert tries >= 2 and set(receiver.ids()) == {event_id}
    assert deliverer.deliver_due().failed == 0 and len(receiver.received) == tries  # dead: not tried again
    # How ops find it: `webhooks events --state dead`.
    code, out, err = ops("webhooks", "events", "--state", "dead")
    assert code == 0, err
    header, line = out.splitlines()
    assert header.split()[:6] == ["EVENT", "TYPE", "SESSION", "ENDPOINT", "STATE", "TRIES"]
    assert line.split()[:6] == [
        event_id,
        "session.completed",
        events(database_url)[0][2],
        str(endpoint.id),
        "dead",
        str(tries),
    ]
    assert line.endswith("HTTP 500")

    receiver.answer = 204
    code, out, err = ops("webhooks", "redeliver", event_id)
    assert (code, out.strip()) == (0, f"event {event_id} due again to endpoint(s) {endpoint.id}"), err
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["last_error"]) == ("pending", None)
    assert deliverer.deliver_due().delivered == 1
    assert receiver.ids(204) == [event_id]
    assert deliveries(database_url)[0]["state"] == "delivered"
    # Redelivering a delivered event sends it again (a receiver asked for it: it deduplicates).
    assert ops("webhooks", "redeliver", event_id)[0] == 0
    assert deliverer.deliver_due().delivered == 1 and receiver.ids(204) == [event_id, event_id]

    unknown = uuid.uuid4()
    code, _, err = ops("webhooks", "redeliver", str(unknown))
    assert code == 2 and f"no event {unknown}: never made, or pruned" in err


def test_redeliver_leaves_a_pending_delivery_alone(app, auth, database_url, ops, registry, receiver):
    """A pending delivery is being sent (or will be): making it due now could send it twice at
    once, or ahead of an earlier event of its session."""
    registry.add("alice", receiver.url)
    completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    before = deliveries(database_url)
    code, _, err = ops("webhooks", "redeliver", event_id)
    assert code == 2 and "a pending one is being sent anyway" in err
    assert deliveries(database_url) == before


# --- every ending ---------------------------------------------------------------------------------


def test_abort_expiry_failure_and_a_background_completion_each_emit_their_event(
    config, db, storage, auth, database_url, registry, receiver, deliverers
):
    service = build(dataclasses.replace(config, sync_complete_max=2000), db=db, storage=storage)
    app = webtest.TestApp(service.app)
    try:
        registry.add("alice", receiver.url)
        to_abort = uploaded(app, auth, seed=1)
        aborted(app, auth, to_abort)
        to_expire = uploaded(app, auth, seed=2)
        make_overdue(database_url, to_expire)
        reap(db, storage)
        to_fail = failed(app, auth, seed=3)
        large = uploaded(app, auth, seed=4, size=5000)
        assert complete(app, auth, large, status=202).json["status"] == "COMPLETING"
        assert service.assembler.wait_idle(30)
    finally:
        service.assembler.stop()

    drain(deliverers(), database_url, "the four events")

    by_session = {r.event["session"]["id"]: r.event for r in receiver.received}
    assert len(receiver.received) == 4
    expected = {
        to_abort: ("session.aborted", "ABORTED"),
        to_expire: ("session.expired", "EXPIRED"),
        to_fail: ("session.failed", "FAILED"),
        large: ("session.completed", "COMPLETED"),
    }
    assert {s: (e["type"], e["session"]["status"]) for s, e in by_session.items()} == expected
    for session_id, event in by_session.items():
        assert event["session"] == get(app, auth, session_id)
    assert by_session[large]["session"]["object"]["size"] == 5000


# --- isolation and sharing ------------------------------------------------------------------------


def test_an_https_endpoint_gets_signed_events_once_its_certificate_verifies(
    app, auth, database_url, registry, receivers, deliverers, tmp_path, monkeypatch
):
    """HTTPS endpoints: the certificate is verified against the host's CA store (a certificate it
    cannot verify is a failed attempt, retried like any other), then the event arrives signed."""
    certificate, key = throwaway_certificate(tmp_path)
    secure = receivers(tls=(certificate, key)).start()
    _, secret = registry.add("alice", secure.url)
    completed(app, auth)

    counts = deliverers().deliver_due()
    assert (counts.delivered, counts.failed) == (0, 1)
    [refused] = deliveries(database_url)
    assert refused["state"] == "pending" and "CERTIFICATE_VERIFY_FAILED" in refused["last_error"]
    assert secure.received == []

    # The host's CA store, as OpenSSL finds it (SSL_CERT_FILE), now holds the certificate.
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now()")  # the retry, due now
    assert deliverers().deliver_due().delivered == 1
    [request] = secure.received
    event = verify_event(request.body, request.headers[SIGNATURE_HEADER], [secret])
    assert event["type"] == "session.completed" and event["id"] == refused["event_id"]


def test_a_receiver_trickling_its_answer_is_given_up_at_the_timeout(
    app, auth, database_url, registry, receivers, deliverers
):
    """Every byte of the answer's head within the socket timeout, the head as a whole far beyond
    the attempt's: the attempt still ends at its timeout (the deliverer hangs up mid-answer)."""
    slow = receivers(TRICKLE).start()
    registry.add("alice", slow.url)
    completed(app, auth)

    counts = deliverers(timeout=0.3).deliver_due()

    assert (counts.delivered, counts.failed) == (0, 1)
    assert deliveries(database_url)[0]["last_error"] == "no answer within 0.3 s"
    wait_for(lambda: slow.hung_up_mid_answer == 1, "the receiver to find the deliverer gone", timeout=5)


def test_a_hanging_endpoint_does_not_hold_back_another_clients(
    app, auth, other_auth, database_url, registry, receivers, deliverers
):
    """Alice's endpoint takes every attempt and never answers (within the 10 s timeout); Bob's
    events, made at the same time, are delivered while Alice's attempts still hang."""
    slow, fast = receivers(HANG).start(), receivers().start()
    slow_endpoint, _ = registry.add("alice", slow.url)
    fast_endpoint, _ = registry.add("bob", fast.url)
    for seed in range(6):
        completed(app, auth, seed)
    bobs = [completed(app, other_auth, seed) for seed in range(10, 16)]
    deliverer = deliverers(timeout=10.0, concurrency=4, per_endpoint=2)
    deliverer.start()

    wait_for(lambda: states(database_url, fast_endpoint.id)["delivered"] == 6, "bob's events")

    assert sorted(r.event["session"]["id"] for r in fast.received) == sorted(bobs)
    # Alice's: two attempts under way (per_endpoint), none ended: bob's did not wait for them.
    alices = deliveries(database_url, slow_endpoint.id)
    assert [d["state"] for d in alices] == ["pending"] * 6
    assert sum(d["attempts"] for d in alices) == 2 and all(d["last_error"] is None for d in alices)
    wait_for(lambda: slow.hanging == 2, "alice's receiver to hold both")
    assert slow.max_hanging == 2 and len(slow.received) == 2
    slow.released.set()


def test_failing_endpoints_share_at_most_half_of_the_attempts(
    app, auth, other_auth, database_url, registry, receivers, deliverers, monkeypatch
):
    """Four endpoints that hang could hold all four attempt slots of a process; once they have
    failed there, they hold at most two (``failing_share``), one attempt each, and another
    client's events go through the other two."""
    hanging, fast = receivers(HANG).start(), receivers().start()
    slow_ids = [registry.add("alice", f"{hanging.url}/{n}")[0].id for n in range(4)]
    fast_endpoint, _ = registry.add("bob", fast.url)
    for seed in range(2):
        completed(app, auth, seed)  # two events for each of alice's four endpoints
    running: collections.Counter[str] = collections.Counter()
    peak = {"slow": 0}
    lock = threading.Lock()
    real_post = webhooks.post

    def counting_post(url: str, *args, **kwargs):
        with lock:
            running[url] += 1
            slow_now = sum(n for u, n in running.items() if u.startswith(hanging.url))
            peak["slow"] = max(peak["slow"], slow_now)
        try:
            return real_post(url, *args, **kwargs)
        finally:
            with lock:
                running[url] -= 1

    monkeypatch.setattr(webhook_deliverer, "post", counting_post)  # where the deliverer looks it up
    deliverer = deliverers(timeout=0.5, concurrency=4, per_endpoint=2)
    deliverer.start()

    def attempts_each() -> list[int]:
        by_endpoint = collections.Counter()
        for d in deliveries(database_url):
            if d["endpoint_id"] in slow_ids and d["last_error"] is not None:
                by_endpoint[d["endpoint_id"]] += d["attempts"]
        return [by_endpoint[e] for e in slow_ids]

    wait_for(lambda: min(attempts_each()) >= 1, "each of alice's endpoints to have failed")
    before = sum(attempts_each())  # all four are failing here now: the share applies ...
    wait_for(lambda: sum(n for u, n in running.items() if u.startswith(hanging.url)) <= 2, "the share to apply")
    with lock:  # ... once the attempts begun before have timed out
        peak["slow"] = sum(n for u, n in running.items() if u.startswith(hanging.url))
    bobs = [completed(app, other_auth, seed) for seed in range(10, 14)]
    wait_for(lambda: states(database_url, fast_endpoint.id)["delivered"] == 4, "bob's events")
    wait_for(lambda: sum(attempts_each()) >= before + 6, "alice's endpoints to be tried again")

    assert peak["slow"] <= 2  # failing_share of concurrency 4
    assert sorted(r.event["session"]["id"] for r in fast.received) == sorted(bobs)
    assert all(states(database_url, e) == {"pending": 2} for e in slow_ids)
    hanging.released.set()


def test_an_endpoint_that_does_not_answer_in_time_fails_the_attempt(
    app, auth, database_url, registry, receivers, deliverers
):
    slow = receivers(HANG).start()
    registry.add("alice", slow.url)
    completed(app, auth)

    counts = deliverers(timeout=0.5).deliver_due()

    assert (counts.delivered, counts.failed) == (0, 1)
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["last_status"], delivery["last_error"]) == (
        "pending",
        None,
        "no answer within 0.5 s",
    )
    wait_for(lambda: slow.hanging == 0, "the receiver to see the deliverer hang up")


def test_two_hosts_deliver_each_event_exactly_once(db, database_url, storage_spec, tmp_path, registry, receiver):
    """Two gunicorn servers (two workers each) on one database, 100 completions: each event is
    sent once (no double sends while all is well), and all are delivered."""
    key = harness.create_api_key(database_url, "alice")
    registry.add("alice", receiver.url)
    count = 100
    data = payload(100)
    with contextlib.ExitStack() as stack:
        hosts = [
            stack.enter_context(
                harness.gunicorn(
                    database_url,
                    storage_spec,
                    env={**SERVER_ENV, "CHUNKSVC_WORKERS": "2"},
                    cwd=ROOT,
                    stderr_path=tmp_path / f"host{index}.log",
                )
            )
            for index in range(2)
        ]
        clients = [stack.enter_context(Client(host.url, key)) for host in hosts]

        def one(index: int) -> str:
            client = clients[index % 2]
            session = client.create_session(f"f{index}", len(data), part_size=1024, sha256=sha(data))
            client.put_part(session["id"], 1, data)
            return client.complete(session["id"])["id"]

        with ThreadPoolExecutor(8) as pool:
            sessions = list(pool.map(one, range(count)))
        wait_for(lambda: len(set(receiver.ids())) == count, f"{count} events at the receiver")
        wait_for(lambda: states(database_url) == {"delivered": count}, "every delivery recorded")
    assert collections.Counter(receiver.ids()).most_common(1)[0][1] == 1  # none twice
    assert sorted(r.event["session"]["id"] for r in receiver.received) == sorted(sessions)
    assert {d["attempts"] for d in deliveries(database_url)} == {1}
    for index in range(2):
        log = (tmp_path / f"host{index}.log").read_text()
        assert "Traceback" not in log and "outcome not recorded" not in log, log[-2000:]


def upload_one_file(client: Client) -> dict:
    """A one-part upload through a running server, completed (its session)."""
    data = payload(100)
    session = client.create_session("f", len(data), sha256=sha(data))
    client.put_part(session["id"], 1, data)
    assert client.complete(session["id"])["status"] == "COMPLETED"
    return session


def kill_the_worker(server: harness.Server) -> None:
    """kill -9 the server's one worker, and wait for the master to start another."""
    [worker] = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: worker not in server.worker_pids() and server.worker_pids(), "a new worker")


def test_a_worker_killed_mid_delivery_leaves_it_to_the_next_deliverer(
    db, database_url, storage_spec, tmp_path, registry, receiver
):
    """kill -9 of the only worker while its deliverer waits on a hanging receiver: the delivery
    stays pending under its lease; once the lease has run out (set here: it is 60 s) the
    restarted worker delivers it, with the same event id."""
    key = harness.create_api_key(database_url, "alice")
    registry.add("alice", receiver.url)
    receiver.answer = HANG
    with (
        harness.gunicorn(
            database_url,
            storage_spec,
            env={**SERVER_ENV, "CHUNKSVC_WORKERS": "1"},
            cwd=ROOT,
            stderr_path=tmp_path / "gunicorn.log",
        ) as server,
        Client(server.url, key) as client,
    ):
        upload_one_file(client)
        wait_for(lambda: receiver.hanging == 1, "the worker's deliverer to be waiting on the receiver")
        kill_the_worker(server)
        [delivery] = deliveries(database_url)
        assert (delivery["state"], delivery["attempts"]) == ("pending", 1)  # the lease holds it

        receiver.answer = 204
        receiver.released.set()
        query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now()")  # the lease ran out
        wait_for(lambda: states(database_url) == {"delivered": 1}, "the new worker to deliver")
    [event_id] = set(receiver.ids())
    assert [r.answer for r in receiver.received] == [HANG, 204] and event_id == delivery["event_id"]
    assert receiver.received[-1].event["session"]["status"] == "COMPLETED"


def test_deliver_once_sends_what_a_killed_server_left_behind(database_url, storage_spec, tmp_path, registry, receivers):
    """A server with no signing key: uploads work, nothing is delivered, nothing crashes. Its
    worker is killed after a completion; `deliver --once` later sends the event."""
    key = harness.create_api_key(database_url, "alice")
    receiver = receivers().start()
    registry.add("alice", receiver.url)
    with (
        harness.gunicorn(
            database_url,
            storage_spec,
            env={**SERVER_ENV, "CHUNKSVC_WORKERS": "1", "CHUNKSVC_WEBHOOK_KEY_FILE": str(tmp_path / "absent.key")},
            unset=["CHUNKSVC_WEBHOOK_KEY"],
            cwd=ROOT,
            stderr_path=tmp_path / "gunicorn.log",
        ) as server,
        Client(server.url, key) as client,
    ):
        session = upload_one_file(client)
        kill_the_worker(server)
        assert server.request("GET", "/healthz")[0] == 200
    assert states(database_url) == {"pending": 1} and receiver.received == []

    done = chunksvc(database_url, tmp_path, "deliver", "--once")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("delivered 1, failed 0 (to be retried), dead 0")
    assert receiver.received[0].event["session"]["id"] == session["id"]
    assert states(database_url) == {"delivered": 1}


def test_deliver_once_exits_1_when_an_attempt_failed(database_url, tmp_path, app, auth, registry, receivers):
    good, bad = receivers().start(), receivers(500).start()
    registry.add("alice", good.url)
    registry.add("alice", bad.url)
    completed(app, auth)

    done = chunksvc(database_url, tmp_path, "deliver", "--once")

    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("delivered 1, failed 1 (to be retried), dead 0")
    assert len(good.received) == len(bad.received) == 1
    nothing = chunksvc(database_url, tmp_path, "deliver", "--once")  # the failed one is not due yet
    assert nothing.returncode == 0 and nothing.stdout.startswith("delivered 0, failed 0 (to be retried), dead 0")
    without_key = chunksvc(database_url, tmp_path, "deliver", "--once", CHUNKSVC_WEBHOOK_KEY="")
    assert without_key.returncode == 2 and "no webhook signing key" in without_key.stderr


# --- no key, another key ----------------------------------------------------------------------------


def test_a_server_without_a_signing_key_delivers_nothing_and_serves(
    config, db, storage, auth, database_url, registry, receiver, tmp_path, deliverers
):
    registry.add("alice", receiver.url)
    service = build(
        dataclasses.replace(config, webhook_key=None, webhook_key_file=tmp_path / "absent.key"), db=db, storage=storage
    )
    service.deliverer.start()  # no thread: nothing to sign with
    try:
        app = webtest.TestApp(service.app)
        session_id = completed(app, auth)
        assert get(app, auth, session_id)["status"] == "COMPLETED"
        assert not any(t.name == "chunksvc-webhooks" for t in threading.enumerate())
    finally:
        service.deliverer.stop()
        service.assembler.stop()
    assert states(database_url) == {"pending": 1} and receiver.received == []
    with pytest.raises(ConfigError, match="no webhook signing key"):
        deliverers(key=None).deliver_due()


def test_endpoints_of_another_signing_key_are_not_claimed(
    app, auth, database_url, ops, monkeypatch, registry, receiver, deliverers
):
    registry.add("alice", receiver.url)
    completed(app, auth)
    other = deliverers(key=SigningKey.from_hex(OTHER_KEY_HEX, "other"))
    assert other.deliver_due() == DeliveryCounts(0, 0, 0)
    [delivery] = deliveries(database_url)
    assert (delivery["state"], delivery["attempts"]) == ("pending", 0) and receiver.received == []
    monkeypatch.setenv("CHUNKSVC_WEBHOOK_KEY", OTHER_KEY_HEX)
    code, out, _ = ops("webhooks", "list")
    assert code == 0 and "(its secret comes from another signing key: hosts with this key do not send)" in out
    assert deliverers().deliver_due().delivered == 1  # the key that made its secret sends it


def test_set_url_moves_an_endpoint_with_its_secret_and_pending_events(
    app, auth, database_url, ops, registry, receivers, deliverers
):
    down, new = receivers(), receivers().start()  # the old URL's port is closed
    endpoint, secret = registry.add("alice", down.url)
    completed(app, auth, seed=1)
    completed(app, auth, seed=2)
    assert deliverers(first_retry=30, max_retry=60).deliver_due().failed == 2

    code, out, err = ops("webhooks", "set-url", str(endpoint.id), new.url)
    assert (code, out.strip()) == (
        0,
        f"webhook endpoint {endpoint.id} now sends to {new.url} (same secret, pending events kept)",
    ), err
    query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now()")  # the backoff has passed
    assert deliverers().deliver_due().delivered == 2
    for request in new.received:
        assert verify_event(request.body, request.headers[SIGNATURE_HEADER], [secret])
    assert [r["url"] for r in listed(ops)] == [new.url]
    code, _, err = ops("webhooks", "set-url", str(endpoint.id), "ftp://example.com/")
    assert code == 2 and "the URL must be http" in err
    code, _, err = ops("webhooks", "set-url", "999", new.url)
    assert code == 2 and "no webhook endpoint 999 in use" in err


# --- the ops commands ---------------------------------------------------------------------------------


def test_webhooks_add_refuses_an_unknown_client_and_a_bad_url(ops, keys):
    keys.create("alice")
    code, out, err = ops("webhooks", "add", "nobody", "http://127.0.0.1:9/")
    assert (code, out) == (2, "")
    assert err.strip() == "chunksvc: no client named 'nobody' (a client exists once it has an API key)"
    for url in ("ftp://example.com/x", "not a url", "http:///nohost", "http://h:99999/", "http://h/#frag"):
        code, out, err = ops("webhooks", "add", "alice", url)
        assert (code, out) == (2, ""), url
        assert err.startswith("chunksvc: the URL"), err
    assert listed(ops) == []


def test_webhooks_list_remove_and_their_errors(app, auth, other_auth, database_url, ops, registry, receivers):
    a_url, b_url = receivers().url, receivers().url
    code, out, _ = ops("webhooks", "add", "alice", a_url)
    alice_id = int(out.split()[2])
    assert out.splitlines()[0] == f"webhook endpoint {alice_id} for client 'alice': {a_url}"
    code, out, _ = ops("webhooks", "add", "bob", b_url)
    bob_id = int(out.split()[2])
    completed(app, auth, seed=1)
    completed(app, auth, seed=2)
    completed(app, other_auth, seed=3)

    rows = listed(ops)
    assert [(r["id"], r["client"], r["pending"], r["failing"], r["dead"], r["url"]) for r in rows] == [
        (str(alice_id), "alice", "2", "0", "0", a_url),
        (str(bob_id), "bob", "1", "0", "0", b_url),
    ]
    assert [r["client"] for r in listed(ops, "bob")] == ["bob"]
    assert listed(ops, "nobody") == []

    code, out, err = ops("webhooks", "remove", str(alice_id))
    assert (code, out.strip()) == (0, f"removed webhook endpoint {alice_id} (2 undelivered events dropped)"), err
    assert [r["client"] for r in listed(ops)] == ["bob"]
    assert states(database_url, alice_id) == {}
    completed(app, auth, seed=4)  # alice has no endpoint now: no event
    assert len(events(database_url)) == 3

    for args in (("remove", str(alice_id)), ("rotate", str(alice_id))):
        code, _, err = ops("webhooks", *args)
        assert code == 2 and f"no webhook endpoint {alice_id} in use" in err
    with pytest.raises(SystemExit) as usage:
        ops("webhooks", "remove", "0")
    assert usage.value.code == 2


def test_ops_without_a_signing_key_are_refused(database_url, tmp_path, keys):
    keys.create("alice")
    result = chunksvc(
        database_url, tmp_path, "webhooks", "add", "alice", "http://127.0.0.1:9/", CHUNKSVC_WEBHOOK_KEY=""
    )
    assert result.returncode == 2 and "no webhook signing key: set CHUNKSVC_WEBHOOK_KEY" in result.stderr
    bad = chunksvc(database_url, tmp_path, "webhooks", "list", CHUNKSVC_WEBHOOK_KEY="abcd")
    assert bad.returncode == 2 and "at least 64 hex digits" in bad.stderr


def test_redeliver_with_a_malformed_event_id_says_so(ops):
    code, _, err = ops("webhooks", "redeliver", "not-an-event-id")
    assert code == 2
    assert "event" in err.lower() and "session" not in err.lower()


def test_registry_errors(registry, keys):
    keys.create("alice")
    with pytest.raises(InvalidRequest, match="no client named"):
        registry.add("bob", "http://127.0.0.1/")
    with pytest.raises(InvalidRequest, match=r"no event .*: never made, or pruned"):
        registry.redeliver(uuid.uuid4())


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_show_the_delivery_gauges_and_attempt_counters(
    config, db, storage, auth, database_url, registry, receivers, deliverers
):
    metrics = Metrics(CollectorRegistry())
    service = build(config, db=db, storage=storage, metrics=metrics)
    app = webtest.TestApp(service.app)
    good, bad = receivers().start(), receivers(500).start()

    def scraped() -> dict:
        return parse(app.get("/metrics", status=200).text)

    empty = scraped()
    for state in ("pending", "failing", "dead"):
        assert value(empty, "chunksvc_webhook_deliveries", state=state) == 0
        assert ("chunksvc_webhook_deliveries", frozenset({("state", state)})) in empty
    for outcome in ("delivered", "failed", "dead"):
        assert ("chunksvc_webhook_attempts_total", frozenset({("outcome", outcome)})) in empty

    registry.add("alice", good.url)
    registry.add("alice", bad.url)
    completed(app, auth, seed=1)
    completed(app, auth, seed=2)
    before = scraped()
    assert value(before, "chunksvc_webhook_deliveries", state="pending") == 4
    assert value(before, "chunksvc_webhook_deliveries", state="failing") == 0

    counts = deliverers(metrics=metrics, first_retry=30, max_retry=60).deliver_due()
    assert (counts.delivered, counts.failed, counts.dead) == (2, 2, 0)
    middle = scraped()
    assert value(middle, "chunksvc_webhook_deliveries", state="pending") == 2  # failing ones included
    assert value(middle, "chunksvc_webhook_deliveries", state="failing") == 2
    assert value(middle, "chunksvc_webhook_attempts_total", outcome="delivered") == 2
    assert value(middle, "chunksvc_webhook_attempts_total", outcome="failed") == 2
    assert value(middle, "chunksvc_webhook_delivery_latency_seconds_count") == 2

    query(database_url, "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE state = 'pending'")
    deliverer = deliverers(metrics=metrics, retry_for=0.5)
    wait_for(lambda: deliverer.deliver_due() and states(database_url)["dead"] == 2, "both to be given up")
    after = scraped()
    assert value(after, "chunksvc_webhook_deliveries", state="dead") == 2
    assert value(after, "chunksvc_webhook_deliveries", state="pending") == 0
    assert value(after, "chunksvc_webhook_attempts_total", outcome="dead") == 2
    assert value(after, "chunksvc_webhook_attempts_total", outcome="failed") == len(bad.received)


# --- review fixes ---------------------------------------------------------------------------------


def test_an_endpoint_removed_while_a_session_ends_is_left_no_delivery(app, auth, database_url, registry, receiver):
    """The trigger takes its endpoints FOR SHARE: a removal racing a session's ending either
    commits first (no delivery is made) or waits, then drops the delivery made meanwhile. Without
    the lock a delivery to a removed endpoint was left pending for ever."""
    endpoint, _ = registry.add("alice", receiver.url)
    session_id = uploaded(app, auth)
    ending = psycopg.connect(database_url)
    try:
        ending.execute("UPDATE upload_sessions SET status = 'ABORTED' WHERE id = %s", (session_id,))
        removed: list[int] = []
        remover = threading.Thread(target=lambda: removed.append(registry.remove(endpoint.id)))
        remover.start()
        remover.join(1.0)
        assert remover.is_alive()  # the removal waits for the ending's transaction
        ending.commit()
        remover.join(30)
        assert removed == [1]  # and then drops the delivery that transaction made
    finally:
        ending.close()
    assert query(database_url, "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'") == [(0,)]


def test_a_claim_costs_a_probe_per_endpoint_not_a_scan_of_the_backlog(app, auth, database_url, db, registry):
    """A dead endpoint with a backlog of due deliveries: a claim reads one of them (the head of
    its endpoint), not all, whether that endpoint is busy or not."""
    down, _ = registry.add("alice", "http://127.0.0.1:9/hooks")
    session_id = completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # 3,000 more events, each of its own session
        conn.execute(
            "INSERT INTO upload_sessions (id, client_id, filename, content_type, size, part_size, total_parts,"
            " status, expires_at) SELECT gen_random_uuid(), client_id, 'f', 'application/octet-stream', 1, 1, 1,"
            " 'ABORTED', now() FROM upload_sessions, generate_series(1, 3000) WHERE id = %s",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO webhook_events (session_id, client_id, type, session) SELECT s.id, s.client_id,"
            " 'session.aborted', to_jsonb(s) FROM upload_sessions s WHERE s.id <> %s",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, session_id, event_seq)"
            " SELECT id, %s, session_id, seq FROM webhook_events WHERE id <> %s",
            (down.id, event_id),
        )
        conn.execute("ANALYZE webhook_deliveries")
        for busy in ([], [down.id]):
            with conn.transaction():  # EXPLAIN ANALYZE runs the claim's UPDATE: rolled back
                [(plan,)] = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_webhook_deliveries"],
                    {"limit": 8, "lease": 60, "busy_endpoints": busy, "key_id": KEY.key_id, "only_endpoints": None},
                ).fetchall()
                raise psycopg.Rollback()
            assert rows_read_from(plan[0]["Plan"], "webhook_deliveries") <= 3, plan


def rows_read_from(node: dict, table: str) -> int:
    """Rows the plan's scans of ``table`` returned, summed over every loop."""
    own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if node.get("Relation Name") == table else 0
    return own + sum(rows_read_from(child, table) for child in node.get("Plans", []))


def test_an_ipv6_literal_without_a_port_is_reached_on_port_80_and_credentials_are_refused():
    status, error = post("http://[::1]/hooks", b"{}", "t=1,v1=" + "0" * 64, uuid.uuid4(), 1.0)
    assert status is None and "gaierror" not in (error or "")  # refused or unreachable, not misparsed
    with pytest.raises(InvalidRequest, match="user name or password"):
        validate_url("https://user:secret@hooks.example/chunksvc")


def test_an_endpoint_that_answers_slowly_shares_the_failing_endpoints_slots(app, auth, registry, receivers, deliverers):
    """A 2xx after half the timeout or more counts as slow: such endpoints share at most half of
    the slots, so a few slow ones cannot hold every thread."""
    slow = receivers(TRICKLE).start()  # a 200 whose head takes about 1.7 s
    endpoint, _ = registry.add("alice", slow.url)
    completed(app, auth)
    deliverer = deliverers(timeout=3.0)
    assert deliverer.deliver_due().delivered == 1
    assert endpoint.id in deliverer._failing


# --- retention (the reaper's prune) -----------------------------------------------------------


def set_state(database_url: str, event_id: str, state: str, endpoint_id: int | None = None) -> None:
    query(
        database_url,
        "UPDATE webhook_deliveries SET state = %(state)s"
        " WHERE event_id = %(event)s AND (%(endpoint)s::bigint IS NULL OR endpoint_id = %(endpoint)s)",
        {"state": state, "event": event_id, "endpoint": endpoint_id},
    )


def backdate(database_url: str, event_ids: list[str], age: str = "31 days") -> None:
    query(
        database_url,
        "UPDATE webhook_events SET created_at = created_at - %s::interval WHERE id = ANY(%s::uuid[])",
        (age, event_ids),
    )


def pruner(db: Database, storage: Storage, metrics: Metrics | None = None, **settings) -> Reaper:
    completion = CompletionService(db, storage, TEST_LIMITS, 64 * 1024)
    return Reaper(db, storage, completion, ReaperSettings(**settings), events=metrics)


def prune(db: Database, storage: Storage, **settings) -> ReapResult:
    """The prune phase alone, as a reaper pass runs it."""
    result = ReapResult(dry_run=settings.get("dry_run", False))
    pruner(db, storage, **settings).prune_webhook_events(result)
    return result


def bulk_events(database_url: str, session_id: str, endpoint_id: int, count: int, pending_every: int) -> None:
    """``count`` more events, 40 days old, each of a session of its own, with one delivery each to
    the endpoint: delivered, but every ``pending_every``-th pending."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO upload_sessions (id, client_id, filename, content_type, size, part_size, total_parts,"
            " status, expires_at) SELECT gen_random_uuid(), client_id, 'f', 'application/octet-stream', 1, 1, 1,"
            " 'ABORTED', now() FROM upload_sessions, generate_series(1, %s) WHERE id = %s",
            (count, session_id),
        )
        conn.execute(
            "INSERT INTO webhook_events (session_id, client_id, type, session, created_at)"
            " SELECT s.id, s.client_id, 'session.aborted', to_jsonb(s), now() - interval '40 days'"
            "   FROM upload_sessions s WHERE s.id <> %s",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, session_id, event_seq, state)"
            " SELECT ev.id, %s, ev.session_id, ev.seq,"
            "        CASE WHEN ev.seq %% %s = 0 THEN 'pending' ELSE 'delivered' END"
            "   FROM webhook_events ev WHERE ev.session_id <> %s",
            (endpoint_id, pending_every, session_id),
        )
        conn.execute("ANALYZE webhook_events")
        conn.execute("ANALYZE webhook_deliveries")


def test_old_events_whose_deliveries_all_ended_go_with_them_and_no_other(
    app, auth, other_auth, database_url, ops, registry, receiver
):
    first, _ = registry.add("alice", receiver.url)
    second, _ = registry.add("alice", receiver.url)
    for seed in range(6):
        completed(app, auth, seed)
    ids = [event_id for event_id, _, _ in events(database_url)]
    delivered, dead, ended, half_pending, pending, recent = ids
    set_state(database_url, delivered, "delivered")
    set_state(database_url, dead, "dead")
    set_state(database_url, ended, "delivered", first.id)
    set_state(database_url, ended, "dead", second.id)
    set_state(database_url, half_pending, "delivered", first.id)  # still pending to the second endpoint
    set_state(database_url, recent, "delivered")
    # bob's endpoint was removed while its event was pending: no delivery left, nothing sends it.
    gone, _ = registry.add("bob", receiver.url)
    completed(app, other_auth, 9)
    [(orphan, _, _)] = [event for event in events(database_url) if event[0] not in ids]
    assert registry.remove(gone.id) == 1
    backdate(database_url, [delivered, dead, ended, half_pending, pending, orphan])
    pruned = {delivered, dead, ended, orphan}

    code, out, err = ops("reap", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    heading = lines.index(
        "prune completion events past their retention, no delivery pending (with their deliveries): 4"
    )
    assert set(line.strip() for line in lines[heading + 1 : heading + 5]) == pruned
    assert "; 4 completion events pruned; 0 errors" in lines[-1]
    assert len(events(database_url)) == 7  # a dry run removes nothing

    code, out, err = ops("reap")
    assert code == 0 and out.rstrip().endswith(
        "stalled completions re-driven: 0 completed, 0 reopened for lost"
        " parts, 0 failed; 4 completion events pruned; 0 errors"
    ), out + err
    assert {event_id for event_id, _, _ in events(database_url)} == {half_pending, pending, recent}
    assert query(
        database_url, "SELECT count(*) FROM webhook_deliveries WHERE event_id = ANY(%s::uuid[])", (list(pruned),)
    ) == [(0,)]
    assert collections.Counter(d["event_id"] for d in deliveries(database_url)) == {
        half_pending: 2,
        pending: 2,
        recent: 2,
    }
    assert ops("reap")[1].rstrip().endswith("; 0 completion events pruned; 0 errors")

    # What ops see of a pruned event: not listed, and not found.
    code, out, err = ops("webhooks", "events")
    assert code == 0, err
    assert {line.split()[0] for line in out.splitlines()[1:]} == {half_pending, pending, recent}
    code, out, err = ops("webhooks", "events", "--session", events(database_url, None)[0][2])
    assert code == 0 and len(out.splitlines()) == 3  # a kept session's two deliveries, under the header
    code, _, err = ops("webhooks", "redeliver", delivered)
    assert code == 2 and f"no event {delivered}: never made, or pruned with its deliveries" in err
    code, _, err = ops("webhooks", "redeliver", recent)
    assert code == 0, err  # a kept one still can be


def test_retention_0_keeps_every_event_and_the_setting_is_checked(app, auth, database_url, db, storage, registry):
    registry.add("alice", "http://127.0.0.1:9/hooks")
    for seed in range(2):
        completed(app, auth, seed)
    ids = [event_id for event_id, _, _ in events(database_url)]
    for event_id in ids:
        set_state(database_url, event_id, "delivered")
    backdate(database_url, ids, "3650 days")

    assert prune(db, storage, webhook_retention=0).webhook_events_pruned == 0
    assert prune(db, storage, webhook_retention=0, dry_run=True).webhook_events_pruned == 0
    assert len(events(database_url)) == 2
    assert prune(db, storage, webhook_retention=3650 * 86400 + 3600).webhook_events_pruned == 0  # not old enough
    assert prune(db, storage, webhook_retention=3650 * 86400 - 3600).webhook_events_pruned == 2

    assert Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x"}).webhook_retention == 30 * 86400
    assert Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_WEBHOOK_RETENTION": "0"}).webhook_retention == 0
    for out_of_range in ("-1", "999999999999"):  # the second overflowed PostgreSQL's timestamps
        with pytest.raises(ConfigError, match=r"CHUNKSVC_WEBHOOK_RETENTION must be between 0 .* \(100 years\)"):
            Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_WEBHOOK_RETENTION": out_of_range})
    a_century = Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_WEBHOOK_RETENTION": "3153600000"})
    assert prune(db, storage, webhook_retention=a_century.webhook_retention).webhook_events_pruned == 0
    with pytest.raises(ConfigError, match="CHUNKSVC_WEBHOOK_RETENTION must be an integer"):
        Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x", "CHUNKSVC_WEBHOOK_RETENTION": "30d"})


def test_the_prune_works_in_batches_past_pending_events_and_a_dry_run_counts_it(
    app, auth, database_url, db, storage, registry, monkeypatch
):
    endpoint, _ = registry.add("alice", "http://127.0.0.1:9/hooks")
    session_id = completed(app, auth)  # its event is recent: kept
    bulk_events(database_url, session_id, endpoint.id, 2_500, pending_every=10)
    prunable = query(
        database_url,
        "SELECT id::text FROM webhook_events ev WHERE created_at < now() - interval '30 days' AND NOT EXISTS"
        " (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = ev.id AND d.state = 'pending')"
        " ORDER BY created_at, id",
    )
    assert len(prunable) == 2_250

    dry = prune(db, storage, dry_run=True)
    assert dry.webhook_events_pruned == 2_250
    assert dry.touched["webhook_events_pruned"] == [event_id for (event_id,) in prunable[:20]]
    assert dry.listing()[-1] == "  ... and 2230 more"
    assert len(events(database_url)) == 2_501

    claims: list[int] = []
    claim = dao.claim_prunable_webhook_events

    def counted(*args, **kwargs):
        claimed = claim(*args, **kwargs)
        claims.append(len(claimed))
        return claimed

    monkeypatch.setattr(dao, "claim_prunable_webhook_events", counted)
    result = prune(db, storage)
    assert result.webhook_events_pruned == 2_250
    assert claims == [1_000, 1_000, 250]  # three transactions; the pending events passed over once
    left = query(
        database_url,
        "SELECT count(*), count(*) FILTER (WHERE created_at > now() - interval '1 day') FROM webhook_events",
    )
    assert left == [(251, 1)]  # the 250 with a pending delivery, and the recent one
    assert query(database_url, "SELECT state, count(*) FROM webhook_deliveries GROUP BY state") == [("pending", 251)]

    claims.clear()
    assert prune(db, storage, prune_batch_size=2).webhook_events_pruned == 0
    assert claims == [0]


def test_two_reapers_pruning_at_once_remove_each_event_once(app, auth, database_url, db, registry):
    """Two batches claimed at the same moment (as two reapers without the shared lease would):
    each passes over the other's locked events instead of waiting, so no event is in both."""
    endpoint, _ = registry.add("alice", "http://127.0.0.1:9/hooks")
    session_id = completed(app, auth)
    bulk_events(database_url, session_id, endpoint.id, 300, pending_every=10)
    other = Database(database_url, max_size=1)
    try:
        with db.transaction() as first, other.transaction() as second:
            mine = [event.id for event in dao.claim_prunable_webhook_events(first, 86400, None, 100)]
            theirs = [event.id for event in dao.claim_prunable_webhook_events(second, 86400, None, 100)]
            assert len(mine) == len(theirs) == 100 and not set(mine) & set(theirs)
            for conn, ids in ((first, mine), (second, theirs)):
                dao.lock_webhook_deliveries_of_events(conn, ids)
                assert sorted(dao.prune_webhook_events(conn, ids)) == sorted(ids)
    finally:
        other.close()
    assert query(database_url, "SELECT count(*) FROM webhook_events") == [(301 - 200,)]


def test_a_batch_probes_the_deliveries_of_its_own_events_only(app, auth, database_url, registry):
    """EXPLAIN on 3,000 old events, a tenth of them pending: a batch of 1,000 reads the events from
    the index in order and looks up each one's deliveries by key; it never scans the deliveries
    (neither all of them nor the pending backlog)."""
    endpoint, _ = registry.add("alice", "http://127.0.0.1:9/hooks")
    session_id = completed(app, auth)
    bulk_events(database_url, session_id, endpoint.id, 3_000, pending_every=10)
    params = {"retention": 30 * 86400, "after_created_at": None, "after_id": None, "limit": 1_000}
    # Rolled back: EXPLAIN ANALYZE takes the claim's locks and deletes.
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        [(claim,)] = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_prunable_webhook_events"], params
        ).fetchall()
        ids = [row[0] for row in conn.execute(QUERIES["claim_prunable_webhook_events"], params).fetchall()]
        [(delete,)] = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["prune_webhook_events"], {"ids": ids}
        ).fetchall()
        raise psycopg.Rollback()
    assert len(ids) == 1_000
    # The claim reads the 1,000 it takes and the pending ones among them (a tenth) that it passes over.
    for plan, events_read in ((claim, 1_200), (delete, 1_000)):
        scans = list(plan_scans(plan[0]["Plan"]))
        on_deliveries = [scan for scan in scans if scan["table"] == "webhook_deliveries"]
        assert on_deliveries and all(
            scan["index"] == "webhook_deliveries_pkey" and scan["probes"] <= events_read for scan in on_deliveries
        ), scans
        assert sum(scan["rows"] for scan in scans if scan["table"] == "webhook_events") <= events_read, scans


def plan_scans(node: dict):
    """Each scan in a plan: its table, index, times run and rows read (kept or filtered out)."""
    if "Relation Name" in node and node["Node Type"].endswith("Scan"):  # not the Delete itself
        loops = node.get("Actual Loops", 1)
        yield {
            "table": node["Relation Name"],
            "index": node.get("Index Name"),
            "probes": loops,
            "rows": (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops,
        }
    for child in node.get("Plans", []):
        yield from plan_scans(child)


def test_an_event_a_redelivery_holds_is_not_pruned_under_it(app, auth, database_url, db, storage, registry):
    registry.add("alice", "http://127.0.0.1:9/hooks")
    completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    set_state(database_url, event_id, "dead")
    backdate(database_url, [event_id])
    with psycopg.connect(database_url) as redelivering:  # its transaction stays open
        [(found, endpoints)] = redelivering.execute(
            QUERIES["redeliver_webhook_event"], {"event_id": event_id}
        ).fetchall()
        assert found and len(endpoints) == 1
        with ThreadPoolExecutor(max_workers=1) as pool:  # a prune that waited would hang the test
            pruning = pool.submit(prune, db, storage)
            try:
                assert pruning.result(timeout=10).webhook_events_pruned == 0  # locked: passed over
            finally:
                redelivering.commit()  # lets a prune that did wait finish, so the pool can close
    assert prune(db, storage).webhook_events_pruned == 0  # pending now
    assert [d["state"] for d in deliveries(database_url)] == ["pending"]


def test_a_delivery_made_pending_after_the_claim_keeps_its_event(app, auth, database_url, db, registry):
    """A redelivery that commits after the batch's claim read the event as prunable (before the
    claim's lock): the DELETE's own check, on a later snapshot, keeps the event."""
    registry.add("alice", "http://127.0.0.1:9/hooks")
    completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    set_state(database_url, event_id, "delivered")
    backdate(database_url, [event_id])
    with db.transaction() as conn:
        [claimed] = dao.claim_prunable_webhook_events(conn, 86400, None, 10)
        set_state(database_url, event_id, "pending")  # committed on a connection of its own
        dao.lock_webhook_deliveries_of_events(conn, [claimed.id])
        assert dao.prune_webhook_events(conn, [claimed.id]) == []
    assert [d["state"] for d in deliveries(database_url)] == ["pending"]


# The previous release's redeliver_webhook_event: it makes deliveries pending without locking their
# event first. It runs during a rolling upgrade, while this release's reaper prunes.
PREVIOUS_RELEASE_REDELIVER = (
    "UPDATE webhook_deliveries d"
    "   SET state = 'pending', next_attempt_at = now(), attempts = 0, first_attempt_at = NULL,"
    "       delivered_at = NULL, last_error = NULL"
    "  FROM webhook_endpoints e"
    " WHERE d.event_id = %(event_id)s AND e.id = d.endpoint_id AND e.removed_at IS NULL"
    "   AND d.state IN ('delivered', 'dead')"
    " RETURNING d.endpoint_id"
)


def test_a_previous_releases_redelivery_under_way_keeps_its_event(app, auth, database_url, db, storage, registry):
    registry.add("alice", "http://127.0.0.1:9/hooks")
    completed(app, auth)
    [(event_id, _, _)] = events(database_url)
    set_state(database_url, event_id, "dead")
    backdate(database_url, [event_id])
    with psycopg.connect(database_url) as redelivering:  # its transaction stays open
        assert len(redelivering.execute(PREVIOUS_RELEASE_REDELIVER, {"event_id": event_id}).fetchall()) == 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            pruning = pool.submit(prune, db, storage)
            with pytest.raises(FuturesTimeout):
                pruning.result(timeout=1)  # it waits for the redelivery's row locks
            redelivering.commit()
            assert pruning.result(timeout=10).webhook_events_pruned == 0
    assert [d["state"] for d in deliveries(database_url)] == ["pending"]


def test_the_servers_own_reaper_prunes_with_the_configured_retention_and_counts_it(
    config, db, storage, auth, database_url, registry
):
    metrics = Metrics(CollectorRegistry())
    service = build(dataclasses.replace(config, webhook_retention=3600), db=db, storage=storage, metrics=metrics)
    registry.add("alice", "http://127.0.0.1:9/hooks")
    app = webtest.TestApp(service.app)
    for seed in range(2):
        completed(app, auth, seed)
    old, young = [event_id for event_id, _, _ in events(database_url)]
    set_state(database_url, old, "delivered")
    set_state(database_url, young, "delivered")
    backdate(database_url, [old], "2 hours")

    result = service.reaper.run_once()

    assert result is not None and result.webhook_events_pruned == 1
    assert [event_id for event_id, _, _ in events(database_url)] == [young]
    assert metrics.reaper_work.labels("webhook_events_pruned")._value.get() == 1
