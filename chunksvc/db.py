"""PostgreSQL access: the connection pool, named queries, and psycopg error translation.

This is the one module (with ``migrations``) that talks to psycopg. Every statement lives in
``chunksvc/sql/queries.sql`` under a ``-- name:`` header and is run by name. psycopg errors
that mean "the database is not there" become ``DatabaseUnavailable`` here, at one boundary.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from chunksvc.errors import DatabaseBusy, DatabaseUnavailable

_HEADER = re.compile(r"^-- name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into ``{name: statement}`` on its ``-- name:`` headers."""
    queries: dict[str, str] = {}
    pieces = _HEADER.split(text)
    for name, body in zip(pieces[1::2], pieces[2::2], strict=True):
        statement = "\n".join(line for line in body.strip().splitlines() if not line.startswith("--"))
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = statement.strip().rstrip(";")
    return queries


QUERIES = load_queries(resources.files("chunksvc").joinpath("sql/queries.sql").read_text("utf-8"))


def json_param(value: object) -> Jsonb:
    """Wrap a value for a jsonb parameter."""
    return Jsonb(value)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn psycopg's 'cannot reach the database' errors into the domain's error."""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise DatabaseBusy("no database connection available in time") from exc
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable("database connection failed") from exc


class Connection:
    """A pooled connection in autocommit mode; ``transaction()`` groups statements."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def one(self, query: str, **params: Any) -> dict[str, Any] | None:
        with translate_errors():
            return self._conn.execute(QUERIES[query], params).fetchone()

    def all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with translate_errors():
            return self._conn.execute(QUERIES[query], params).fetchall()

    def execute(self, query: str, **params: Any) -> int:
        """Run a statement; return the number of rows it affected."""
        with translate_errors():
            return self._conn.execute(QUERIES[query], params).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with translate_errors(), self._conn.transaction():
            yield self


class Database:
    """The pool. It opens on first use so that each gunicorn worker opens its own after fork."""

    def __init__(self, url: str, min_size: int = 1, max_size: int = 8, timeout: float = 10.0) -> None:
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            # Autocommit: nothing stays "idle in transaction" between explicit transactions,
            # which matters while a completion holds its connection during assembly.
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 5},
            name="chunksvc",
        )
        self._opened = False
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            if not self._opened:
                # wait=False: a worker must start even while PostgreSQL is down; requests then
                # get DatabaseUnavailable (503) and /readyz says so.
                self._pool.open(wait=False)
                self._opened = True

    def close(self) -> None:
        with self._lock:
            if self._opened:
                self._pool.close()
                self._opened = False

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """A pooled connection; ``timeout`` caps the wait for one (default: the pool's)."""
        if not self._opened:
            self.open()
        with translate_errors(), self._pool.connection(timeout=timeout) as conn:
            yield Connection(conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def stats(self) -> dict[str, int]:
        return self._pool.get_stats() if self._opened else {}
