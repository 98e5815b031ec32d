"""Completion events (issue 12), one deliverer's attempts: backoff, retries until a 2xx, order per
session, dead deliveries and redelivery, timeouts (hanging and trickling receivers), HTTPS, and
the URL on the wire. The receiver, fixtures and helpers are tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import collections
import uuid

import pytest

from chunksvc.config import StorageSpec
from chunksvc.errors import InvalidRequest
from chunksvc.services.webhooks import SIGNATURE_HEADER, DeliverySettings, post, validate_url
from chunksvc_client import verify_event
from tests.helpers import wait_for
from tests.webhook_fixtures import (
    HANG,
    TRICKLE,
    aborted,
    completed,
    deliveries,
    drain,
    events,
    failed,
    listed,
    make_overdue,
    query,
    reap,
    states,
    uploaded,
)
from tools.nginx import throwaway_certificate


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


def test_backoff_first_retry_within_30_s_doubling_with_jitter_to_the_cap():
    settings = DeliverySettings()
    for _ in range(50):
        assert 8 <= settings.retry_in(1) <= 12 <= 30
        assert 16 <= settings.retry_in(2) <= 24
        assert 0.8 * 3600 <= settings.retry_in(40) <= 1.2 * 3600
    assert len({settings.retry_in(1) for _ in range(20)}) > 1  # jittered
    assert settings.retry_for >= 24 * 3600 and settings.timeout == 10


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


def test_an_ipv6_literal_without_a_port_is_reached_on_port_80_and_credentials_are_refused():
    status, error = post("http://[::1]/hooks", b"{}", "t=1,v1=" + "0" * 64, uuid.uuid4(), 1.0)
    assert status is None and "gaierror" not in (error or "")  # refused or unreachable, not misparsed
    with pytest.raises(InvalidRequest, match="user name or password"):
        validate_url("https://user:secret@hooks.example/chunksvc")
