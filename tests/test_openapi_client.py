"""The OpenAPI document generates a working client: openapi-python-client turns the running
server's GET /openapi.json into a package without a warning, and that package, against gunicorn
with the real PostgreSQL and disk storage, creates a session, uploads its parts, completes it, and
gets every error back as the generated ``Problem`` model with the contract's ``code``."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from chunksvc.config import StorageSpec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "chunksvc_openapi_client"  # the generated package's name; nothing else may be called that
# No post-generation hooks: the default ones run ruff from PATH, which only reformats the code
# (and warns when ruff is not on PATH).
GENERATOR_CONFIG: dict[str, list[str]] = {"post_hooks": []}


@pytest.fixture(scope="module")
def server(gunicorn_server, tmp_path_factory):
    """gunicorn as ops run it, on its own database, with disk storage and 1-byte minimum parts."""
    spec = StorageSpec(kind="file", root=tmp_path_factory.mktemp("openapi-client") / "storage")
    env = {"CHUNKSVC_WORKERS": "1", "CHUNKSVC_MIN_PART_SIZE": "1", "CHUNKSVC_ACCESS_LOG": "/dev/null"}
    log = tmp_path_factory.mktemp("openapi-client-log") / "gunicorn.log"
    with gunicorn_server(spec, env, name="openapi", client="openapi-client", stderr_path=log) as served:
        yield {"gunicorn": served.server, "url": served.server.url, "key": served.key}


@pytest.fixture(scope="module")
def api(server, tmp_path_factory) -> Iterator[ModuleType]:
    """The client openapi-python-client generates from the served document, imported."""
    status, _, document = server["gunicorn"].request("GET", "/openapi.json")
    assert status == 200
    work = tmp_path_factory.mktemp("openapi-client-gen")
    # The /tus/ operations are for tus clients (tuspy, tus-js-client), which speak the tus protocol
    # and need no generated client; their application/offset+octet-stream bodies are a media type
    # openapi-python-client does not generate. Everything else must generate without a warning.
    described = json.loads(document)
    described["paths"] = {path: item for path, item in described["paths"].items() if not path.startswith("/tus/")}
    (work / "openapi.json").write_text(json.dumps(described))
    (work / "config.json").write_text(json.dumps(GENERATOR_CONFIG))
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(work / "openapi.json"),
            "--config",
            str(work / "config.json"),
            "--meta",
            "none",
            "--output-path",
            str(work / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
    )
    output = generated.stdout + generated.stderr
    assert generated.returncode == 0, output
    # Anything said beyond "Generating <path>" is a warning: a piece of the API (typically a
    # response) left out of the client.
    said = [line for line in output.splitlines() if line.strip() and not line.startswith("Generating ")]
    assert not said, output

    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(work))
        for module in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[module]


def operation(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.default.{name}")


def models() -> Any:
    return importlib.import_module(f"{PACKAGE}.models")


@pytest.fixture
def client(api, server):
    with api.AuthenticatedClient(base_url=server["url"], token=server["key"], raise_on_unexpected_status=True) as c:
        yield c


def assert_problem(response, status: int, code: str):
    """The response parsed into the generated Problem, with the contract's status and code."""
    problem = response.parsed
    assert isinstance(problem, models().Problem), (response.status_code, response.content)
    assert (response.status_code, problem.status, problem.code) == (status, status, code)
    assert problem.type_ == f"urn:chunksvc:problem:{code}"
    assert response.headers["Content-Type"].startswith("application/problem+json")
    return problem


def create(client, data: bytes, part_size: int, **fields):
    m = models()
    response = operation("create_session").sync_detailed(
        client=client,
        body=m.CreateSession(filename="generated.bin", size=len(data), part_size=part_size, **fields),
    )
    assert response.status_code == 201, response.content
    assert isinstance(response.parsed, m.Session)
    return response.parsed


def upload(client, session_id, number: int, chunk: bytes):
    return operation("upload_part").sync_detailed(
        session_id=session_id,
        part_number=number,
        client=client,
        body=importlib.import_module(f"{PACKAGE}.types").File(payload=io.BytesIO(chunk)),
    )


def test_generated_client_uploads_and_completes(client):
    m = models()
    data = b"0123456789" * 100 + b"tail"
    session = create(client, data, part_size=600, metadata=m.Metadata.from_dict({"origin": "generated"}))
    assert (session.status, session.total_parts, session.object_) == (m.Status.INIT, 2, None)

    for number, chunk in ((1, data[:600]), (2, data[600:])):
        response = upload(client, session.id, number, chunk)
        assert response.status_code == 201, response.content
        part = response.parsed
        assert isinstance(part, m.PartResult)
        assert (part.part_number, part.size, part.sha256) == (number, len(chunk), hashlib.sha256(chunk).hexdigest())

    parts = operation("list_parts").sync(session_id=session.id, client=client)
    assert isinstance(parts, m.PartList) and [p.part_number for p in parts.parts] == [1, 2]

    # No body: the digest is optional at completion.
    response = operation("complete_session").sync_detailed(session_id=session.id, client=client)
    assert response.status_code == 200, response.content
    done = response.parsed
    assert isinstance(done, m.Session) and done.status == m.Status.COMPLETED
    assert isinstance(done.object_, m.StoredObject)
    assert (done.object_.size, done.object_.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert done.metadata.additional_properties == {"origin": "generated"}

    fetched = operation("get_session").sync(session_id=session.id, client=client)
    assert isinstance(fetched, m.Session) and fetched.status == m.Status.COMPLETED


def test_completion_with_the_digest_in_the_body(client):
    m = models()
    data = b"digest in the completion body"
    session = create(client, data, part_size=len(data))
    assert upload(client, session.id, 1, data).status_code == 201
    response = operation("complete_session").sync_detailed(
        session_id=session.id, client=client, body=m.CompleteSession(sha256=hashlib.sha256(data).hexdigest())
    )
    assert response.status_code == 200, response.content
    assert response.parsed.sha256 == hashlib.sha256(data).hexdigest()


def test_errors_come_through_as_typed_problems(api, client, server):
    m = models()
    assert_problem(
        operation("get_session").sync_detailed(session_id=uuid.uuid4(), client=client), 404, "session_not_found"
    )
    assert_problem(
        operation("create_session").sync_detailed(client=client, body=m.CreateSession(filename="x.bin", size=0)),
        400,
        "invalid_request",
    )
    with api.AuthenticatedClient(base_url=server["url"], token="csk_wrong", raise_on_unexpected_status=True) as wrong:
        assert_problem(operation("list_sessions").sync_detailed(client=wrong), 401, "unauthorized")

    # Members some codes add beyond the Problem's own come through as additional properties.
    data = b"abcdef"
    session = create(client, data, part_size=2)
    assert upload(client, session.id, 2, data[2:4]).status_code == 201
    conflict = assert_problem(upload(client, session.id, 2, b"zz"), 409, "part_conflict")
    assert conflict.additional_properties["sha256"] == hashlib.sha256(data[2:4]).hexdigest()
    missing = assert_problem(
        operation("complete_session").sync_detailed(session_id=session.id, client=client), 409, "parts_missing"
    )
    assert (missing.additional_properties["missing_parts"], missing.additional_properties["missing_count"]) == (
        [1, 3],
        2,
    )
