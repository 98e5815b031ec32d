"""Per-client request rates (contract v1.2): a token bucket per client in PostgreSQL, shared by
every worker and host; 429 rate_limited with Retry-After past it."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time

import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import Config, Quotas, StorageSpec
from chunksvc.db import Database
from chunksvc.errors import ConfigError
from chunksvc.services.ratelimit import HOLD, RateLimiter, effective_rate
from tests.conftest import TEST_LIMITS
from tests.helpers import create
from tools import harness


@pytest.fixture
def rate_config(database_url: str, file_spec: StorageSpec) -> Config:
    return Config(database_url=database_url, storage=file_spec, limits=TEST_LIMITS, block_size=64 * 1024)


def limited_app(config: Config, db: Database, quotas: Quotas) -> webtest.TestApp:
    return webtest.TestApp(create_app(dataclasses.replace(config, quotas=quotas), db=db))


@pytest.fixture
def limits_cli(chunksvc_cli):
    """``python -m chunksvc limits ARGS``, in this process (conftest.py's chunksvc_cli)."""
    return functools.partial(chunksvc_cli, "limits")


def test_past_the_burst_a_client_gets_429_with_retry_after_and_another_does_not(rate_config, db, auth, other_auth):
    app = limited_app(rate_config, db, Quotas(rate=1, burst=3))
    session_id = create(app, auth, size=1).json["id"]
    for _ in range(2):
        app.get("/uploads/limits", headers=auth, status=200)
    refused = app.get("/uploads/limits", headers=auth, status=429)
    problem = refused.json
    assert (problem["code"], problem["status"], problem["limit"], problem["burst"]) == ("rate_limited", 429, 1, 3)
    assert refused.headers["Retry-After"] == "1"
    assert app.get("/uploads/limits", headers=other_auth, status=200).json["rate"] == {"limit": 1, "burst": 3}
    # The part path authenticates in its responder: it is limited there too, before its body.
    app.put(f"/uploads/sessions/{session_id}/parts/1", b"x", headers=auth, status=429)
    with db.connection() as conn:
        assert conn._conn.execute("SELECT count(*) FROM upload_parts").fetchone() == (0,)
    metrics = app.get("/metrics").text
    assert 'chunksvc_rate_limited_total{client="alice"} 2.0' in metrics
    assert 'client="bob"' not in metrics.split("chunksvc_rate_limited_total", 1)[1].split("# HELP", 1)[0]
    time.sleep(1.05)  # one token a second
    app.get("/uploads/limits", headers=auth, status=200)
    app.get("/uploads/limits", headers=auth, status=429)


def test_a_refused_request_takes_no_token(rate_config, db, auth):
    """A flood past the limit still gets the rate: refusals do not drain the bucket below zero."""
    app = limited_app(rate_config, db, Quotas(rate=4, burst=1))
    app.get("/uploads/limits", headers=auth, status=200)
    for _ in range(20):
        app.get("/uploads/limits", headers=auth, status=429)
    time.sleep(0.3)  # 1.2 tokens' worth
    app.get("/uploads/limits", headers=auth, status=200)


def test_401_comes_before_the_rate_and_nothing_is_created(rate_config, db, auth):
    app = limited_app(rate_config, db, Quotas(rate=1, burst=1))
    create(app, auth, filename="a", size=1)
    create(app, auth, status=429, filename="b", size=1)
    app.get("/uploads/limits", status=401)
    with db.connection() as conn:
        assert conn._conn.execute("SELECT count(*) FROM upload_sessions").fetchone() == (1,)


def test_limits_report_the_rate_and_its_default_burst(rate_config, db, auth):
    off = limited_app(rate_config, db, Quotas())
    assert off.get("/uploads/limits", headers=auth).json["rate"] == {"limit": 0, "burst": 0}
    on = limited_app(rate_config, db, Quotas(rate=2.5))
    assert on.get("/uploads/limits", headers=auth).json["rate"] == {"limit": 2.5, "burst": 3}
    assert effective_rate(0.2, 0).burst == 1


def test_an_override_limits_one_client_and_leaves_the_others_on_the_default(
    rate_config, db, auth, other_auth, limits_cli
):
    assert limits_cli("set", "alice", "--rate", "2", "--burst", "2").returncode == 0
    app = limited_app(rate_config, db, Quotas())  # the default: no limit
    assert app.get("/uploads/limits", headers=auth).json["rate"] == {"limit": 2, "burst": 2}
    app.get("/uploads/limits", headers=auth, status=200)
    app.get("/uploads/limits", headers=auth, status=429)
    for _ in range(10):
        app.get("/uploads/limits", headers=other_auth, status=200)
    shown = limits_cli("show", "alice")
    assert shown.returncode == 0 and "rate=2" in shown.stdout and "burst=2" in shown.stdout
    assert limits_cli("set", "alice", "--sessions", "5").returncode == 0
    assert "rate=2" in limits_cli("show", "alice").stdout  # kept beside the new override
    assert limits_cli("reset", "alice").returncode == 0
    assert "(defaults)" in limits_cli("show", "alice").stdout
    assert limits_cli("set", "alice", "--rate", "-1").returncode == 2
    assert limits_cli("set", "alice", "--rate", "nan").returncode == 2


def test_a_worker_takes_tokens_in_batches_at_high_rates_and_drops_them_after_hold(db, keys):
    """At 1,000 a second a worker takes 20 tokens (20 ms of the rate) in one statement and spends
    them itself; what it has not spent after HOLD seconds is dropped, never spent late."""
    keys.create("fast")
    with db.connection() as conn:
        client_id = conn._conn.execute("SELECT id FROM clients WHERE name = 'fast'").fetchone()[0]
    now = [100.0]
    limiter = RateLimiter(db, Quotas(rate=1000, burst=40), clock=lambda: now[0])

    def bucket() -> tuple:
        with db.connection() as conn:
            return conn._conn.execute(
                "SELECT taken, refilled_at FROM client_rate_buckets WHERE client_id = %s", (client_id,)
            ).fetchone()

    limiter.admit(client_id, "fast")
    first = bucket()
    assert first[0] == 20
    for _ in range(19):
        limiter.admit(client_id, "fast")
    assert bucket() == first  # spent locally: no statement
    limiter.admit(client_id, "fast")
    second = bucket()
    assert second[1] > first[1]  # the 21st took a new batch
    now[0] += HOLD + 0.01
    limiter.admit(client_id, "fast")
    assert bucket()[1] > second[1]  # the held 19 were dropped: a new batch


def test_metrics_show_each_clients_limits_and_use(rate_config, db, auth, other_auth):
    app = limited_app(rate_config, db, Quotas(sessions=7, bytes=1000, rate=50))
    create(app, auth, filename="a", size=30)
    app.get("/uploads/limits", headers=other_auth)  # bob exists, with nothing open
    metrics = app.get("/metrics").text
    for line in (
        'chunksvc_client_limit{client="alice",limit="sessions"} 7.0',
        'chunksvc_client_limit{client="alice",limit="bytes"} 1000.0',
        'chunksvc_client_limit{client="alice",limit="rate"} 50.0',
        'chunksvc_client_used{client="alice",limit="sessions"} 1.0',
        'chunksvc_client_used{client="alice",limit="bytes"} 30.0',
        'chunksvc_client_used{client="bob",limit="sessions"} 0.0',
    ):
        assert line in metrics, line


@pytest.mark.parametrize("raw", ["fast", "-1", "nan", "inf"])
def test_a_bad_rate_is_refused_at_start(raw):
    with pytest.raises(ConfigError, match="CHUNKSVC_RATE_LIMIT"):
        Config.from_env({"CHUNKSVC_RATE_LIMIT": raw})


def test_the_limit_holds_across_workers_and_hosts_and_spares_another_client(gunicorn_server, tmp_path):
    """Two gunicorn servers of two workers each, one database: 16 threads send 96 requests of
    one client as fast as they can. Admitted: the burst plus the rate over the elapsed time,
    whatever process served them (four local buckets would admit four bursts). Meanwhile a
    second client, well within its own limit, is never refused."""
    env = {"CHUNKSVC_RATE_LIMIT": "2", "CHUNKSVC_RATE_BURST": "12", "CHUNKSVC_WORKERS": "2"}
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    with (
        gunicorn_server(spec, env, name="ratelimit", client="flooder") as first,
        gunicorn_server(spec, env, name="ratelimit", client="calm", database_url=first.database_url) as second,
    ):
        one, two, flooder, calm = first.server, second.server, first.key, second.key
        flood: list[int] = []
        calm_statuses: list[int] = []
        barrier = threading.Barrier(17)

        def send(server: harness.Server, key: str, count: int, into: list[int]) -> None:
            barrier.wait()
            for _ in range(count):
                status, _, _ = server.request("GET", "/uploads/limits", headers={"Authorization": f"Bearer {key}"})
                into.append(status)

        threads = [threading.Thread(target=send, args=(one if n % 2 else two, flooder, 6, flood)) for n in range(16)]
        threads.append(threading.Thread(target=send, args=(one, calm, 8, calm_statuses)))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - started
    admitted = flood.count(200)
    assert len(flood) == 96 and set(flood) <= {200, 429}, flood
    assert 12 <= admitted <= 12 + 2 * elapsed + 1, (admitted, elapsed)
    assert calm_statuses == [200] * 8


def test_the_client_library_waits_out_rate_limited_and_finishes(gunicorn_server, tmp_path):
    """A real upload through a limited gunicorn: the client meets 429 rate_limited, waits its
    Retry-After and completes the upload; the refusals are in /metrics."""
    from chunksvc_client import Client

    env = {"CHUNKSVC_RATE_LIMIT": "4", "CHUNKSVC_RATE_BURST": "2", "CHUNKSVC_MIN_PART_SIZE": "4096"}
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(8 * 4096))
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    with gunicorn_server(spec, env, name="ratelimit", client="patient") as served:
        server = served.server
        with Client(f"http://127.0.0.1:{server.port}", served.key) as client:
            done = client.upload_file(source, part_size=4096, parallel=2)
        _, _, metrics = server.request("GET", "/metrics")
    assert done["status"] == "COMPLETED" and done["size"] == 8 * 4096
    refused = [line for line in metrics.decode().splitlines() if line.startswith("chunksvc_rate_limited_total")]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) > 0, refused
