"""JSON logs: one access line per request, the request's id (and client, session, part) in every
line logged while it is handled, never an API key; gunicorn's own log in the same format."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import falcon
import pytest

from chunksvc import logs
from chunksvc.config import StorageSpec
from chunksvc.resources.middleware import publish_client
from chunksvc.services.auth import Client
from tests.helpers import create, payload, put_part
from tests.test_api import assert_problem

ROOT = Path(__file__).resolve().parents[1]
PART_ROUTE = "/uploads/sessions/{session_id}/parts/{part_number}"


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    @property
    def text(self) -> str:
        return self._stream.getvalue()

    @property
    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines()]

    def access(self) -> list[dict]:
        return [line for line in self.lines if line["logger"] == logs.ACCESS_LOGGER]


@pytest.fixture
def captured():
    """Every record, through the same formatter and filter gunicorn's configuration uses."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield Captured(stream)
    root.removeHandler(handler)
    root.setLevel(level)


def test_access_line_per_request(app, auth, api_key, captured):
    session = create(app, auth, size=10, headers={"X-Request-ID": "create-1"}).json
    put_part(app, auth, session["id"], 1, payload(10), headers={"X-Request-ID": "part-1"})

    created, stored = captured.access()
    assert created["request_id"] == "create-1"
    assert (created["method"], created["route"], created["status"]) == ("POST", "/uploads/sessions", 201)
    assert created["client"] == "alice"
    assert created["bytes_out"] > 0 and isinstance(created["duration_ms"], float)
    assert stored["request_id"] == "part-1"
    assert (stored["method"], stored["route"], stored["status"]) == ("PUT", PART_ROUTE, 201)
    assert (stored["session_id"], stored["part_number"], stored["bytes_in"]) == (session["id"], 1, 10)
    assert stored["client"] == "alice"
    assert api_key not in captured.text and api_key.split("_", 2)[2] not in captured.text


def test_refused_requests_are_logged_with_their_code_and_ids(app, auth, captured):
    session = create(app, auth, size=10).json
    response = put_part(app, {"Authorization": "Bearer csk_00000000_" + "x" * 43}, session["id"], 7, b"x", status=401)
    app.get("/nowhere", status=404)

    refused, unmatched = captured.access()[1:]
    assert refused["request_id"] == response.headers["X-Request-ID"]
    assert (refused["status"], refused["code"], refused["route"]) == (401, "unauthorized", PART_ROUTE)
    assert (refused["session_id"], refused["part_number"]) == (session["id"], 7)
    assert "client" not in refused
    assert (unmatched["route"], unmatched["code"]) == ("unmatched", "not_found")


