"""Checks that keep the house in order: the import layering, and the event fan-out covering every
event. Fast, no services: they read the code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from chunksvc.services.events import Observers, UploadEvents

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chunksvc"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(module: str) -> str:
    return module.split(".", 1)[0]


@pytest.mark.parametrize("path", sorted((PACKAGE / "services").glob("*.py")), ids=lambda p: p.name)
def test_services_know_no_http_database_driver_s3_sdk_or_metrics_library(path):
    # The services speak domain objects: HTTP is resources/, SQL is dao/db, bytes are storage/.
    forbidden = {"falcon", "psycopg", "psycopg_pool", "minio", "prometheus_client", "urllib3"}
    assert not {top(m) for m in imported_modules(path)} & forbidden


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_imports_neither_tools_nor_tests(path):
    assert not {top(m) for m in imported_modules(path)} & {"tools", "tests"}


@pytest.mark.parametrize("path", sorted((PACKAGE / "storage").glob("*.py")), ids=lambda p: p.name)
def test_storage_knows_bytes_not_the_api(path):
    # Adapters store bytes under keys; sessions, parts and HTTP are the service's.
    imported = imported_modules(path)
    assert not {m for m in imported if m.startswith(("chunksvc.services", "chunksvc.resources", "chunksvc.dao"))}
    assert "falcon" not in {top(m) for m in imported}


# Sample arguments by annotation, for calling every event with something of its type.
SAMPLES = {"bool": True, "int": 3, "float": 0.5, "float | None": None, "Mapping[str, int]": {"x": 1}}


def test_observers_forward_every_event_to_every_observer():
    events = [name for name, _ in inspect.getmembers(UploadEvents, inspect.isfunction) if not name.startswith("_")]
    assert "part_stored" in events  # the listing itself works
    calls: list[tuple[int, str, tuple, dict]] = []

    def recorder(number: int) -> UploadEvents:
        class Recorder(UploadEvents):
            pass

        for name in events:

            def record(self, *args, _name=name, **kwargs):
                calls.append((number, _name, args, kwargs))

            setattr(Recorder, name, record)
        return Recorder()

    fan_out = Observers([recorder(1), recorder(2)])
    expected = []
    for name in events:
        parameters = list(inspect.signature(getattr(UploadEvents, name)).parameters.values())[1:]
        args = tuple(SAMPLES[p.annotation] for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)
        kwargs = {p.name: SAMPLES[p.annotation] for p in parameters if p.kind is p.KEYWORD_ONLY}
        getattr(fan_out, name)(*args, **kwargs)
        expected += [(1, name, args, kwargs), (2, name, args, kwargs)]
    assert calls == expected
