"""Completion events (issue 12), retention: the reaper's prune of old events whose deliveries all
ended, in batches, under concurrent reapers and redeliveries, and its query plans. The
receiver, fixtures and helpers are tests/webhook_fixtures.py's.
"""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import psycopg
import pytest
import webtest
from prometheus_client import CollectorRegistry

from chunksvc import dao
from chunksvc.app import build
from chunksvc.config import Config, StorageSpec
from chunksvc.db import QUERIES, Database
from chunksvc.errors import ConfigError
from chunksvc.metrics import Metrics
from chunksvc.services.completion import CompletionService
from chunksvc.services.reaper import Reaper, ReaperSettings, ReapResult
from chunksvc.storage import Storage
from tests.conftest import TEST_LIMITS
from tests.webhook_fixtures import completed, deliveries, events, query


@pytest.fixture
def storage_spec(file_spec: StorageSpec) -> StorageSpec:
    """Local disk only (conftest's runs both): what is tested here happens in the database."""
    return file_spec


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
