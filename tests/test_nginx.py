"""The shipped nginx configuration (deploy/nginx/), run by the distribution's nginx in front of
gunicorn: the walk-through through it over HTTP and TLS, request ids kept and logged, nginx's own
errors as problem+json, the client address from a trusted proxy only, and stalled clients that do
not stop an honest upload."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from chunksvc import embedded
from chunksvc.config import StorageSpec
from chunksvc_client import ApiError, Client
from chunksvc_client.retry import RetryPolicy
from tools import harness, nginx

ROOT = Path(__file__).resolve().parents[1]
MAX_PART = 16 * 1024 * 1024
HONEST, SPOOFER, TRICKLER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PORTAL = "https://portal.example.com"  # the browser origin the stack allows (CHUNKSVC_CORS_ORIGINS)

if nginx.nginx_binary() is None:
    if os.environ.get("CI"):
        raise RuntimeError("nginx is not installed: .ci/run installs it (apt-get install nginx)")
    pytest.skip("nginx is not installed (apt-get install nginx)", allow_module_level=True)


@pytest.fixture(scope="module")
def stack(pg_admin_url, template_db, tmp_path_factory):
    """gunicorn (2 workers, disk storage, its access log in a file) with nginx in front."""
    name = f"chunksvc_nginx_{uuid.uuid4().hex[:12]}"
    url = embedded.ensure_database(pg_admin_url, name, template=template_db)
    work = tmp_path_factory.mktemp("nginx")
    spec = StorageSpec(kind="file", root=work / "storage")
    access_log = work / "chunksvc.access.log"
    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_MAX_PART_SIZE": str(MAX_PART),
        "CHUNKSVC_MAX_UPLOAD_SIZE": str(1024 * MAX_PART),
        "CHUNKSVC_ACCESS_LOG": str(access_log),
        "CHUNKSVC_FORWARDED_ALLOW_IPS": "127.0.0.1",  # nginx; not the test's own source addresses
        "CHUNKSVC_CORS_ORIGINS": PORTAL,
    }
    try:
        with harness.gunicorn(url, spec, env=env, cwd=ROOT, stderr_path=work / "gunicorn.log") as server:
            key = harness.create_api_key(url, "nginx-tests")
            with nginx.nginx(work / "nginx", server.port, max_part_size=MAX_PART) as proxy:
                yield {"server": server, "nginx": proxy, "key": key, "access_log": access_log}
    finally:
        embedded.drop_database(pg_admin_url, name)


def _access_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_line(path: Path, predicate, timeout: float = 10) -> dict:
    """The access line matching ``predicate`` (logs are written just after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        matches = [line for line in _access_lines(path) if predicate(line)] if path.exists() else []
        if matches:
            return matches[-1]
        assert time.monotonic() < deadline, f"no matching line in {path}"
        time.sleep(0.05)


def _http(source: str, **options) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source, **options), timeout=30)


