"""The browser example (docs/examples/browser/) as it ships, in Debian's Chromium: a page on one
loopback origin uses Uppy (@uppy/core + @uppy/tus) to upload to chunksvc on another, with an upload
token its backend minted; the page is reloaded midway and the upload resumes where the service
says it stands; the finished page is photographed and the object's SHA-256 checked.

Real everything: gunicorn with CORS for the page's origin, the example's own backend.py, Uppy
bundled by esbuild, Chromium driven by playwright-core (tools/browser.py installs the npm packages
into a cache outside the tree). Skipped, saying why, only where Chromium, node or npm is missing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunksvc.config import StorageSpec
from tests.helpers import payload, sha
from tests.peers import prepared_or_skipped
from tools import browser, harness

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "browser"
SIZE = 3 * 1024 * 1024 + 4321  # 13 of the page's 256 KiB chunks, the last one short
PART = 1024 * 1024  # the sessions' parts: the chunks fill them four at a time


@pytest.fixture(scope="module")
def tools_dir() -> Path:
    return prepared_or_skipped(browser.prepare, "browser test")


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the example backend exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def test_uppy_in_chromium_uploads_with_a_token_resumes_after_a_reload_and_finishes(
    gunicorn_server, tmp_path, tools_dir
):
    page_port = harness.free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    bundle = tmp_path / "bundle.js"
    browser.bundle(tools_dir, EXAMPLE / "app.js", bundle)
    data = payload(SIZE, seed=21)
    picked = tmp_path / "holiday.bin"
    picked.write_bytes(data)
    screenshot = tmp_path / "finished.png"

    env = {
        "CHUNKSVC_WORKERS": "2",
        "CHUNKSVC_MIN_PART_SIZE": "1",
        "CHUNKSVC_DEFAULT_PART_SIZE": str(PART),
        "CHUNKSVC_ACCESS_LOG": "/dev/null",
        "CHUNKSVC_CORS_ORIGINS": page_origin,  # the page is served from another port: another origin
    }
    with gunicorn_server(
        StorageSpec(kind="file", root=tmp_path / "storage"), env, name="browser", client="portal"
    ) as served:
        server, key = served.server, served.key
        backend = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "backend.py")],
            env={
                **os.environ,
                "CHUNKSVC_URL": server.url,
                "CHUNKSVC_API_KEY": key,
                "EXAMPLE_PORT": str(page_port),
                "EXAMPLE_BUNDLE": str(bundle),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_port(page_port, backend)
            seen = browser.drive(
                tools_dir,
                {
                    "pageUrl": f"{page_origin}/",
                    "file": str(picked),
                    "screenshot": str(screenshot),
                    "profile": str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
                    "throttle": 1024 * 1024,  # bytes/s up: about 3 s for the file, so a reload lands midway
                    "reloadAfter": 2,
                    "timeoutMs": 60_000,
                },
            )
        finally:
            backend.terminate()
            backend.wait(timeout=10)
        print(f"screenshot of the finished page: {screenshot}")

        status, _, body = server.request("GET", "/uploads/sessions", headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        sessions = json.loads(body)["sessions"]

    assert seen["status"].startswith("upload complete: holiday.bin"), seen
    before, after = seen["before"], seen["after"]
    # Before the reload: the token's HEAD (offset 0) and PATCHes, none reaching the end.
    assert before[0]["method"] == "HEAD" and before[0]["responseOffset"] == "0", before
    cut = max(int(r["responseOffset"]) for r in before if r["method"] == "PATCH" and r["status"] == 204)
    assert 0 < cut < SIZE
    # After it: the new page asks where the upload stands and goes on from there, not from 0: at
    # least the two chunks acknowledged before the reload (a PATCH cut off by it keeps what arrived).
    assert after[0]["method"] == "HEAD" and after[0]["status"] == 200, after
    resumed_at = int(after[0]["responseOffset"])
    assert 2 * 256 * 1024 <= resumed_at < SIZE
    print(f"reloaded with {cut} bytes acknowledged; the new page resumed from {resumed_at} of {SIZE}")
    patches = [r for r in after if r["method"] == "PATCH"]
    assert patches[0]["requestOffset"] == str(resumed_at)
    assert patches[-1]["status"] == 204 and patches[-1]["responseOffset"] == str(SIZE)
    # Every answer was readable by the page (CORS): the Upload-Offset above is what it read.
    assert {r["allowOrigin"] for r in before + after} == {page_origin}
    # The page never created an upload: the backend did, once; the token only drove it.
    assert not [r for r in before + after if r["method"] == "POST"]
    assert len(sessions) == 1, sessions
    (session,) = sessions
    assert session["status"] == "COMPLETED" and session["filename"] == "holiday.bin"
    assert session["object"]["size"] == SIZE and session["object"]["sha256"] == sha(data)
    with (tmp_path / "storage" / session["object"]["key"]).open("rb") as stored:
        assert sha(stored.read()) == sha(data)
    shot = screenshot.read_bytes()
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 2000
