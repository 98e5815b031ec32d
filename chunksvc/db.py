"""PostgreSQL access: the connection pool, named queries, typed rows, psycopg error translation.

This is the one module (with ``migrations``) that talks to psycopg. Every statement lives in
``chunksvc/sql/queries.sql`` under a ``-- name:`` header and is run by name. psycopg errors
that mean "the database is not there" become ``DatabaseUnavailable`` here, at one boundary.
Rows come back as the dataclass the caller names (``dataclass_row``; ``chunksvc.rows``), or as
one checked value (``Connection.value``), never as dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.rows import RowFactory, RowMaker, no_result, scalar_row
from psycopg.types.json import Jsonb

from chunksvc.errors import DatabaseBusy, DatabaseUnavailable

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")
R = TypeVar("R")
V = TypeVar("V")

_RESULTS_WITH_ROWS = frozenset(
    {psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.SINGLE_TUPLE, psycopg.pq.ExecStatus.TUPLES_CHUNK}
)
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


def column_names(cursor: psycopg.Cursor[Any]) -> tuple[str, ...] | None:
    """The names of the current result's columns; None when it has no rows to give (not a
    SELECT or RETURNING). ``cursor.description`` says the same, but builds a ``Column`` object per
    column each time it is read: for the part path's 25-column session row that was a tenth of
    a 4 KiB part's CPU in the worker."""
    result = cursor.pgresult
    if result is None or result.status not in _RESULTS_WITH_ROWS:
        return None
    names = (result.fname(index) for index in range(result.nfields))
    return tuple(name.decode() if name is not None else "" for name in names)


def dataclass_row(cls: type[D]) -> RowFactory[D]:
    """A row factory that builds ``cls`` (a dataclass) from the result's columns, by name.

    Like psycopg's ``class_row``, except that columns the class does not declare are left out:
    the session statements select ``upload_sessions.*``, and a migration that adds a column is
    applied (``migrate``, once per release) while the previous release still serves, so a column
    that code does not know yet must not break it. A field that no column fills (or two do) is a
    bug in the statement or the class: ``TypeError`` naming the class and the fields, on every
    execution of the statement, even one that returns no row.
    """
    fields = [field.name for field in dataclasses.fields(cls)]
    # One maker per result shape, checked and built once: the part path runs these per request.
    makers: dict[tuple[str, ...], RowMaker[D]] = {}

    def factory(cursor: psycopg.Cursor[Any]) -> RowMaker[D]:
        columns = column_names(cursor)
        if columns is None:
            return no_result  # a statement that returns no rows (not a SELECT or RETURNING)
        maker = makers.get(columns)
        if maker is not None:
            return maker
        unfilled = [name for name in fields if columns.count(name) != 1]
        if unfilled:
            raise TypeError(f"{cls.__name__}: the statement returns no column, or several, named {', '.join(unfilled)}")
        positions = [(name, columns.index(name)) for name in fields]

        def make(values: Sequence[Any]) -> D:
            return cls(**{name: values[position] for name, position in positions})

        makers[columns] = make
        return make

    return factory


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

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def one(self, query: str, row: RowFactory[R], **params: Any) -> R | None:
        """The statement's first row, made by ``row`` (see ``dataclass_row``); None if it has none."""
        with translate_errors(), self._conn.cursor(row_factory=row) as cursor:
            return cursor.execute(QUERIES[query], params).fetchone()

    def all(self, query: str, row: RowFactory[R], **params: Any) -> list[R]:
        with translate_errors(), self._conn.cursor(row_factory=row) as cursor:
            return cursor.execute(QUERIES[query], params).fetchall()

    def value(self, query: str, kind: type[V], **params: Any) -> V:
        """The first column of the statement's one row, checked to be a ``kind``."""
        with translate_errors(), self._conn.cursor(row_factory=scalar_row) as cursor:
            found = cursor.execute(QUERIES[query], params).fetchone()
        if not isinstance(found, kind):
            raise TypeError(f"{query} returned {found!r}, not a {kind.__name__}")
        return found

    def values(self, query: str, kind: type[V], **params: Any) -> list[V]:
        """The first column of each of the statement's rows, each checked to be a ``kind``."""
        with translate_errors(), self._conn.cursor(row_factory=scalar_row) as cursor:
            found = cursor.execute(QUERIES[query], params).fetchall()
        wrong = [value for value in found if not isinstance(value, kind)]
        if wrong:
            raise TypeError(f"{query} returned {wrong[0]!r}, not a {kind.__name__}")
        return found

    def execute(self, query: str, **params: Any) -> int:
        """Run a statement; return the number of rows it affected."""
        with translate_errors(), self._conn.cursor() as cursor:
            return cursor.execute(QUERIES[query], params).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with translate_errors(), self._conn.transaction():
            yield self


class Database:
    """The pool. It opens on first use so that each gunicorn worker opens its own after fork."""

    def __init__(
        self,
        url: str,
        min_size: int = 1,
        max_size: int = 8,
        timeout: float = 10.0,
        prepare_threshold: int | None = None,
    ) -> None:
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={
                # Autocommit: nothing stays "idle in transaction" between explicit transactions,
                # which matters while a completion holds its connection during assembly. Behind a
                # transaction-pooling PgBouncer it is also what lets each statement outside a
                # transaction run on whichever server connection is free.
                "autocommit": True,
                "connect_timeout": 5,
                # None: never a server-side prepared statement (psycopg prepares a statement on its
                # 5th execution by default). A prepared statement lives on one server connection,
                # and through a transaction-pooling PgBouncer older than 1.21 the next execution
                # may land on another ("prepared statement "_pg3_0" does not exist"), or a later
                # client on the same one may try to prepare the name again ("already exists").
                # Nothing here depends on connection state, so the pool works the same through
                # PgBouncer or direct. Config.db_prepare_threshold says what turning it on buys.
                "prepare_threshold": prepare_threshold,
            },
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
        with translate_errors():
            if not self._opened:
                self.open()  # a pool closed at shutdown cannot reopen: PoolClosed, translated
            with self._pool.connection(timeout=timeout) as conn:
                yield Connection(conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def stats(self) -> dict[str, int]:
        return self._pool.get_stats() if self._opened else {}