@pytest.mark.parametrize("route", ["direct", "http", "tls"])
def test_the_readme_walkthrough_passes(stack, route):
    """docs/walkthrough.sh is the README's curl walk-through (checked below), run as a user would."""
    proxy = stack["nginx"]
    url = {"direct": stack["server"].url, "http": proxy.http_url, "tls": proxy.tls_url}[route]
    env = {**os.environ, "CHUNKSVC_URL": url, "CHUNKSVC_API_KEY": stack["key"]}
    env["CURL_CA_BUNDLE"] = str(proxy.certificate)
    result = subprocess.run(
        ["bash", str(ROOT / "docs" / "walkthrough.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "stored and verified: " in result.stdout


def test_the_walkthrough_script_is_the_docs_block():
    readme = (ROOT / "docs" / "client.md").read_text()
    section = readme.index("## A whole upload with curl")
    start = readme.index("```sh\n", section) + len("```sh\n")
    block = readme[start : readme.index("```\n", start)]
    assert (ROOT / "docs" / "walkthrough.sh").read_text() == "#!/usr/bin/env bash\n" + block


@pytest.mark.parametrize("route", ["http", "tls"])
def test_a_browsers_preflight_and_its_exposed_headers_pass_through(stack, route):
    """nginx adds nothing and drops nothing: the service answers the preflight (no credentials),
    and the page may read a tus upload's Upload-Offset and Location."""
    proxy = stack["nginx"]
    url = {"http": proxy.http_url, "tls": proxy.tls_url}[route]
    auth = {"Authorization": f"Bearer {stack['key']}", "Origin": PORTAL, "Tus-Resumable": "1.0.0"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(proxy.certificate)), timeout=30) as http:
        preflight = http.options(
            f"{url}/tus/",
            headers={
                "Origin": PORTAL,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,tus-resumable,upload-length",
            },
        )
        created = http.post(f"{url}/tus/", headers={**auth, "Upload-Length": "3"})
        head = http.head(url + created.headers["Location"], headers=auth)
        stranger = http.head(url + created.headers["Location"], headers={**auth, "Origin": "https://evil.example"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == PORTAL
    assert "upload-length" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    assert created.status_code == 201 and head.status_code == 200
    for response in (created, head):
        assert response.headers["Access-Control-Allow-Origin"] == PORTAL
        exposed = {name.strip().lower() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"location", "upload-offset", "tus-resumable"} <= exposed
    assert head.headers["Upload-Offset"] == "0"
    assert not [name for name in stranger.headers if name.lower().startswith("access-control-")]


def test_the_parallel_client_uploads_through_tls(stack, tmp_path):
    proxy = stack["nginx"]
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    with Client(proxy.tls_url, stack["key"], verify=str(proxy.certificate)) as client:
        session = client.upload_file(source, part_size=1024 * 1024, parallel=4)
    assert session["status"] == "COMPLETED"
    assert session["object"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_the_callers_request_id_is_kept_and_logged_on_both_sides(stack):
    proxy = stack["nginx"]
    with _http(HONEST) as http:
        kept = http.get(f"{proxy.http_url}/uploads/sessions", headers={"X-Request-ID": "caller-id-7"})
        generated = http.get(f"{proxy.http_url}/healthz")
        insane = http.get(f"{proxy.http_url}/healthz", headers={"X-Request-ID": "no spaces; please"})
    assert kept.status_code == 401 and kept.headers["X-Request-ID"] == "caller-id-7"
    assert kept.json()["code"] == "unauthorized"  # the service's own error passes through untouched
    new_id = generated.headers["X-Request-ID"]
    assert len(new_id) == 32 and new_id != insane.headers["X-Request-ID"] != "no spaces; please"

    for request_id in ("caller-id-7", new_id):
        _wait_for_line(proxy.access_log, lambda line, rid=request_id: line["request_id"] == rid)
        _wait_for_line(stack["access_log"], lambda line, rid=request_id: line.get("request_id") == rid)


def test_an_oversized_part_gets_413_problem_json_from_nginx(stack):
    proxy = stack["nginx"]
    session_id = str(uuid.uuid4())
    with _http(HONEST) as http:
        response = http.put(
            f"{proxy.http_url}/uploads/sessions/{session_id}/parts/1",
            content=b"x" * (MAX_PART + 1),
            headers={"Authorization": f"Bearer {stack['key']}", "X-Request-ID": "too-big-1"},
        )
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["X-Request-ID"] == "too-big-1"
    problem = response.json()
    assert (problem["status"], problem["code"]) == (413, "part_too_large")
    assert {"type", "title", "detail"} <= problem.keys()
    line = _wait_for_line(proxy.access_log, lambda line: line["request_id"] == "too-big-1")
    assert line["status"] == 413 and line["upstream_status"] == ""  # refused before the service saw it


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),  # no URI at all
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 400),
        (b"GET /" + b"a" * 4100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # gunicorn would refuse it too
        (b"GET /.chunksvc-errors/502 HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # the error pages are internal
    ],
    ids=["garbage-line", "big-header", "long-line", "error-page-path"],
)
def test_requests_nginx_refuses_get_problem_json(stack, request_bytes, status):
    with socket.create_connection(("127.0.0.1", stack["nginx"].http_port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    head, _, body = answer.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert lines[0].split()[1] == str(status)
    assert headers["content-type"] == "application/problem+json" and headers["x-request-id"]
    problem = json.loads(body)
    assert problem["status"] == status and problem["code"] == ("not_found" if status == 404 else "invalid_request")


def test_metrics_and_readiness_only_for_the_monitoring_hosts(stack):
    """They cost the service database work: through nginx, only the allowed hosts (here loopback's
    127.0.0.1) may ask; anyone else gets 403 problem+json. /healthz stays open."""
    proxy = stack["nginx"]
    with _http(HONEST) as http:
        refused = [http.get(f"{proxy.http_url}{path}") for path in ("/metrics", "/readyz")]
        health = http.get(f"{proxy.http_url}/healthz")
    with _http("127.0.0.1") as http:
        allowed = [http.get(f"{proxy.http_url}{path}") for path in ("/metrics", "/readyz")]
    for response in refused:
        assert response.status_code == 403 and response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "forbidden" and response.headers["X-Request-ID"]
    assert health.status_code == 200
    assert [response.status_code for response in allowed] == [200, 200]
    assert b"chunksvc_http_requests_total" in allowed[0].content


def test_a_part_of_the_largest_size_passes(stack):
    proxy = stack["nginx"]
    with Client(proxy.http_url, stack["key"]) as client:
        session = client.create_session("max.bin", MAX_PART, part_size=MAX_PART)
        body = os.urandom(MAX_PART)
        assert client.put_part(session["id"], 1, body)["size"] == MAX_PART


def test_the_client_address_is_the_one_a_trusted_proxy_reports(stack):
    """nginx (127.0.0.1, trusted) reports the caller's address; a caller's own X-Forwarded-For
    is replaced by nginx, and ignored when a caller that is not a trusted proxy sends it directly."""
    proxy, server = stack["nginx"], stack["server"]
    with _http(HONEST) as http:
        http.get(f"{proxy.http_url}/healthz", headers={"X-Request-ID": "via-nginx"})
    with _http(SPOOFER) as http:
        spoofed = {"X-Forwarded-For": "10.6.6.6"}
        http.get(f"{proxy.http_url}/healthz", headers={"X-Request-ID": "spoof-via-nginx", **spoofed})
        http.get(f"{server.url}/healthz", headers={"X-Request-ID": "spoof-direct", **spoofed})

    log = stack["access_log"]
    via = _wait_for_line(log, lambda line: line.get("request_id") == "via-nginx")
    assert (via["remote_addr"], via["proxy_addr"]) == (HONEST, "127.0.0.1")
    spoof_via = _wait_for_line(log, lambda line: line.get("request_id") == "spoof-via-nginx")
    assert spoof_via["remote_addr"] == SPOOFER
    spoof_direct = _wait_for_line(log, lambda line: line.get("request_id") == "spoof-direct")
    assert spoof_direct["remote_addr"] == SPOOFER and "proxy_addr" not in spoof_direct


def test_nginx_errors_when_the_service_is_down_or_silent_are_problem_json(tmp_path):
    """502 with nothing listening upstream; 504 with an upstream that accepts and never answers
    (the read timeout shortened from the shipped 120 s so the test need not wait for it)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        dead_port = harness.free_port()
        attempts = []
        with nginx.nginx(tmp_path / "dead", dead_port, max_part_size=MAX_PART) as down:
            with _http(HONEST) as http:
                response = http.get(f"{down.http_url}/uploads/sessions", headers={"X-Request-ID": "down-1"})
            retry = RetryPolicy(attempts=2, base_delay=0, max_delay=0)
            with (
                pytest.raises(ApiError) as refused,
                Client(down.http_url, "k", retry=retry, on_attempt=attempts.append) as client,
            ):
                client.get_session(str(uuid.uuid4()))
        assert response.status_code == 502 and response.headers["X-Request-ID"] == "down-1"
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "upstream_unavailable"
        # The client reads nginx's page as the service's own: a retryable error with its code.
        error = refused.value
        assert (error.status, error.code, error.retryable) == (502, "upstream_unavailable", True)
        assert len(attempts) == 2

        overrides = {"proxy_read_timeout 120s;": "proxy_read_timeout 1s;"}
        with (
            nginx.nginx(
                tmp_path / "silent", silent.getsockname()[1], max_part_size=MAX_PART, overrides=overrides
            ) as hung,
            _http(HONEST) as http,
        ):
            response = http.get(f"{hung.http_url}/healthz")
        assert response.status_code == 504 and response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "upstream_timeout" and response.headers["X-Request-ID"]


class Tricklers:
    """Connections that send a request head, or a part body, one byte a second: what slowloris does."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self.refused = 0

    def open(self, heads: int, bodies: int, key: str, session_id: str) -> None:
        for number in range(heads + bodies):
            sock = socket.socket()
            sock.bind((TRICKLER, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", self._port))
            if number < heads:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            else:
                sock.sendall(
                    f"PUT /uploads/sessions/{session_id}/parts/{number + 1} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {key}\r\nContent-Length: 1048576\r\n\r\n".encode()
                )
            sock.setblocking(False)
            self._sockets.append(sock)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(1.0):
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.send(b"X")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()


def test_stalled_clients_do_not_stop_an_honest_upload(stack, tmp_path):
    """200 connections from one address trickle heads (held by nginx, cut after 10 s) or part bodies
    (at most 32 reach gunicorn, limit_conn); an upload from another address goes through meanwhile."""
    proxy, key = stack["nginx"], stack["key"]
    with Client(proxy.http_url, key) as client:
        target = client.create_session("slow.bin", 200 * 1024 * 1024, part_size=1024 * 1024)
    tricklers = Tricklers(proxy.http_port)
    try:
        tricklers.open(heads=100, bodies=100, key=key, session_id=target["id"])
        time.sleep(2)  # all connected and dripping
        source = tmp_path / "honest.bin"
        source.write_bytes(os.urandom(24 * 1024 * 1024))
        started = time.monotonic()
        with Client(proxy.http_url, key, timeout=30) as client:
            session = client.upload_file(source, part_size=4 * 1024 * 1024, parallel=4)
        elapsed = time.monotonic() - started
    finally:
        tricklers.close()
    assert session["status"] == "COMPLETED"
    assert session["object"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert elapsed < 30, f"the honest upload took {elapsed:.1f} s"

    # The bodies beyond the per-address limit were refused by nginx, never reaching a gunicorn thread.
    # nginx logs a refused request once it is done with the body still dripping in, that is once
    # the trickler's socket closes: so the lines may come a moment after close().
    def refused() -> list[dict]:
        lines = _access_lines(proxy.access_log)
        return [line for line in lines if line["remote_addr"] == TRICKLER and line["status"] == 503]

    deadline = time.monotonic() + 10
    while len(refused()) < 100 - 32 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(refused()) >= 100 - 32