def test_the_client_address_comes_from_a_trusted_proxy_only(app, auth, captured):
    forwarded = {"X-Forwarded-For": "10.9.9.9, 203.0.113.7"}
    app.get("/uploads/sessions", headers={**auth, **forwarded}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    app.get("/uploads/sessions", headers={**auth, **forwarded}, extra_environ={"REMOTE_ADDR": "198.51.100.9"})
    app.get("/uploads/sessions", headers=auth, extra_environ={"REMOTE_ADDR": "127.0.0.1"})

    proxied, direct, plain = captured.access()
    assert (proxied["remote_addr"], proxied["proxy_addr"]) == ("203.0.113.7", "127.0.0.1")
    assert direct["remote_addr"] == "198.51.100.9" and "proxy_addr" not in direct
    assert plain["remote_addr"] == "127.0.0.1" and "proxy_addr" not in plain


def test_insane_request_id_is_replaced(app, captured):
    response = app.get("/healthz", headers={"X-Request-ID": "two words\t" + "x" * 200})
    generated = response.headers["X-Request-ID"]
    assert generated != "two words" and " " not in generated
    assert captured.access()[0]["request_id"] == generated


class Boom:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        logging.getLogger("chunksvc.test").warning("about to fail")
        raise RuntimeError("internal detail that must stay in the log")


class SelfAuthenticating:
    """A resource that authenticates GET itself, as the part route authenticates PUT."""

    auth_in_responder = frozenset({"GET"})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        assert req.context.client is None  # BearerAuth left the key to this responder
        publish_client(req, Client(id=0, name="checked-here"))
        logging.getLogger("chunksvc.test").warning("after the check")
        resp.media = {}


def test_a_client_the_responder_authenticated_is_in_every_later_line(wsgi_app, app, captured):
    wsgi_app.add_route("/uploads/self", SelfAuthenticating())
    app.get("/uploads/self")  # no key: the responder, not the middleware, decides
    warning, access = captured.lines
    assert (warning["msg"], warning["client"]) == ("after the check", "checked-here")
    assert (access["route"], access["status"], access["client"]) == ("/uploads/self", 200, "checked-here")
    assert_problem(app.delete("/uploads/self", status=401), 401, "unauthorized")  # other methods: the middleware


def test_every_line_of_a_request_carries_its_ids_and_a_500_leaks_nothing(wsgi_app, app, auth, captured):
    wsgi_app.add_route("/uploads/boom", Boom())
    response = app.get("/uploads/boom", headers={**auth, "X-Request-ID": "boom-1"}, status=500)
    assert response.json["code"] == "internal_error"
    assert "internal detail" not in response.text
    assert response.headers["X-Request-ID"] == "boom-1"

    warning, error, access = captured.lines
    assert (warning["msg"], warning["request_id"], warning["client"]) == ("about to fail", "boom-1", "alice")
    assert error["level"] == "error" and error["request_id"] == "boom-1"
    assert "internal detail that must stay in the log" in error["exc"]
    assert (access["request_id"], access["status"], access["code"]) == ("boom-1", 500, "internal_error")

    # Outside a request, nothing is attached.
    logging.getLogger("chunksvc.test").warning("between requests")
    assert "request_id" not in captured.lines[-1]


def test_a_key_in_a_message_is_redacted(api_key, captured):
    logging.getLogger("chunksvc.test").warning("header was Bearer %s", api_key)
    line = captured.lines[0]
    assert api_key not in captured.text
    assert line["msg"] == f"header was Bearer {api_key[:12]}_<redacted>"


def test_logging_config_is_valid_for_dictconfig(tmp_path):
    config = logs.logging_config("debug", str(tmp_path / "access.log"))
    assert config["loggers"][logs.ACCESS_LOGGER]["handlers"] == ["access"]
    assert logs.logging_config("info", "")["handlers"]["access"]["class"] == "logging.NullHandler"
    assert logs.logging_config("info", "-")["handlers"]["access"]["stream"] == "ext://sys.stdout"


# --- under gunicorn ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(gunicorn_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("logs-server")
    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_ACCESS_LOG": str(workdir / "access.log"),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
    }
    storage = StorageSpec(kind="file", root=workdir / "storage")
    with gunicorn_server(storage, env, name="logs", client="ops-client", stderr_path=workdir / "stderr.log") as served:
        yield {
            "gunicorn": served.server,
            "key": served.key,
            "access": workdir / "access.log",
            "stderr": workdir / "stderr.log",
        }


def test_gunicorn_writes_json_access_and_error_logs(server):
    key = server["key"]
    status, response, _ = server["gunicorn"].request(
        "POST",
        "/uploads/sessions",
        json.dumps({"filename": "f", "size": 5}).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "X-Request-ID": "e2e-42"},
    )
    assert status == 201 and response.getheader("X-Request-ID") == "e2e-42"

    access = [json.loads(line) for line in server["access"].read_text().splitlines()]
    line = next(line for line in access if line.get("request_id") == "e2e-42")
    assert (line["client"], line["route"], line["status"], line["method"]) == (
        "ops-client",
        "/uploads/sessions",
        201,
        "POST",
    )
    assert key not in server["access"].read_text()

    # gunicorn's own lines (boot, workers) are JSON too, and its access log is off.
    errors = [line for line in server["stderr"].read_text().splitlines() if line.startswith("{")]
    parsed = [json.loads(line) for line in errors]
    assert any(entry["logger"] == "gunicorn.error" and "Booting worker" in entry["msg"] for entry in parsed)
    assert not any(entry["logger"] == "gunicorn.access" for entry in parsed)
    assert key not in server["stderr"].read_text()
