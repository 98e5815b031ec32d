"""Load test for a chunksvc deployment: ``make loadtest`` (``python -m tools.loadtest``).

N virtual clients (locust users) each upload files of a given size in parts through
``chunksvc_client``: create a session, PUT the parts (``--parallel`` at once per file,
``--retries`` by the client's own retry policy on connection errors, 5xx and 507,
and with ``--conflict-rate`` a deliberate second PUT of an accepted part with other bytes,
which must answer 409 ``part_conflict``), then complete it and check the object's SHA-256.
Bounded by ``--run-time`` and ``--max-files``. While it runs, a progress line on stderr every
``--progress-every`` seconds (elapsed, uploads completed, part MiB/s, failed requests); at the end,
throughput, latency percentiles per endpoint and error counts by the contract's ``code``.

Target and key come from ``CHUNKSVC_URL`` and ``CHUNKSVC_API_KEY`` (or ``--url``/``--api-key``).
Without a URL it starts chunksvc locally (embedded PostgreSQL, disk storage, gunicorn with
``gunicorn.conf.py``) and runs a short smoke load against it.

For locust's own command line (web UI, distributed runs) see ``tools/locustfile.py``.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # locust is imported when the load runs (this module's helpers need it not)
    from locust import User
    from locust.env import Environment
    from locust.stats import RequestStats

MiB = 1024 * 1024

SESSIONS = "POST /uploads/sessions"
PART = "PUT /uploads/sessions/[id]/parts/[n]"
CONFLICT = "PUT /uploads/sessions/[id]/parts/[n] (deliberate conflict)"
COMPLETE = "POST /uploads/sessions/[id]/complete"
POLL = "GET /uploads/sessions/[id] (after a 202)"


@dataclasses.dataclass(frozen=True)
class Settings:
    file_size: int = 12 * MiB
    part_size: int = 5 * MiB
    parallel: int = 2
    retries: int = 2
    conflict_rate: float = 0.0
    max_files: int = 0  # 0: no limit but the run time
    mixed_sizes: bool = False  # every other file a quarter of file_size (both completion paths)

    def size_of(self, file_number: int) -> int:
        return self.file_size if not self.mixed_sizes or file_number % 2 else max(1, self.file_size // 4)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        defaults = cls()
        return cls(
            file_size=int(env.get("CHUNKSVC_LOADTEST_FILE_SIZE", defaults.file_size)),
            part_size=int(env.get("CHUNKSVC_LOADTEST_PART_SIZE", defaults.part_size)),
            parallel=int(env.get("CHUNKSVC_LOADTEST_PARALLEL", defaults.parallel)),
            retries=int(env.get("CHUNKSVC_LOADTEST_RETRIES", defaults.retries)),
            conflict_rate=float(env.get("CHUNKSVC_LOADTEST_CONFLICT_RATE", defaults.conflict_rate)),
            max_files=int(env.get("CHUNKSVC_LOADTEST_MAX_FILES", defaults.max_files)),
            mixed_sizes=env.get("CHUNKSVC_LOADTEST_MIXED_SIZES", "") not in ("", "0"),
        )


def endpoint(method: str, path: str) -> str:
    """The report's name for a request (ids and numbers left out, so requests group)."""
    if path.endswith("/complete"):
        return COMPLETE
    if "/parts/" in path:
        return PART
    if method == "GET" and path.startswith("/uploads/sessions/"):
        return POLL
    return SESSIONS if method == "POST" else f"{method} {path}"


# The problem code a deliberate request expects (the conflict test), per greenlet.
EXPECTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("expected_code", default=None)


def new_totals() -> dict[str, int]:
    """Files started, files completed and verified, part bytes accepted."""
    return {"files": 0, "completed": 0, "bytes": 0}


