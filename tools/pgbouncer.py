"""Run the distribution's PgBouncer (``apt-get install pgbouncer``) in front of a PostgreSQL, for
tests and the connection figure (``tools/bench_pgbouncer.py``).

Transaction pooling by default, the mode that multiplexes many client connections over few server
connections and that chunksvc is made for: each transaction runs on whichever server connection is
free, and nothing that lives on a server connection between transactions (session-level advisory
locks, server-side prepared statements, ``SET`` without ``LOCAL``) survives from one transaction
to the next. It listens on a free loopback port; every database of the upstream server is reached
under its own name (a ``*`` fallback entry), so a test's throwaway database works through it as is.

Clients are trusted (``auth_type = trust``: loopback only, throwaway servers); PgBouncer logs in to
PostgreSQL as the upstream URL's user, with its password if it has one. PgBouncer refuses to run as
root: as root the harness runs it as the owner of the upstream's Unix socket directory (the embedded
PostgreSQL's own user), or as ``nobody`` for a TCP upstream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tools.harness import free_port


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


def version() -> str:
    """``PgBouncer 1.18.0``, say (the first line of ``pgbouncer --version``)."""
    binary = pgbouncer_binary()
    if binary is None:
        return "not installed"
    return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]


@dataclasses.dataclass
class PgBouncer:
    process: subprocess.Popen[bytes]
    directory: Path
    port: int
    user: str
    pool_mode: str
    default_pool_size: int

    @property
    def log(self) -> Path:
        return self.directory / "pgbouncer.log"

    def url(self, database_url: str) -> str:
        """``database_url``'s database, reached through PgBouncer (no password: clients are trusted)."""
        return make_conninfo(database_url, host="127.0.0.1", port=str(self.port), password="")

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on PgBouncer's admin console (POOLS, STATS, CLIENTS, SERVERS, CONFIG...)."""
        admin = make_conninfo("", host="127.0.0.1", port=str(self.port), dbname="pgbouncer", user=self.user)
        # The console speaks the simple query protocol only, and has no transactions.
        with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as conn:
            cursor = psycopg.ClientCursor(conn)
            cursor.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _run_as(host: str) -> str | None:
    """The user to run PgBouncer as (``host``: the upstream's): None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        return pwd.getpwuid(os.stat(host).st_uid).pw_name
    return "nobody"


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@contextlib.contextmanager
def pgbouncer(
    server_url: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 10,
    max_client_conn: int = 2000,
    settings: Mapping[str, str] | None = None,
) -> Iterator[PgBouncer]:
    """PgBouncer in front of the server ``server_url`` names (any of its databases), on a free
    loopback port, configured in a temporary directory of its own (under the system's, which any
    user may reach: PgBouncer may run as another user); stopped (and waited for) on the way out.
    ``settings`` adds or overrides lines of its ``[pgbouncer]`` section."""
    binary = pgbouncer_binary()
    if binary is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    with (
        tempfile.TemporaryDirectory(prefix="chunksvc-pgbouncer-") as work,
        _started(binary, Path(work), server_url, pool_mode, default_pool_size, max_client_conn, settings) as bouncer,
    ):
        yield bouncer


@contextlib.contextmanager
def _started(
    binary: str,
    directory: Path,
    server_url: str,
    pool_mode: str,
    default_pool_size: int,
    max_client_conn: int,
    settings: Mapping[str, str] | None,
) -> Iterator[PgBouncer]:
    upstream = conninfo_to_dict(server_url)
    user = str(upstream.get("user") or pwd.getpwuid(os.getuid()).pw_name)
    port = free_port()
    target = {
        "host": str(upstream.get("host") or "localhost"),
        "port": str(upstream.get("port") or "5432"),
        "user": user,
    }
    if upstream.get("password"):
        target["password"] = str(upstream["password"])
    section = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": str(directory / "userlist.txt"),
        "admin_users": user,
        "stats_users": user,
        "pool_mode": pool_mode,
        "default_pool_size": str(default_pool_size),
        "min_pool_size": "0",
        "reserve_pool_size": "0",
        "max_client_conn": str(max_client_conn),
        "logfile": str(directory / "pgbouncer.log"),
        "pidfile": str(directory / "pgbouncer.pid"),
        # The tests drop their databases while PgBouncer may hold idle server connections to them.
        "server_login_retry": "1",
        **(settings or {}),
    }
    (directory / "userlist.txt").write_text(f"{_quote(user)} {_quote(target.get('password', ''))}\n")
    connect = " ".join(f"{key}={value}" for key, value in target.items())
    (directory / "pgbouncer.ini").write_text(
        f"[databases]\n* = {connect}\n\n[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in section.items())
    )
    command = [binary]
    run_as = _run_as(str(upstream.get("host", "")))
    if run_as is not None:
        command += ["-u", run_as]
        entry = pwd.getpwnam(run_as)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    command.append(str(directory / "pgbouncer.ini"))
    stderr = open(directory / "stderr.log", "w+b")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for_port(process, port, directory, stderr)
        yield PgBouncer(process, directory, port, user, pool_mode, default_pool_size)
    finally:
        process.send_signal(signal.SIGTERM)  # immediate shutdown: clients are cut off
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        stderr.close()


def _wait_for_port(process: subprocess.Popen[bytes], port: int, directory: Path, stderr: Any) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            stderr.seek(0)
            log = directory / "pgbouncer.log"
            text = stderr.read().decode(errors="replace") + (log.read_text(errors="replace") if log.exists() else "")
            raise RuntimeError(f"pgbouncer did not start:\n{text[-3000:]}")
        time.sleep(0.05)
