"""Completion events (issue 12), the operator's side: the `webhooks` commands (add, list, remove,
set-url, redeliver) and their errors, and the delivery metrics. The receiver, fixtures and
helpers are tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import uuid

import pytest
import webtest
from prometheus_client import CollectorRegistry

from chunksvc.app import build
from chunksvc.config import StorageSpec
from chunksvc.errors import InvalidRequest
from chunksvc.metrics import Metrics
from chunksvc.services.webhooks import SIGNATURE_HEADER
from chunksvc_client import verify_event
from tests.helpers import wait_for
from tests.test_metrics import parse, value
from tests.webhook_fixtures import chunksvc, completed, events, listed, query, states


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


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
