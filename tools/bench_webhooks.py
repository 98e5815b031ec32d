"""Completion events' figures: ``make bench-webhooks`` (``python -m tools.bench_webhooks``).

Starts chunksvc as ops do (gunicorn with ``gunicorn.conf.py``, an embedded PostgreSQL, disk
storage) with a signing key, and a receiver in this process, and prints:

- latency: from ``complete`` returning to the receiver seeing the event, over ``--uploads``
  small uploads done one after another (p50, p99, max; both ends on this process's clock);
- a hanging endpoint's cost to uploads: the part-upload throughput (8 MiB parts, one client, a
  session completed every ``--parts-per-session`` parts, so events are made throughout) with an
  endpoint registered whose receiver accepts connections and never answers, as a ratio to the
  same with no endpoint, in interleaved rounds (median, min-max). The same for 4 KiB parts, one
  per session (an event per part: the worst case for the deliverer's share of the machine).
"""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chunksvc.config import KiB, MiB, StorageSpec
from chunksvc.db import Database
from chunksvc.services.webhook_registry import WebhookRegistry
from chunksvc.services.webhook_signing import SigningKey
from tools import harness
from tools.client import Client
from tools.measure import percentile

ROOT = Path(__file__).resolve().parent.parent
SIGNING_KEY = "ab" * 32


class Receiver:
    """An endpoint that answers 204 and notes when each event arrived (``time.monotonic``)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}  # session id -> arrival
        self.arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                now = time.monotonic()
                event = json.loads(body)
                with receiver.arrived:
                    receiver.arrivals.setdefault(event["session"]["id"], now)
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, session_id: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while session_id not in self.arrivals:
                if not self.arrived.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"no event for session {session_id} within {timeout} s")
            return self.arrivals[session_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangingReceiver:
    """Accepts connections and never answers: every attempt waits out the deliverer's timeout."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/events"
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)  # read nothing, answer nothing

    def release(self) -> None:
        """Drop the connections held so far: the attempts on them end now (so a round's hanging
        attempts do not run on into the next round)."""
        held, self._held = self._held, []
        for connection in held:
            connection.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.release()


def measure_latency(client: Client, receiver: Receiver, uploads: int) -> list[float]:
    latencies = []
    for _ in range(uploads):
        session_id = client.create_session(4 * KiB, 4 * KiB)
        client.put_part(session_id, 1, b"x" * (4 * KiB))
        client.complete(session_id)
        returned = time.monotonic()
        latencies.append(receiver.wait_for(session_id) - returned)
    return latencies


def upload_rate(client: Client, part: bytes, parts: int, parts_per_session: int) -> float:
    """Parts per second: ``parts`` PUTs, a session completed every ``parts_per_session``."""
    started = time.monotonic()
    sent = 0
    while sent < parts:
        count = min(parts_per_session, parts - sent)
        session_id = client.create_session(len(part) * count, len(part))
        for number in range(1, count + 1):
            client.put_part(session_id, number, part)
        client.complete(session_id)
        sent += count
    return parts / (time.monotonic() - started)


def interleaved(rounds: int, measure: Callable[[bool], float]) -> list[float]:
    """Per round: the rate with the hanging endpoint over the rate with none, alternating which
    goes first."""
    ratios = []
    for number in range(rounds):
        order = (True, False) if number % 2 else (False, True)
        rates = {hanging: measure(hanging) for hanging in order}
        ratios.append(rates[True] / rates[False])
        print(
            f"round {number + 1}: hanging {rates[True]:.1f}/s, none {rates[False]:.1f}/s, ratio {ratios[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return ratios


def summary(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=300, help="uploads for the latency figure")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per ratio")
    parser.add_argument("--stream-parts", type=int, default=64, help="8 MiB parts per stream round")
    parser.add_argument("--parts-per-session", type=int, default=4, help="8 MiB parts before each complete")
    parser.add_argument("--small-parts", type=int, default=400, help="4 KiB parts (one session each) per round")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="chunksvc-bench-webhooks-") as tmp:
        work = Path(tmp)
        spec = StorageSpec(kind="file", root=work / "storage")
        env = {
            "CHUNKSVC_ACCESS_LOG": "",
            "CHUNKSVC_LOG_LEVEL": "warning",
            "CHUNKSVC_MIN_PART_SIZE": str(4 * KiB),
            "CHUNKSVC_WEBHOOK_KEY": SIGNING_KEY,
        }
        receiver, hanging = Receiver(), HangingReceiver()
        with harness.embedded_database(work) as url, harness.gunicorn(url, spec, env=env, cwd=ROOT) as server:
            key = harness.create_api_key(url, "bench-webhooks")
            db = Database(url, min_size=1, max_size=2)
            registry = WebhookRegistry(db, SigningKey(bytes.fromhex(SIGNING_KEY)))
            client = Client(server.url, key)
            try:
                endpoint, _ = registry.add("bench-webhooks", receiver.url)
                measure_latency(client, receiver, 10)  # warm up: connections, caches
                latencies = measure_latency(client, receiver, args.uploads)
                registry.remove(endpoint.id)

                def measure(part: bytes, parts: int, per_session: int) -> Callable[[bool], float]:
                    def rate(with_hanging: bool) -> float:
                        if not with_hanging:
                            return upload_rate(client, part, parts, per_session)
                        added, _ = registry.add("bench-webhooks", hanging.url)
                        try:
                            return upload_rate(client, part, parts, per_session)
                        finally:
                            registry.remove(added.id)
                            hanging.release()

                    return rate

                stream = interleaved(args.rounds, measure(b"s" * (8 * MiB), args.stream_parts, args.parts_per_session))
                small = interleaved(args.rounds, measure(b"x" * (4 * KiB), args.small_parts, 1))
            finally:
                client.close()
                db.close()
                receiver.close()
                hanging.close()

    ms = [latency * 1000 for latency in latencies]
    print(f"webhook latency, complete returned -> receiver saw the event, {len(ms)} uploads (ms):")
    print(
        f"  p50 {percentile(ms, 0.5):.1f}  p90 {percentile(ms, 0.9):.1f}  p99 {percentile(ms, 0.99):.1f}"
        f"  min {min(ms):.1f}  max {max(ms):.1f}"
    )
    print("part throughput with an endpoint that hangs / with none (goal >= 0.98):")
    print(f"  8 MiB parts, a complete every {args.parts_per_session}: {summary(stream)}")
    print(f"  4 KiB parts, a complete after each: {summary(small)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
