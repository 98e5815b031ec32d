"""The data access boundary: every named statement has its one typed function in ``dao``, and rows
become the dataclasses of ``chunksvc.rows`` by column name, on a real PostgreSQL."""

from __future__ import annotations

import ast
import inspect
import threading
import uuid
from collections import Counter

import psycopg
import pytest

from chunksvc import dao
from chunksvc.db import QUERIES, Database, dataclass_row
from chunksvc.rows import AuthRow, ClientRow, PartSessionRow, SessionRow

RUNNERS = {"one", "all", "value", "values", "execute"}


def statements_run_by_dao() -> Counter[str]:
    """The statement names ``dao`` passes to ``Connection.one/all/value/values/execute``."""
    names: Counter[str] = Counter()
    for node in ast.walk(ast.parse(inspect.getsource(dao))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RUNNERS:
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), ast.unparse(node)
            names[first.value] += 1
    return names


def test_every_statement_is_run_by_exactly_one_dao_function():
    run = statements_run_by_dao()
    assert sorted(name for name, count in run.items() if count > 1) == []
    assert sorted(set(QUERIES) - set(run)) == [], "statements in queries.sql that dao never runs"
    assert sorted(set(run) - set(QUERIES)) == [], "names dao runs that queries.sql does not define"


def test_a_row_is_built_by_column_name_leaving_out_columns_it_does_not_declare(database_url):
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=dataclass_row(ClientRow)) as cursor:
        assert cursor.execute("SELECT 'x' AS name, 7 AS added_later, 1 AS id").fetchall() == [ClientRow(1, "x")]


@pytest.mark.parametrize("select", ["SELECT 1 AS id", "SELECT 1 AS id, 'x' AS name, 'y' AS name"])
def test_a_field_no_single_column_fills_fails_even_without_rows(database_url, select):
    with (
        psycopg.connect(database_url) as conn,
        conn.cursor(row_factory=dataclass_row(ClientRow)) as cursor,
        pytest.raises(TypeError, match=r"ClientRow: .* named name$"),
    ):
        cursor.execute(f"{select} WHERE false")


@pytest.fixture
def own_db(own_database_url):
    """A database of this test's own: it alters the schema, which the shared database must keep."""
    database = Database(own_database_url, min_size=1, max_size=4)
    yield database
    database.close()


def test_session_rows_survive_a_column_that_a_later_migration_adds(own_db, own_database_url):
    """A release's migration runs while the previous release still serves: ``SELECT *`` then
    returns a column the running code does not know, which it leaves out."""
    db, database_url = own_db, own_database_url
    with db.transaction() as conn:
        client = dao.upsert_client(conn, "alice")
        created = dao.insert_session(
            conn,
            id=uuid.uuid4(),
            client_id=client.id,
            filename="f.bin",
            content_type="application/octet-stream",
            size=10,
            part_size=10,
            total_parts=1,
            sha256=None,
            metadata={"k": "v"},
            idempotency_key=None,
            request_fingerprint=None,
            ttl=60,
        )
    assert isinstance(created, SessionRow)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE upload_sessions ADD COLUMN added_later text DEFAULT 'new'")
    with db.connection() as conn:
        assert dao.get_session(conn, created.id, client.id) == created


def test_a_value_of_another_type_than_asked_is_refused(db):
    with db.connection() as conn, pytest.raises(TypeError, match="ping returned 1, not a str"):
        conn.value("ping", str)


def _session(conn, client_id: int, size: int = 10, part_size: int = 4):
    return dao.insert_session(
        conn,
        id=uuid.uuid4(),
        client_id=client_id,
        filename="f.bin",
        content_type="application/octet-stream",
        size=size,
        part_size=part_size,
        total_parts=-(-size // part_size),
        sha256=None,
        metadata={},
        idempotency_key=None,
        request_fingerprint=None,
        ttl=60,
    )


def test_authenticate_answers_the_client_and_only_its_own_session(db, database_url):
    with db.transaction() as conn:
        alice = dao.upsert_client(conn, "alice")
        bob = dao.upsert_client(conn, "bob")
        dao.insert_api_key(conn, alice.id, "csk_a", b"a" * 32)
        dao.insert_api_key(conn, bob.id, "csk_b", b"b" * 32)
        session = _session(conn, alice.id)
        assert session is not None
    with db.connection() as conn:
        assert dao.authenticate(conn, b"x" * 32) is None
        assert dao.authenticate(conn, b"a" * 32) == AuthRow(alice.id, "alice", None)
        assert dao.authenticate(conn, b"a" * 32, session.id) == AuthRow(
            alice.id, "alice", PartSessionRow(session.id, "INIT", 10, 4, 3)
        )
        assert dao.authenticate(conn, b"b" * 32, session.id) == AuthRow(bob.id, "bob", None)
        assert dao.authenticate(conn, b"a" * 32, uuid.uuid4()) == AuthRow(alice.id, "alice", None)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (session.id,)
        )
    with db.connection() as conn:
        # The status clients see, not the stored one (INIT).
        assert dao.authenticate(conn, b"a" * 32, session.id).session.effective_status == "EXPIRED"
        assert dao.revoke_api_keys(conn, "csk_a")
        assert dao.authenticate(conn, b"a" * 32, session.id) is None


def test_authenticate_records_a_keys_use_at_most_once_a_minute(db, database_url):
    with db.transaction() as conn:
        client = dao.upsert_client(conn, "alice")
        dao.insert_api_key(conn, client.id, "csk_a", b"a" * 32)

    def last_used():
        with psycopg.connect(database_url) as admin:
            return admin.execute("SELECT last_used_at FROM api_keys WHERE prefix = 'csk_a'").fetchone()[0]

    with db.connection() as conn:
        assert last_used() is None
        dao.authenticate(conn, b"a" * 32)
        first = last_used()
        assert first is not None
        dao.authenticate(conn, b"a" * 32)
        assert last_used() == first  # within the minute: not written again
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("UPDATE api_keys SET last_used_at = now() - interval '2 minutes'")
        stale = last_used()
        dao.authenticate(conn, b"a" * 32)
        assert last_used() > stale


def test_a_request_that_waited_for_a_concurrent_refresh_of_last_used_does_not_write_it_again(db, database_url):
    """Two requests with a stale key at once: the second waits for the first's row lock, then
    finds the time fresh and writes no second row version."""
    with db.transaction() as conn:
        client = dao.upsert_client(conn, "alice")
        dao.insert_api_key(conn, client.id, "csk_a", b"a" * 32)
    version = "SELECT xmin::text FROM api_keys WHERE prefix = 'csk_a'"
    with psycopg.connect(database_url) as first:  # a transaction held open after its refresh
        first.execute("SELECT * FROM chunksvc_authenticate(%s, NULL)", (b"a" * 32,))
        done = threading.Event()

        def second() -> None:
            with db.connection() as conn:
                dao.authenticate(conn, b"a" * 32)
            done.set()

        waiting = threading.Thread(target=second)
        waiting.start()
        assert not done.wait(0.5)  # it waits for the first's row lock
        first.commit()
        refreshed = first.execute(version).fetchone()[0]
        waiting.join(10)
        assert done.is_set()
        assert first.execute(version).fetchone()[0] == refreshed
