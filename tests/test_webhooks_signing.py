"""Completion events (issue 12), signatures: the secret `webhooks add` prints verifies what is
sent, secret rolls, the signing key and its file, and hosts without the key or with another.
The receiver, fixtures and helpers are tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import threading
import time

import pytest
import webtest

from chunksvc.app import build
from chunksvc.config import StorageSpec
from chunksvc.errors import ConfigError
from chunksvc.services.webhooks import SIGNATURE_HEADER, DeliveryCounts, SigningKey, sign
from chunksvc_client import SignatureError, verify_event
from tests.helpers import complete, create, payload, put_part, sha
from tests.webhook_fixtures import KEY, KEY_HEX, OTHER_KEY_HEX, completed, deliveries, events, get, query, states


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


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
