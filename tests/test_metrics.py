"""GET /metrics: what it counts after real requests, and that it adds up across gunicorn workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import webtest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from chunksvc.app import create_app
from chunksvc.config import Config, StorageSpec
from chunksvc.db import Database
from chunksvc.errors import ConfigError
from chunksvc.metrics import Metrics
from tests.conftest import TEST_LIMITS
from tests.helpers import complete, create, payload, put_part, sha, split

ROOT = Path(__file__).resolve().parents[1]
PART_ROUTE = "/uploads/sessions/{session_id}/parts/{part_number}"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(app: webtest.TestApp) -> dict[tuple[str, frozenset], float]:
    response = app.get("/metrics", status=200)
    assert response.content_type == "text/plain"
    return parse(response.text)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def deltas(before: dict, after: dict, name: str, label: str) -> dict[str, float]:
    """For one metric, how much each value of ``label`` grew (zeros left out)."""
    grown = {}
    for (sample, labels), amount in after.items():
        if sample == name:
            key = dict(labels)[label]
            change = amount - before.get((sample, labels), 0.0)
            if change:
                grown[key] = change
    return grown


def test_an_upload_is_counted_exactly(app, auth):
    before = scrape(app)
    data = payload(3000)
    session = create(app, auth, size=len(data), part_size=1024, sha256=sha(data)).json
    parts = split(data, 1024)
    for number, part in enumerate(parts, start=1):
        put_part(app, auth, session["id"], number, part)
    put_part(app, auth, session["id"], 1, parts[0], status=200)  # duplicate
    put_part(app, auth, session["id"], 2, payload(1024, seed=9), status=409)  # conflicting
    put_part(app, auth, session["id"], 9, parts[0], status=400)  # invalid_part_number
    put_part(app, auth, session["id"], 3, parts[0], status=400)  # part_size_mismatch (part 3 is shorter)
    put_part(app, {"Authorization": "Bearer nope"}, session["id"], 1, parts[0], status=401)
    complete(app, auth, session["id"])
    complete(app, auth, session["id"])  # idempotent: not a second completion
    after = scrape(app)

    assert deltas(before, after, "chunksvc_parts_total", "outcome") == {
        "accepted": 3,
        "duplicate": 1,
        "conflicting": 1,
        "rejected": 3,
    }
    assert deltas(before, after, "chunksvc_parts_rejected_total", "code") == {
        "invalid_part_number": 1,
        "part_size_mismatch": 1,
        "unauthorized": 1,
    }
    assert deltas(before, after, "chunksvc_part_bytes_received_total", "outcome") == {
        "accepted": 3000,
        "duplicate": 1024,
    }
    assert deltas(before, after, "chunksvc_sessions_total", "event") == {"created": 1, "completed": 1}
    assert value(after, "chunksvc_assembly_duration_seconds_count", outcome="completed") == 1

    put_201 = {"method": "PUT", "route": PART_ROUTE, "status": "201"}
    assert value(after, "chunksvc_http_requests_total", **put_201) == 3
    assert value(after, "chunksvc_http_request_duration_seconds_count", **put_201) == 3
    assert value(after, "chunksvc_http_request_duration_seconds_bucket", le="+Inf", **put_201) == 3
    assert value(after, "chunksvc_http_requests_total", method="PUT", route=PART_ROUTE, status="401") == 1
    assert value(after, "chunksvc_http_requests_total", method="POST", route="/uploads/sessions", status="201") == 1
    # The scrape that produced ``before`` was answered before it was counted; ``after``'s is not yet.
    assert value(after, "chunksvc_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_session_events_abort_failure_and_replay(app, auth):
    before = scrape(app)
    first = create(app, auth, size=10, headers={"Idempotency-Key": "k1"}).json
    create(app, auth, size=10, headers={"Idempotency-Key": "k1"}, status=200)  # replay: not a new session
    app.delete(f"/uploads/sessions/{first['id']}", headers=auth, status=204)
    app.delete(f"/uploads/sessions/{first['id']}", headers=auth, status=204)  # already aborted
    data = payload(10)
    failing = create(app, auth, size=10, sha256=sha(b"something else")).json
    put_part(app, auth, failing["id"], 1, data)
    complete(app, auth, failing["id"], status=422)
    after = scrape(app)

    assert deltas(before, after, "chunksvc_sessions_total", "event") == {"created": 2, "aborted": 1, "failed": 1}
    assert value(after, "chunksvc_assembly_duration_seconds_count", outcome="failed") == 1


def test_lost_bytes_are_counted_when_healed_and_when_reopened(app, auth, storage, database_url):
    data = payload(3000)
    session = create(app, auth, size=len(data), part_size=1024, sha256=sha(data)).json
    parts = split(data, 1024)
    for number, part in enumerate(parts, start=1):
        put_part(app, auth, session["id"], number, part)
    with psycopg.connect(database_url, autocommit=True) as conn:
        keys = dict(
            conn.execute(
                "SELECT part_number, storage_key FROM upload_parts WHERE session_id = %s", (session["id"],)
            ).fetchall()
        )
    before = scrape(app)
    storage.delete([keys[1], keys[2], keys[3]])
    put_part(app, auth, session["id"], 1, parts[0], status=200)  # healed by the retry
    complete(app, auth, session["id"], status=409)  # parts 2 and 3: dropped, asked for again
    after = scrape(app)

    assert deltas(before, after, "chunksvc_parts_total", "outcome") == {"healed": 1}
    assert deltas(before, after, "chunksvc_sessions_total", "event") == {"reopened": 1}
    assert value(after, "chunksvc_parts_lost_total") - value(before, "chunksvc_parts_lost_total") == 2


def session_gauges(samples: dict) -> dict[str, float]:
    return {
        **{
            status: value(samples, "chunksvc_sessions_by_status", status=status)
            for status in ("INIT", "IN_PROGRESS", "COMPLETING")
        },
        **{
            f"awaiting {work}": value(samples, "chunksvc_sessions_awaiting_reaper", work=work)
            for work in ("expire", "purge")
        },
        "up": value(samples, "chunksvc_session_gauges_up"),
    }


def test_sessions_by_status_are_counted_from_the_database_at_scrape_time(app, auth, database_url):
    assert session_gauges(scrape(app)) == {
        "INIT": 0,
        "IN_PROGRESS": 0,
        "COMPLETING": 0,
        "awaiting expire": 0,
        "awaiting purge": 0,
        "up": 1,
    }
    fresh = [create(app, auth, size=10).json["id"] for _ in range(3)]
    started = [create(app, auth, size=2048, part_size=1024).json["id"] for _ in range(2)]
    for session_id in started:
        put_part(app, auth, session_id, 1, payload(1024))
    data = payload(10)
    completed = create(app, auth, size=10, sha256=sha(data)).json["id"]
    put_part(app, auth, completed, 1, data)
    complete(app, auth, completed)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # One open session past its expiry (clients see EXPIRED; the reaper has not marked it),
        # one COMPLETING, and the completed one's purge not done yet (no reaper ran).
        conn.execute("UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (fresh[0],))
        conn.execute("UPDATE upload_sessions SET status = 'COMPLETING' WHERE id = %s", (started[0],))

    assert session_gauges(scrape(app)) == {
        "INIT": 2,
        "IN_PROGRESS": 1,
        "COMPLETING": 1,
        "awaiting expire": 1,
        "awaiting purge": 1,
        "up": 1,
    }


def test_a_slow_database_leaves_the_sessions_gauges_out_but_the_scrape_answers(app, auth, database_url):
    create(app, auth, size=10)
    with psycopg.connect(database_url) as blocker:
        # Every read of upload_sessions now waits for this transaction.
        blocker.execute("LOCK TABLE upload_sessions IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        samples = scrape(app)
        took = time.monotonic() - started
    assert took < 5, f"the scrape waited {took:.1f} s for the database"
    assert value(samples, "chunksvc_session_gauges_up") == 0
    assert not [name for name, _ in samples if name.startswith(("chunksvc_sessions_by", "chunksvc_sessions_await"))]
    assert value(samples, "chunksvc_http_requests_total", method="POST", route="/uploads/sessions", status="201") == 1
    assert session_gauges(scrape(app))["INIT"] == 1  # and the next scrape has them again


def test_labels_stay_bounded(app, auth):
    app.get("/no/such/path/" + uuid.uuid4().hex, status=404)
    app.request("/healthz", method="BREW", status=400)
    text = app.get("/metrics").text
    samples = parse(text)
    assert value(samples, "chunksvc_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "chunksvc_http_requests_total", method="other", route="/healthz", status="400") == 1
    assert "/no/such/path" not in text and "BREW" not in text


def test_db_pool_saturation(database_url, file_spec, auth):
    config = Config(database_url=database_url, storage=file_spec, limits=TEST_LIMITS, block_size=64 * 1024)
    # One connection, and requests give up after 0.2 s waiting for it.
    db = Database(database_url, min_size=1, max_size=1, timeout=0.2)
    try:
        app = webtest.TestApp(create_app(config, db=db))
        db.open()
        before = scrape(app)
        assert value(before, "chunksvc_db_pool_max_connections") == 1
        with db.connection(timeout=30):
            held = scrape(app)
            # The only connection is taken: a request needing one waits, then gives up.
            problem = app.get("/uploads/sessions", headers=auth, status=503).json
        assert problem["code"] == "database_unavailable"
        after = scrape(app)
    finally:
        db.close()
    assert value(held, "chunksvc_db_pool_connections", state="in_use") == 1
    # The sessions gauges do not queue for the pool's last connection: left out, not waited for.
    assert (value(held, "chunksvc_session_gauges_up"), value(after, "chunksvc_session_gauges_up")) == (0, 1)
    assert value(held, "chunksvc_db_pool_connections", state="idle") == 0
    assert value(after, "chunksvc_db_pool_connections", state="in_use") == 0
    for counter in ("chunksvc_db_pool_queued_requests_total", "chunksvc_db_pool_request_errors_total"):
        assert value(after, counter) - value(held, counter) == 1, counter


def test_each_app_counts_on_its_own():
    first, second = Metrics.for_process({}), Metrics.for_process({})
    first.session_created()
    assert value(parse(first.exposition().decode()), "chunksvc_sessions_total", event="created") == 1
    assert value(parse(second.exposition().decode()), "chunksvc_sessions_total", event="created") == 0


def test_multiprocess_directory_set_too_late_is_refused(tmp_path):
    # prometheus_client is already imported here, in single-process mode.
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics.for_process({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})


def test_registry_given_is_the_one_rendered():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.part_rejected("unauthorized")
    assert registry.get_sample_value("chunksvc_parts_rejected_total", {"code": "unauthorized"}) == 1


# --- across gunicorn workers ---------------------------------------------------------------------

STALE_VALUES = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from chunksvc.metrics import Metrics
Metrics.for_process().http_requests.labels("GET", "/healthz", "200").inc(1000)
"""


