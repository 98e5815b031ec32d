"""The gunicorn fixture (a pytest plugin): ``gunicorn_server(spec, env, ...)`` starts a real gunicorn
as ops run it (gunicorn.conf.py, chunksvc.wsgi:app) on a free loopback port, on a database of its
own cloned from the migrated template (or on one it is given: a second host on another's, or a
test's own), with an API key; leaving the block stops it and drops the database it made. Any test
that uses it is in the e2e tier (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
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
        database_url: str | None = None,
        unset: Iterable[str] = (),
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> Iterator[Gunicorn]:
        """``name`` names its database (chunksvc_<name>_...) and, unless ``client`` does, its key's
        client. With ``database_url`` it serves that database instead, and leaves it in place.
        ``env`` holds its CHUNKSVC_* settings (CHUNKSVC_WORKERS: how many workers), added to our
        environment, from which ``unset`` is removed."""
        with contextlib.ExitStack() as stack:
            if database_url is None:
                database = f"chunksvc_{name}_{uuid.uuid4().hex[:12]}"
                database_url = embedded.ensure_database(pg_admin_url, database, template=template_db)
                stack.callback(embedded.drop_database, pg_admin_url, database)
            server = stack.enter_context(
                harness.gunicorn(
                    database_url,
                    spec,
                    env=env,
                    unset=unset,
                    cwd=ROOT,
                    stderr_path=stderr_path,
                    stop_signal=stop_signal,
                )
            )
            yield Gunicorn(server, database_url, harness.create_api_key(database_url, client or name))

    return start
