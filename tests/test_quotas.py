"""Per-client quotas (contract v1.2): open sessions and open bytes, exact under races on two hosts."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading

import psycopg
import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import Config, Quotas, StorageSpec
from chunksvc.db import Database
from tests.helpers import create, put_part
from tools import harness


def _app(config: Config, db: Database, storage, quotas: Quotas) -> webtest.TestApp:
    return webtest.TestApp(create_app(dataclasses.replace(config, quotas=quotas), db=db, storage=storage))


@pytest.fixture
def limited(config, db, storage):
    """An app whose clients may hold 2 open sessions of at most 100 bytes together."""
    return _app(config, db, storage, Quotas(sessions=2, bytes=100))


@pytest.fixture
def limits_cli(chunksvc_cli):
    """``python -m chunksvc limits ARGS``, in this process (conftest.py's chunksvc_cli)."""
    return functools.partial(chunksvc_cli, "limits")


def test_a_create_past_the_session_quota_is_429_with_limit_used_requested(limited, auth, db):
    create(limited, auth, filename="a", size=10)
    create(limited, auth, filename="b", size=10)
    refused = create(limited, auth, status=429, filename="c", size=10)
    problem = refused.json
    assert problem["code"] == "quota_exceeded" and problem["status"] == 429
    assert (problem["limit"], problem["used"], problem["requested"]) == (2, 2, 1)
    assert "Retry-After" not in refused.headers
    listed = limited.get("/uploads/sessions", headers=auth).json["sessions"]
    assert sorted(s["filename"] for s in listed) == ["a", "b"]  # nothing created


def test_a_create_past_the_byte_quota_is_429_and_names_the_bytes(limited, auth):
    create(limited, auth, filename="a", size=60)
    problem = create(limited, auth, status=429, filename="b", size=41).json
    assert (problem["limit"], problem["used"], problem["requested"]) == (100, 60, 41)
    create(limited, auth, filename="c", size=40)  # exactly to the limit fits


def test_aborting_completing_or_expiring_frees_room_at_once(limited, auth, database_url):
    first = create(limited, auth, filename="a", size=4).json
    second = create(limited, auth, filename="b", size=4).json
    create(limited, auth, status=429, filename="c", size=4)
    limited.delete(f"/uploads/sessions/{first['id']}", headers=auth, status=204)
    third = create(limited, auth, filename="c", size=4).json
    put_part(limited, auth, second["id"], 1, b"abcd")
    limited.post_json(f"/uploads/sessions/{second['id']}/complete", {}, headers=auth, status=200)
    create(limited, auth, filename="d", size=4)
    create(limited, auth, status=429, filename="e", size=4)
    # An expiry the reaper has not stored yet frees its room too: the session reads EXPIRED.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (third["id"],)
        )
    create(limited, auth, filename="e", size=4)


def test_a_replayed_create_is_not_counted_again(limited, auth):
    first = create(limited, auth, headers={"Idempotency-Key": "k1"}, filename="a", size=10)
    create(limited, auth, filename="b", size=10)
    again = create(limited, auth, status=200, headers={"Idempotency-Key": "k1"}, filename="a", size=10)
    assert again.json["id"] == first.json["id"]


def test_limits_tell_the_caller_its_quotas_and_use(limited, auth, other_auth):
    create(limited, auth, filename="a", size=30)
    assert limited.get("/uploads/limits", headers=auth).json == {
        "sessions": {"limit": 2, "used": 1},
        "bytes": {"limit": 100, "used": 30},
        "rate": {"limit": 0, "burst": 0},
    }
    assert limited.get("/uploads/limits", headers=other_auth).json["sessions"] == {"limit": 2, "used": 0}
    assert limited.get("/uploads/limits", status=401).json["code"] == "unauthorized"


def test_an_override_leaves_the_other_clients_on_the_defaults(limited, auth, other_auth, limits_cli):
    set_ = limits_cli("set", "alice", "--sessions", "1")
    assert set_.returncode == 0, set_.stderr
    create(limited, auth, filename="a", size=1)
    create(limited, auth, status=429, filename="b", size=1)
    create(limited, other_auth, filename="a", size=1)
    create(limited, other_auth, filename="b", size=1)  # bob keeps the default of 2
    shown = limits_cli("show", "alice")
    assert shown.returncode == 0 and "sessions=1" in shown.stdout
    assert limits_cli("reset", "alice").returncode == 0
    create(limited, auth, filename="b", size=1)
    assert limits_cli("set", "nobody", "--bytes", "5").returncode == 1


def test_an_override_of_bytes_keeps_the_sessions_override(keys, limits_cli):
    keys.create("carol")
    assert limits_cli("set", "carol", "--sessions", "3").returncode == 0
    assert limits_cli("set", "carol", "--bytes", "7").returncode == 0
    shown = limits_cli("show", "carol").stdout
    assert "sessions=3" in shown and "bytes=7" in shown


def test_creates_racing_on_two_hosts_stop_exactly_at_the_quota(gunicorn_server, tmp_path):
    """16 threads over 2 real gunicorn servers on one database race for 5 slots: exactly 5 win."""
    env = {"CHUNKSVC_QUOTA_SESSIONS": "5"}
    spec = StorageSpec(kind="file", root=tmp_path / "storage")
    with (
        gunicorn_server(spec, env, name="quotas", client="racer") as first,
        gunicorn_server(spec, env, name="quotas", client="racer", database_url=first.database_url) as second,
    ):
        one, two, key = first.server, second.server, first.key
        statuses: list[int] = []
        barrier = threading.Barrier(16)

        def race(server: harness.Server, n: int) -> None:
            barrier.wait()
            status, _, _ = server.request(
                "POST",
                "/uploads/sessions",
                json.dumps({"filename": f"f{n}", "size": 1}),
                {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            statuses.append(status)

        threads = [threading.Thread(target=race, args=(one if n % 2 else two, n)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(statuses) == [201] * 5 + [429] * 11
