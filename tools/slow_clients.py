"""How a host fares against clients that stall: ``python -m tools.slow_clients``.

Starts gunicorn as ops do (``gunicorn.conf.py``, 2 workers) on an embedded PostgreSQL and disk
storage, then opens ``--stalled-bodies`` connections that send a part's headers and a little of
its body, and ``--stalled-heads`` that send half a request head, and stop. Meanwhile
``--honest`` clients each upload a small file (create, one part, complete) with a client timeout.
Prints how many honest uploads finished, their latencies, and what the stalled connections got.
Run it once per configuration to compare, e.g. the old defaults against the new:

    python -m tools.slow_clients --threads 8 --body-timeout 3600
    python -m tools.slow_clients

Loopback only; every connection is closed when the run ends (at most ``--hold`` seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chunksvc.config import StorageSpec
from chunksvc_client import ApiError, Client, RetryPolicy
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
PART = 1024 * 1024


def honest_upload(url: str, key: str, seed: int, timeout: float) -> float | str:
    """Create, send one part, complete, through the client with no retries; seconds taken, or
    the error code."""
    data = hashlib.sha256(str(seed).encode()).digest() * (PART // 32)
    started = time.monotonic()
    try:
        with Client(url, key, timeout=timeout, retry=RetryPolicy(attempts=1)) as client:
            session = client.create_session("honest.bin", len(data), idempotency_key=f"honest-{seed}-{started}")
            client.put_part(session["id"], 1, data)
            client.complete(session["id"])
    except ApiError as error:
        return error.code
    return time.monotonic() - started


def stall_body(port: int, key: str, session_id: str, results: list[str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"PUT /uploads/sessions/{session_id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {PART}\r\n\r\n".encode()
        + b"x" * 1000
    )

    def watch() -> None:
        sock.settimeout(None)
        try:
            answer = sock.recv(200)
            results.append(answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "closed")
        except OSError:
            results.append("closed")

    threading.Thread(target=watch, daemon=True).start()
    return sock


def stall_head(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"PUT /uploads/sessions/x/parts/1 HTTP/1.1\r\nHost: x\r\nAuthor")
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CHUNKSVC_THREADS (default: gunicorn.conf.py's)")
    parser.add_argument("--body-timeout", type=int, default=None, help="CHUNKSVC_BODY_TIMEOUT (default: the app's)")
    parser.add_argument("--stalled-bodies", type=int, default=30)
    parser.add_argument("--stalled-heads", type=int, default=30)
    parser.add_argument("--honest", type=int, default=10)
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=75.0, help="seconds the stalled connections stay open at most")
    args = parser.parse_args(argv)

    env = {"CHUNKSVC_WORKERS": str(args.workers), "CHUNKSVC_ACCESS_LOG": "", "CHUNKSVC_LOG_LEVEL": "warning"}
    if args.threads is not None:
        env["CHUNKSVC_THREADS"] = str(args.threads)
    if args.body_timeout is not None:
        env["CHUNKSVC_BODY_TIMEOUT"] = str(args.body_timeout)
    with tempfile.TemporaryDirectory(prefix="chunksvc-slow-") as work:
        work_dir = Path(work)
        with harness.embedded_database(work_dir) as url:
            key = harness.create_api_key(url, "slow")
            spec = StorageSpec(kind="file", root=work_dir / "storage")
            with harness.gunicorn(url, spec, env=env, cwd=ROOT, unset=["PROMETHEUS_MULTIPROC_DIR"]) as server:
                port = server.port
                _status, _, body = server.request(
                    "POST",
                    "/uploads/sessions",
                    json.dumps({"filename": "s", "size": PART}),
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                session_id = json.loads(body)["id"]
                stalled_answers: list[str] = []
                started = time.monotonic()
                sockets = [stall_body(port, key, session_id, stalled_answers) for _ in range(args.stalled_bodies)]
                sockets += [stall_head(port) for _ in range(args.stalled_heads)]
                time.sleep(0.5)  # let the server take them all up
                with ThreadPoolExecutor(max_workers=args.honest) as pool:
                    outcomes = list(
                        pool.map(
                            lambda seed: honest_upload(server.url, key, seed, args.client_timeout), range(args.honest)
                        )
                    )
                # Keep the stalled connections until they were answered or --hold passed.
                while len(stalled_answers) < args.stalled_bodies and time.monotonic() - started < args.hold:
                    time.sleep(0.2)
                held = time.monotonic() - started
                for sock in sockets:
                    sock.close()

    finished = [outcome for outcome in outcomes if isinstance(outcome, float)]
    failed = [outcome for outcome in outcomes if not isinstance(outcome, float)]
    print(
        f"config: workers={args.workers} threads={args.threads or 'default'}"
        f" body_timeout={args.body_timeout or 'default'}"
    )
    print(f"stalled: {args.stalled_bodies} bodies, {args.stalled_heads} heads, held {held:.0f} s")
    print(
        f"honest uploads finished: {len(finished)} of {args.honest}"
        + (f" (p50 {statistics.median(finished):.2f} s, max {max(finished):.2f} s)" if finished else "")
        + (f"; failed: {', '.join(sorted(set(failed)))}" if failed else "")
    )
    answers = {answer: stalled_answers.count(answer) for answer in sorted(set(stalled_answers))}
    print(f"stalled bodies answered: {answers or 'none'} ({args.stalled_bodies - len(stalled_answers)} never)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