def make_user(settings: Settings, api_key: str, totals: dict[str, int] | None = None) -> type[User]:
    """A locust user class that uploads files as ``settings`` says, through ``chunksvc_client``
    (the project's one client: its retry policy is the one under test).

    Its ``totals`` (``new_totals``; these, if given) are shared by all its users.
    """
    import gevent.pool
    from locust import User, constant, task
    from locust.exception import StopUser

    from chunksvc_client import ApiError, Attempt, Client, RetryPolicy

    shared = new_totals() if totals is None else totals

    class UploadUser(User):
        wait_time = constant(0)
        totals = shared  # users are greenlets of one thread: no lock needed

        def on_start(self) -> None:
            retry = RetryPolicy(attempts=settings.retries + 1, base_delay=0.2, max_delay=5.0)
            if self.host is None:
                raise RuntimeError("no chunksvc to load: give locust --host")
            self.client = Client(
                self.host,
                api_key,
                retry=retry,
                timeout=300.0,
                on_attempt=self.record,
                max_connections=max(2, settings.parallel + 1),
            )
            self.template = bytearray(os.urandom(settings.part_size))
            self.user_tag = os.urandom(8)

        def on_stop(self) -> None:
            self.client.close()

        def record(self, attempt: Attempt) -> None:
            """Every attempt the client makes, retried ones included, as one locust request."""
            error = attempt.error
            expected = EXPECTED.get()
            name = endpoint(attempt.method, attempt.path)
            exception: str | AssertionError | None = None
            if expected is not None:
                name = CONFLICT
                if error is None:  # a deliberate request that was accepted
                    exception = AssertionError(f"expected {expected}, got {attempt.status}")
                elif error.code == expected:
                    error = None
            if error is not None:
                exception = f"{error.code} (retried)" if error.retryable else error.code
            self.environment.events.request.fire(
                request_type=attempt.method,
                name=name,
                response_time=attempt.seconds * 1000,
                response_length=attempt.response_bytes,
                exception=exception,
                context={},
            )

        def part_bytes(self, file_number: int, part: int) -> bytes:
            """Part ``part`` of file ``file_number``: distinct bytes for every part of every file."""
            length = min(settings.part_size, settings.size_of(file_number) - (part - 1) * settings.part_size)
            self.template[:24] = self.user_tag + file_number.to_bytes(8, "big") + part.to_bytes(8, "big")
            return bytes(self.template[:length])

        @task
        def upload_file(self) -> None:
            if settings.max_files and self.totals["files"] >= settings.max_files:
                raise StopUser()
            self.totals["files"] += 1
            file_number = self.totals["files"]
            size = settings.size_of(file_number)
            total_parts = -(-size // settings.part_size)
            digest = hashlib.sha256()
            for part in range(1, total_parts + 1):
                digest.update(self.part_bytes(file_number, part))
            try:
                session = self.client.create_session(
                    f"load-{file_number}.bin",
                    size,
                    part_size=settings.part_size,
                    idempotency_key=f"load-{self.user_tag.hex()}-{file_number}",
                )
                pool = gevent.pool.Pool(max(1, settings.parallel))
                pool.map(lambda part: self.put_part(session["id"], file_number, part), range(1, total_parts + 1))
                done = self.client.complete(session["id"], digest.hexdigest())
            except ApiError:
                return  # recorded by ``record``, attempt by attempt
            if done["object"]["sha256"] != digest.hexdigest():
                self.environment.events.request.fire(
                    request_type="CHECK",
                    name="assembled object SHA-256",
                    response_time=0,
                    response_length=0,
                    exception=AssertionError("the assembled object's SHA-256 differs from the file's"),
                    context={},
                )
            else:
                self.totals["completed"] += 1

        def put_part(self, session_id: str, file_number: int, part: int) -> None:
            data = self.part_bytes(file_number, part)
            self.client.put_part(session_id, part, data)
            self.totals["bytes"] += len(data)
            if settings.conflict_rate and random.random() < settings.conflict_rate:
                other = data[:-1] + bytes([data[-1] ^ 0xFF])
                token = EXPECTED.set("part_conflict")
                try:
                    self.client.put_part(session_id, part, other)
                    raise AssertionError("a part PUT again with other bytes was accepted")
                except ApiError as error:
                    if error.code != "part_conflict":
                        raise
                finally:
                    EXPECTED.reset(token)

    return UploadUser


class Progress:
    """The line printed every few seconds while the load runs: elapsed time, uploads completed
    (and verified), part throughput over the last interval and overall, and failed requests
    (those the client retried apart: they are expected under faults)."""

    def __init__(
        self, totals: Mapping[str, int], stats: RequestStats, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._totals = totals
        self._stats = stats  # locust's RequestStats
        self._clock = clock
        self._started = clock()
        self._last = (self._started, 0)

    def line(self) -> str:
        now, sent = self._clock(), self._totals["bytes"]
        last_at, last_sent = self._last
        self._last = (now, sent)
        recent = (sent - last_sent) / MiB / (now - last_at) if now > last_at else 0.0
        overall = sent / MiB / (now - self._started) if now > self._started else 0.0
        retried = sum(error.occurrences for error in self._stats.errors.values() if "(retried)" in str(error.error))
        failed = sum(error.occurrences for error in self._stats.errors.values()) - retried
        return (
            f"loadtest: {now - self._started:.0f} s: {self._totals['completed']} uploads completed"
            f" ({self._totals['files']} started), parts {recent:.1f} MiB/s now, {overall:.1f} MiB/s overall;"
            f" {failed} requests failed, {retried} retried"
        )

    def run(self, every: float, out: TextIO | None = None) -> None:
        """Print a line every ``every`` seconds (a greenlet, killed when the load ends)."""
        import gevent

        while True:
            gevent.sleep(every)
            print(self.line(), file=out or sys.stderr, flush=True)


def run_load(
    url: str,
    api_key: str,
    settings: Settings,
    users: int,
    spawn_rate: float,
    run_time: float,
    progress_every: float = 5.0,
) -> int:
    """Run the load in this process, with a progress line on stderr every ``progress_every``
    seconds (0: none); print the report; 1 if any request failed unexpectedly."""
    import gevent
    from locust.env import Environment

    totals = new_totals()
    user_class = make_user(settings, api_key, totals)
    environment = Environment(user_classes=[user_class], host=url.rstrip("/"), stop_timeout=60)
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=spawn_rate)
    stopper = gevent.spawn_later(run_time, runner.quit)
    progress = Progress(totals, environment.stats)
    reporter = gevent.spawn(progress.run, progress_every) if progress_every > 0 else None

    def quit_when_all_stopped() -> None:
        # With --max-files, every user stops by itself once the files are started.
        while runner.user_count > 0 or runner.state in ("spawning", "ready"):
            gevent.sleep(0.5)
        runner.quit()

    watcher = gevent.spawn(quit_when_all_stopped)
    runner.greenlet.join()
    stopper.kill()
    watcher.kill()
    if reporter is not None:
        reporter.kill()
    return report(environment, settings, users, totals["bytes"], totals["completed"])


def report(environment: Environment, settings: Settings, users: int, part_bytes: int, files: int) -> int:
    stats = environment.stats
    last = stats.total.last_request_timestamp  # None until the first request
    elapsed = max(last - stats.total.start_time, 1e-9) if stats.total.num_requests and last is not None else 0
    parts = stats.entries.get((PART, "PUT"))
    accepted = (parts.num_requests - parts.num_failures) if parts else 0
    print(
        f"\n{users} users, files of {settings.file_size} bytes"
        f"{' (every other one a quarter of that)' if settings.mixed_sizes else ''} in parts of {settings.part_size}, "
        f"{settings.parallel} parts at once, {settings.retries} retries, conflict rate {settings.conflict_rate}"
    )
    print(
        f"elapsed {elapsed:.1f} s; files completed {files}; parts accepted {accepted}; "
        f"part throughput {part_bytes / elapsed / 1e6 if elapsed else 0:.1f} MB/s"
    )
    print(f"\n{'endpoint':<62} {'reqs':>7} {'fails':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for (name, method), entry in sorted(stats.entries.items()):
        print(
            f"{method + ' ' + name.split(' ', 1)[-1]:<62} {entry.num_requests:>7} {entry.num_failures:>6} "
            f"{entry.num_requests / elapsed if elapsed else 0:>7.1f} "
            f"{entry.get_response_time_percentile(0.5):>8.0f} {entry.get_response_time_percentile(0.95):>8.0f} "
            f"{entry.get_response_time_percentile(0.99):>8.0f}"
        )
    unexpected = 0
    if stats.errors:
        print(f"\n{'errors by code':<62} {'count':>7}")
        for error in sorted(stats.errors.values(), key=lambda e: -e.occurrences):
            where = f"{error.method} {error.name.split(' ', 1)[-1]}: {error.error}"
            print(f"{where:<62} {error.occurrences:>7}")
            if "(retried)" not in str(error.error):
                unexpected += error.occurrences
    else:
        print("\nno errors")
    return 1 if unexpected else 0


def smoke(args: argparse.Namespace) -> int:
    """Start chunksvc locally and run the load against it from a child process (locust patches
    the standard library with gevent, which the local service must not be started under)."""
    from chunksvc.config import StorageSpec
    from tools import harness

    with tempfile.TemporaryDirectory(prefix="chunksvc-loadtest-") as tmp, harness.embedded_database(Path(tmp)) as url:
        key = harness.create_api_key(url, "loadtest")
        spec = StorageSpec(kind="file", root=Path(tmp) / "storage")
        # Half the files above the synchronous completion limit: both completion paths are loaded.
        env = {"CHUNKSVC_LOG_LEVEL": "warning", "CHUNKSVC_SYNC_COMPLETE_MAX": str(args.file_size // 2)}
        with harness.gunicorn(url, spec, env=env) as server:
            print(
                f"chunksvc started locally at {server.url} (embedded PostgreSQL, disk storage; uploads above"
                f" {args.file_size // 2} bytes complete in the background)",
                flush=True,
            )
            command = [sys.executable, "-m", "tools.loadtest", "--url", server.url, "--mixed-sizes", *sys.argv[1:]]
            return subprocess.run(command, env={**os.environ, "CHUNKSVC_API_KEY": key}, check=False).returncode


def size(text: str) -> int:
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("CHUNKSVC_URL"), help="default $CHUNKSVC_URL; none: local")
    parser.add_argument("--api-key", default=os.environ.get("CHUNKSVC_API_KEY"), help="default $CHUNKSVC_API_KEY")
    parser.add_argument("--users", type=int, default=4, help="virtual clients (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    parser.add_argument("--file-size", type=size, default="12MiB", help="e.g. 12MiB, 1GiB (default 12MiB)")
    parser.add_argument("--part-size", type=size, default="5MiB", help="default 5MiB")
    parser.add_argument("--parallel", type=int, default=2, help="parts of one file in flight at once")
    parser.add_argument("--retries", type=int, default=2, help="retries of a part after a 5xx or connection error")
    parser.add_argument("--conflict-rate", type=float, default=0.1, help="share of parts PUT again with other bytes")
    parser.add_argument("--run-time", type=float, default=20, help="seconds (default 20)")
    parser.add_argument("--max-files", type=int, default=20, help="files in all (0: until --run-time)")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=5,
        metavar="SECONDS",
        help="a progress line on stderr this often while the load runs (default 5; 0: none)",
    )
    parser.add_argument(
        "--mixed-sizes",
        action="store_true",
        help="every other file a quarter of --file-size (with a server's CHUNKSVC_SYNC_COMPLETE_MAX"
        " between the two, both completion paths)",
    )
    args = parser.parse_args(argv)
    if not args.url:
        return smoke(args)
    if not args.api_key:
        parser.error("an API key is needed: set CHUNKSVC_API_KEY or pass --api-key")
    settings = Settings(
        file_size=args.file_size,
        part_size=args.part_size,
        parallel=args.parallel,
        retries=args.retries,
        conflict_rate=args.conflict_rate,
        max_files=args.max_files,
        mixed_sizes=args.mixed_sizes,
    )
    return run_load(args.url, args.api_key, settings, args.users, args.spawn_rate, args.run_time, args.progress_every)


if __name__ == "__main__":
    sys.exit(main())
