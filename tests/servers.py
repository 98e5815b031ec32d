"""The gunicorn fixture (a pytest plugin): ``gunicorn_server(spec, env, ...)`` starts a real gunicorn
as ops run it (gunicorn.conf.py, chunksvc.wsgi:app) on a free loopback port, on a database of its
own cloned from the migrated template, with an API key; leaving the block stops it and drops the
database. Any test that uses it is in the e2e tier (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunksvc import embedded
from chunksvc.config import StorageSpec
from tools import harness

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Gunicorn:
    """A running server, the database it serves and an API key on it."""

    server: harness.Server
    database_url: str
    key: str


StartGunicorn = Callable[..., AbstractContextManager[Gunicorn]]


@pytest.fixture(scope="session")
def gunicorn_server(pg_admin_url: str, template_db: str) -> StartGunicorn:
    @contextlib.contextmanager
    def start(
        spec: StorageSpec,
        env: Mapping[str, str],
        *,
        name: str,
        client: str | None = None,
        stderr_path: Path | None = None,
    ) -> Iterator[Gunicorn]:
        """``name`` names its database (chunksvc_<name>_...) and, unless ``client`` does, its key."""
        database = f"chunksvc_{name}_{uuid.uuid4().hex[:12]}"
        url = embedded.ensure_database(pg_admin_url, database, template=template_db)
        try:
            with harness.gunicorn(url, spec, env=env, cwd=ROOT, stderr_path=stderr_path) as server:
                yield Gunicorn(server, url, harness.create_api_key(url, client or name))
        finally:
            embedded.drop_database(pg_admin_url, database)

    return start