EXPOSE_BESIDE_A_NEW_WORKERS_FILE = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from chunksvc.metrics import Metrics
metrics = Metrics.for_process()
metrics.http_requests.labels("GET", "/healthz", "200").inc(3)
# A worker starting now has created its file but not yet sized it.
open(os.path.join(sys.argv[1], "gauge_livesum_999999.db"), "wb").close()
sys.stdout.write(metrics.exposition().decode())
"""


def test_a_file_a_starting_worker_has_not_sized_yet_does_not_fail_the_scrape(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EXPOSE_BESIDE_A_NEW_WORKERS_FILE, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout)
    assert value(samples, "chunksvc_http_requests_total", method="GET", route="/healthz", status="200") == 3


@pytest.fixture(scope="module")
def server(gunicorn_server, tmp_path_factory):
    """gunicorn with three workers, its metrics directory holding values left by an earlier run."""
    workdir = tmp_path_factory.mktemp("metrics-server")
    metrics_dir = workdir / "prometheus"
    metrics_dir.mkdir()
    subprocess.run([sys.executable, "-c", STALE_VALUES, str(metrics_dir)], check=True)
    stale = sorted(path.name for path in metrics_dir.iterdir())
    assert stale, "the stale values were not written"
    env = {
        "CHUNKSVC_WORKERS": "3",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "CHUNKSVC_ACCESS_LOG": str(workdir / "access.log"),
    }
    storage = StorageSpec(kind="file", root=workdir / "storage")
    with gunicorn_server(storage, env, name="metrics", stderr_path=workdir / "stderr.log") as served:
        yield {
            "gunicorn": served.server,
            "dir": metrics_dir,
            "stale": stale,
            "key": served.key,
            "access_log": workdir / "access.log",
            "url": served.database_url,
        }


def gunicorn_scrape(server) -> dict:
    status, _, body = server["gunicorn"].request("GET", "/metrics")
    assert status == 200
    return parse(body.decode())


def healthz_burst(server, count: int, concurrency: int = 6) -> None:
    """``count`` GET /healthz, each on a new connection, from several threads at once."""
    failures = []

    def worker(share: int) -> None:
        for _ in range(share):
            status, _, _ = server["gunicorn"].request("GET", "/healthz")
            if status != 200:
                failures.append(status)

    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def healthz_count(samples: dict) -> float:
    return value(samples, "chunksvc_http_requests_total", method="GET", route="/healthz", status="200")


def access_pids(server, route: str) -> set[int]:
    lines = [json.loads(line) for line in server["access_log"].read_text().splitlines()]
    return {line["pid"] for line in lines if line["route"] == route}


def test_stale_values_are_wiped_at_start(server):
    # Files of the processes that ran before the server started are gone, and their 1000 is not counted.
    assert not set(server["stale"]) & {path.name for path in server["dir"].iterdir()}


def test_counts_add_up_across_workers_and_survive_a_dead_worker(server):
    """Whichever worker answers /healthz or /metrics, the total is the number of requests made,
    also after a worker that served some of them was killed and replaced."""
    start = healthz_count(gunicorn_scrape(server))
    healthz_burst(server, 150)
    assert healthz_count(gunicorn_scrape(server)) == start + 150

    victim = next(iter(access_pids(server, "/healthz") & set(server["gunicorn"].worker_pids())))
    os.kill(victim, signal.SIGKILL)
    # The master's child_exit hook drops the dead worker's live gauges; wait until it has run.
    gauges = server["dir"] / f"gauge_livesum_{victim}.db"
    wait_for(lambda: not gauges.exists() and len(server["gunicorn"].worker_pids()) == 3)

    healthz_burst(server, 150)
    samples = gunicorn_scrape(server)
    assert healthz_count(samples) == start + 300
    assert (server["dir"] / f"counter_{victim}.db").exists()  # its counts remain part of the totals
    # Three live workers, pool maximum 8 each, as far as the workers have reported a pool yet.
    assert value(samples, "chunksvc_db_pool_max_connections") in (8, 16, 24)


def test_uploads_through_several_workers(server):
    key = server["key"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    before = gunicorn_scrape(server)
    count = 12
    for index in range(count):
        data = payload(100, seed=index)
        status, _, body = server["gunicorn"].request(
            "POST", "/uploads/sessions", json.dumps({"filename": "f", "size": 100}).encode(), headers
        )
        assert status == 201
        session = json.loads(body)["id"]
        status, _, _ = server["gunicorn"].request(
            "PUT", f"/uploads/sessions/{session}/parts/1", data, {"Authorization": f"Bearer {key}"}
        )
        assert status == 201
    after = gunicorn_scrape(server)
    assert deltas(before, after, "chunksvc_sessions_total", "event") == {"created": count}
    assert deltas(before, after, "chunksvc_parts_total", "outcome") == {"accepted": count}
    assert deltas(before, after, "chunksvc_part_bytes_received_total", "outcome") == {"accepted": 100 * count}


def test_sessions_gauges_are_the_databases_once_not_once_per_worker(server):
    headers = {"Authorization": f"Bearer {server['key']}", "Content-Type": "application/json"}
    for _ in range(4):
        status, _, _ = server["gunicorn"].request(
            "POST", "/uploads/sessions", json.dumps({"filename": "f", "size": 100}).encode(), headers
        )
        assert status == 201
    with psycopg.connect(server["url"]) as conn:
        expected = conn.execute(
            "SELECT count(*) FROM upload_sessions WHERE status = 'INIT' AND expires_at > now()"
        ).fetchone()[0]
    assert expected >= 4
    for _ in range(6):  # whichever of the three workers answers
        status, _, body = server["gunicorn"].request("GET", "/metrics")
        assert status == 200
        lines = [line for line in body.decode().splitlines() if line.startswith("chunksvc_sessions_by_status{")]
        assert len(lines) == 3, lines
        assert value(parse(body.decode()), "chunksvc_sessions_by_status", status="INIT") == expected
        assert value(parse(body.decode()), "chunksvc_session_gauges_up") == 1


def test_default_directory_is_per_server_and_removed_at_exit(gunicorn_server, tmp_path):
    storage = StorageSpec(kind="file", root=tmp_path / "storage")
    env = {"CHUNKSVC_WORKERS": "1", "CHUNKSVC_ACCESS_LOG": ""}
    with gunicorn_server(
        storage, env, name="metrics", unset=["PROMETHEUS_MULTIPROC_DIR"], stderr_path=tmp_path / "stderr.log"
    ) as served:
        gunicorn = served.server
        directory = Path(tempfile.gettempdir()) / f"chunksvc-metrics-{gunicorn.process.pid}"
        assert gunicorn.request("GET", "/metrics")[0] == 200
        assert any(directory.glob("counter_*.db"))
    assert not directory.exists()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
