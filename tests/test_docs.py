"""The docs agree with the code. docs/api.md, the API reference the repository owns: every error
code the app (and the shipped nginx) can answer is in its error table under the right status, and
every operation of the OpenAPI document is described. Every page (README.md and each docs/*.md):
its links resolve, nothing points outside the repository, and each docs page is in mkdocs.yml's
nav. docs/operations.md's configuration table names every variable the service reads. Fast: reads
files, starts nothing."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from chunksvc import errors
from chunksvc.resources import problems

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOC_PAGES]
MKDOCS = ROOT / "mkdocs.yml"
CONFIG_SOURCES = [ROOT / "chunksvc" / "config.py", ROOT / "gunicorn.conf.py"]
NGINX_ERRORS = ROOT / "deploy" / "nginx" / "snippets" / "chunksvc-proxy.conf"
OPENAPI = json.loads(resources.files("chunksvc").joinpath("openapi.json").read_text("utf-8"))
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}

# A row of a markdown table that starts with a status and a code: | 409 | `parts_missing` | ...
_ERROR_ROW = re.compile(r"^\|\s*(\d{3})\s*\|\s*`([a-z_]+)`\s*\|", re.MULTILINE)
_NGINX_PROBLEM = re.compile(r"""return (\d{3}) '\{[^']*"code":"([a-z_]+)\"""")


def doc_text() -> str:
    return API_DOC.read_text("utf-8")


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section, up to the next ``## ``."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def documented_errors() -> dict[str, set[int]]:
    """``code -> statuses`` from the table under "Error codes"."""
    found: dict[str, set[int]] = {}
    for status, code in _ERROR_ROW.findall(section(doc_text(), "Error codes")):
        found.setdefault(code, set()).add(int(status))
    return found


def status_of_class(cls: type[errors.ChunksvcError]) -> int:
    """The status the app answers for ``cls``: the table entry of its nearest listed ancestor."""
    return next((problems.STATUS[c] for c in cls.__mro__ if c in problems.STATUS), 500)


def domain_error_classes() -> set[type[errors.ChunksvcError]]:
    """Every error class in chunksvc.errors that a request can end with (ConfigError ends start-up)."""
    found, todo = set(), [errors.ChunksvcError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__ == errors.__name__ and cls is not errors.ConfigError}


def app_error_table() -> dict[str, int]:
    """``code -> status`` for everything the app answers, as test_openapi.py enumerates it."""
    table = {cls.code: status for cls, status in problems.STATUS.items()}
    table |= {code: status for status, code in problems._FALCON_CODES.items()}
    table |= {cls.code: status_of_class(cls) for cls in domain_error_classes()}
    table["internal_error"] = 500
    return table


def operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item if method in HTTP_METHODS
    }


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_error_table_is_found_and_parsed():
    documented = documented_errors()
    assert len(documented) >= 25, sorted(documented)


@pytest.mark.parametrize("code, status", sorted(app_error_table().items()))
def test_every_app_error_code_is_in_the_error_table_under_its_status(code, status):
    documented = documented_errors()
    assert code in documented, f"{code} ({status}) is missing from the error table of docs/api.md"
    assert status in documented[code], f"{code} is documented as {sorted(documented[code])}, the app answers {status}"


def test_every_nginx_error_code_is_in_the_error_table_under_its_status():
    shipped = {(int(status), code) for status, code in _NGINX_PROBLEM.findall(NGINX_ERRORS.read_text("utf-8"))}
    assert len(shipped) >= 5, "the nginx snippet's problem bodies were not found"
    documented = documented_errors()
    missing = {(status, code) for status, code in shipped if status not in documented.get(code, set())}
    assert not missing, f"nginx answers these, docs/api.md's error table lacks them: {sorted(missing)}"
    nginx_rows = section(doc_text(), "Errors answered by the nginx proxy")
    absent = {(status, code) for status, code in shipped if f"| {status} | `{code}` |" not in nginx_rows}
    assert not absent, f"missing from the nginx section: {sorted(absent)}"


def test_the_error_table_has_no_code_the_app_or_nginx_never_answers():
    nginx = {code for _, code in _NGINX_PROBLEM.findall(NGINX_ERRORS.read_text("utf-8"))}
    unknown = set(documented_errors()) - set(app_error_table()) - nginx
    assert not unknown, f"codes in docs/api.md that nothing answers: {sorted(unknown)}"


@pytest.mark.parametrize("method, path", sorted(operations()))
def test_every_openapi_operation_is_described(method, path):
    assert f"`{method} {path}`" in doc_text(), f"docs/api.md never describes `{method} {path}`"


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_docs_page_is_found() -> None:
    names = {path.name for path in DOC_PAGES}
    assert {"api.md", "operations.md", "deployment.md", "webhooks.md", "design.md"} <= names, sorted(names)


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_links_inside_each_page_resolve(path: Path) -> None:
    text = path.read_text("utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file, _, fragment = target.partition("#")
        if not file:
            assert fragment in anchors, f"{page_id(path)}: no heading for link {target}"
            continue
        linked = path.parent / file
        assert linked.exists(), f"{page_id(path)}: link to a missing file: {target}"
        if fragment and linked.suffix == ".md":
            there = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", linked.read_text("utf-8"), re.MULTILINE)}
            assert fragment in there, f"{page_id(path)}: {file} has no heading for #{fragment}"


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_docs_point_to_nothing_outside_the_repository(path: Path) -> None:
    text = path.read_text("utf-8")
    for outside in ("../" + "shared", "shared/" + "spec"):  # in pieces, so this file names neither
        assert outside not in text, f"{page_id(path)} refers to {outside}"


def test_every_docs_page_is_in_the_mkdocs_nav() -> None:
    """mkdocs --strict fails on a nav entry for a missing page; this catches the other way round."""
    in_nav = set(re.findall(r"^\s*-\s*[^:]+:\s*(\S+\.md)\s*$", MKDOCS.read_text("utf-8"), re.MULTILINE))
    assert in_nav, "no nav entries found in mkdocs.yml"
    missing = {path.name for path in DOC_PAGES} - in_nav
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {sorted(missing)}"


def test_every_configuration_variable_is_documented() -> None:
    read = set()
    for source in CONFIG_SOURCES:
        read |= set(re.findall(r"[\"'](CHUNKSVC_[A-Z_]+)[\"']", source.read_text("utf-8")))
    assert len(read) >= 20, sorted(read)
    table = section((ROOT / "docs" / "operations.md").read_text("utf-8"), "Configuration")
    missing = {name for name in read if f"`{name}" not in table and f"{name}`" not in table}
    assert not missing, f"read by the service, absent from docs/operations.md's Configuration: {sorted(missing)}"
