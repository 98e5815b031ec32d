"""Start chunksvc the way ops do, on throwaway dependencies, for the bench, the load test and tests.

An embedded PostgreSQL (migrated, with an API key), an S3 server (moto, in a child process so its
CPU and memory are not ours) and gunicorn with ``gunicorn.conf.py`` and ``chunksvc.wsgi:app``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from chunksvc import embedded, migrations
from chunksvc.config import StorageSpec
from chunksvc.db import Database
from chunksvc.services.auth import KeyManager

S3_ACCESS_KEY = "bench-access-key"
S3_SECRET_KEY = "bench-secret-key"

# moto's server with werkzeug's per-request log lines silenced; it stops when stdin closes.
_MOTO_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def embedded_database(work_dir: Path) -> Iterator[str]:
    """A migrated database on a PostgreSQL of its own under ``work_dir``; yields its URL."""
    server = embedded.start(work_dir / "pgdata", cleanup_mode="delete")
    try:
        url = embedded.ensure_database(server.get_uri(), embedded.DATABASE)
        migrations.migrate(url)
        yield url
    finally:
        server.cleanup()


def create_api_key(database_url: str, client_name: str) -> str:
    db = Database(database_url, min_size=1, max_size=1)
    try:
        return KeyManager(db).create(client_name)[0]
    finally:
        db.close()


@contextlib.contextmanager
def moto_s3_process() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """An S3 server (moto) in a child process: its endpoint ``127.0.0.1:PORT``, and the process
    (a test may kill it early)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None  # both pipes (PIPE above)
    try:
        port = child.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the moto S3 server did not start (exit code {child.poll()})")
        yield f"127.0.0.1:{port}", child
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3 server (moto) in a child process; yields its endpoint ``127.0.0.1:PORT``."""
    with moto_s3_process() as (endpoint, _child):
        yield endpoint


def s3_spec(
    endpoint: str,
    bucket: str | None = None,
    *,
    access_key: str = S3_ACCESS_KEY,
    secret_key: str = S3_SECRET_KEY,
    create: bool = True,
) -> StorageSpec:
    """A uniquely named bucket on ``endpoint`` (plain http), created now unless ``create`` is false."""
    bucket = bucket or f"bucket-{uuid.uuid4().hex[:16]}"
    spec = StorageSpec(
        kind="s3", endpoint=endpoint, access_key=access_key, secret_key=secret_key, bucket=bucket, secure=False
    )
    if create:
        from minio import Minio  # only S3 runs need minio

        client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False, region=spec.region)
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    return spec


def empty_bucket(spec: StorageSpec) -> None:
    """Removes every object in ``spec``'s bucket (a bench's own, on a throwaway server), so that
    rounds of large files do not add up (see ``tools.radosgw.free_deleted``)."""
    from minio import Minio
    from minio.deleteobjects import DeleteObject

    client = Minio(spec.endpoint or "", spec.access_key, spec.secret_key, secure=False, region=spec.region)
    bucket = spec.bucket or ""
    doomed = (DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True) if o.object_name)
    errors = list(client.remove_objects(bucket, doomed))
    if errors:
        raise RuntimeError(f"emptying {bucket}: {errors[0]}")


def storage_url(spec: StorageSpec) -> str:
    if spec.kind == "file":
        return f"file://{spec.root}"
    return f"s3+http://{spec.access_key}:{spec.secret_key}@{spec.endpoint}/{spec.bucket}"


@dataclasses.dataclass
class Server:
    """A running gunicorn master, how to reach it, and the file its stderr goes to."""

    process: subprocess.Popen[bytes]
    port: int
    stderr: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The master's workers (a killed one until the master has reaped it)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        """One request on a fresh connection: ``(status, response, body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return response.status, response, response.read()
        finally:
            conn.close()

    def wait_until_serving(self, timeout: float = 60) -> None:
        """Until ``GET /healthz`` answers 200; if gunicorn exits or ``timeout`` passes first, kill it
        and raise with the end of its stderr."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.request("GET", "/healthz", timeout=5)[0] == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                self.stderr.seek(0)
                log = self.stderr.read().decode(errors="replace")
                raise RuntimeError(f"gunicorn is not serving:\n{log[-3000:]}")
            time.sleep(0.1)


@contextlib.contextmanager
def gunicorn(
    database_url: str,
    storage: StorageSpec,
    *,
    config: Path = Path("gunicorn.conf.py"),
    env: Mapping[str, str] | None = None,
    unset: Iterable[str] = (),
    cwd: Path | None = None,
    stderr_path: Path | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> Iterator[Server]:
    """gunicorn ``-c config chunksvc.wsgi:app`` on a free port, yielded once ``GET /healthz``
    answers 200; then stopped with ``stop_signal`` (killed if it is still running a minute later).

    Its environment is ours with ``env`` added (CHUNKSVC_* settings) and ``unset`` removed. Its
    stderr goes to ``stderr_path`` or else a temporary file (a pipe nobody reads would fill up and
    stall it), whose end is shown if it fails to start.
    """
    port = free_port()
    if storage.kind == "file" and storage.root is not None:
        storage.root.mkdir(parents=True, exist_ok=True)
    child_env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CHUNKSVC_STORAGE_URL": storage_url(storage),
        "CHUNKSVC_BIND": f"127.0.0.1:{port}",
        **(env or {}),
    }
    for name in unset:
        child_env.pop(name, None)
    executable = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
    with open(stderr_path, "w+b") if stderr_path is not None else tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [executable, "-c", str(config), "chunksvc.wsgi:app"],
            env=child_env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            server = Server(process, port, stderr)
            server.wait_until_serving()
            yield server
        finally:
            process.send_signal(stop_signal)  # nothing if it is already gone
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
