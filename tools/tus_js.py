"""tus-js-client under Node, for tests/test_tus.py: the tus client browsers and Uppy use.

Nothing of it is in this repository: ``prepare`` installs ``tus-js-client`` (an exact 4.x version)
with npm into a cache directory outside the tree (reused by later runs), as ``tools.peer_tus``
installs tus-node-server, and writes the small upload script below there. ``upload`` runs it on one
file. When Node or npm is missing or the install fails, ``prepare`` raises ``PeerUnavailable``
with a one-line reason (the tests print it and skip).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tools.peer_tus import PeerUnavailable, _write_atomically, default_cache, npm_install

TUS_JS_CLIENT = "4.3.1"
INSTALL_TIMEOUT = 300

# One upload of a file (read whole: the tests' files are small) with the options given as JSON in
# argv[2]; prints {"url": ...} once tus-js-client calls onSuccess, or exits 1 with its error.
UPLOAD_SCRIPT = """\
import * as fs from "node:fs";
import * as tus from "tus-js-client";

const [path, optionsJson] = process.argv.slice(2);
const given = JSON.parse(optionsJson);
const upload = new tus.Upload(fs.readFileSync(path), {
  ...given,
  retryDelays: [0, 200, 500, 1000],
  onSuccess: () => {
    console.log(JSON.stringify({ url: upload.url }));
  },
  onError: (error) => {
    console.error(String(error));
    process.exit(1);
  },
});
upload.start();
"""


def prepare(cache: Path | None = None) -> Path:
    """The directory holding tus-js-client and ``upload.mjs`` (installed now unless a finished
    install is there); ``PeerUnavailable`` when it cannot be."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise PeerUnavailable("node or npm not found on PATH (tus-js-client needs both)")
    directory = (cache or default_cache()) / f"tus-js-client-{TUS_JS_CLIENT}"
    if not (directory / ".installed").is_file():
        _install(npm, directory)
    _write_atomically(directory / "upload.mjs", UPLOAD_SCRIPT)
    return directory


def _install(npm: str, directory: Path) -> None:
    manifest = {"name": "chunksvc-test-tus-js", "private": True, "type": "module"}
    npm_install(npm, directory, {**manifest, "dependencies": {"tus-js-client": TUS_JS_CLIENT}})


def upload(directory: Path, path: Path, options: dict[str, object], timeout: float = 120) -> str:
    """Upload ``path`` with tus-js-client ``options`` (endpoint, headers, chunkSize, ...); the
    upload's URL. ``AssertionError`` with the client's error when it fails."""
    done = subprocess.run(
        ["node", str(directory / "upload.mjs"), str(path), json.dumps(options)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"tus-js-client failed: {done.stderr.strip()[-2000:]}"
    url: str = json.loads(done.stdout.strip().splitlines()[-1])["url"]
    return url
