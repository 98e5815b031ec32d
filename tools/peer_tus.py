"""tus-node-server as the bench's peer (``python -m tools.bench --peer tus``).

Nothing of the peer is in this repository: ``prepare`` installs ``@tus/server`` and
``@tus/file-store`` (exact versions, below) with npm into a scratch directory outside the tree
(reused by later runs) and writes a small server script there; ``serve`` starts that script as one
Node process on a loopback port with a ``FileStore`` on a directory the bench chooses (on the same
filesystem as chunksvc's storage); ``TusClient`` is the tus counterpart of ``tools.client.Client``
(one keep-alive ``http.client`` connection, bodies sent from memory).

When Node or npm is missing, too old, or the install fails, ``prepare`` raises ``PeerUnavailable``
with a one-line reason, and the bench prints it and goes on without the peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

# tus-node-server 2.x, as measured in issue 13; its dependencies that matter for speed are pinned
# too (npm "overrides"), so that two runs months apart measure the same peer.
TUS_SERVER = "2.4.5"
TUS_FILE_STORE = "2.1.1"
OVERRIDES = {"@tus/utils": "0.7.1", "srvx": "0.11.22"}
NODE_MINIMUM = (20, 19)  # the "engines" of both packages
TUS_RESUMABLE = "1.0.0"
INSTALL_TIMEOUT = 300

# One process, no cluster: the server of tus-node-server's README with a FileStore. It prints its
# port once it listens (port 0: the kernel picks a free one, no race with other benches).
SERVER_SCRIPT = """\
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const server = new Server({
  path: "/files",
  datastore: new FileStore({ directory: process.env.TUS_DIRECTORY }),
});
const listener = server.listen({ host: "127.0.0.1", port: 0 }, () => {
  console.log(listener.address().port);
});
process.on("SIGTERM", () => listener.close(() => process.exit(0)));
"""


class PeerUnavailable(Exception):
    """The peer cannot run here; ``str()`` is the one-line reason."""


@dataclasses.dataclass(frozen=True)
class Installation:
    directory: Path
    node: str
    node_version: str
    versions: dict[str, str]  # package name -> installed version

    @property
    def script(self) -> Path:
        return self.directory / "server.mjs"

    def describe(self) -> str:
        packages = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        return f"tus-node-server ({packages}) on Node {self.node_version}, one process"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chunksvc-bench"


def package_json() -> dict[str, object]:
    return {
        "name": "chunksvc-bench-tus",
        "private": True,
        "description": "tus-node-server for chunksvc's bench (tools/peer_tus.py); safe to delete",
        "dependencies": {"@tus/server": TUS_SERVER, "@tus/file-store": TUS_FILE_STORE},
        "overrides": OVERRIDES,
    }


def parse_node_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of ``node --version`` output such as ``v20.20.2``."""
    numbers = text.strip().lstrip("v").split(".")
    try:
        return int(numbers[0]), int(numbers[1])
    except (IndexError, ValueError):
        raise PeerUnavailable(f"cannot read the Node version from {text.strip()!r}") from None


def prepare(cache: Path | None = None, which: Callable[[str], str | None] | None = None) -> Installation:
    """The installed peer under ``cache`` (installed now unless a finished install is there);
    ``PeerUnavailable`` when it cannot be. ``which`` finds a program (default: on PATH)."""
    which = which or shutil.which
    node, npm = which("node"), which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        raise PeerUnavailable(f"{missing} not found on PATH (tus-node-server needs Node >= 20.19 and npm)")
    try:
        node_version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerUnavailable(f"`node --version` failed: {exc}") from None
    if parse_node_version(node_version) < NODE_MINIMUM:
        raise PeerUnavailable(f"Node {node_version} is older than tus-node-server {TUS_SERVER} needs (20.19)")

    cache = cache or default_cache()
    directory = cache / f"tus-server-{TUS_SERVER}-file-store-{TUS_FILE_STORE}"
    if not (directory / ".installed").is_file():
        _install(npm, directory)
    _write_atomically(directory / "server.mjs", SERVER_SCRIPT)
    versions = {}
    for name in ("@tus/server", "@tus/file-store", *OVERRIDES):
        manifest = directory / "node_modules" / name / "package.json"
        try:
            versions[name] = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            raise PeerUnavailable(f"{manifest} is missing or unreadable; delete {directory} to reinstall") from None
    return Installation(directory, node, node_version, versions)


def _install(npm: str, directory: Path) -> None:
    npm_install(npm, directory, package_json())


def npm_install(npm: str, directory: Path, manifest: dict[str, object], env: dict[str, str] | None = None) -> None:
    """npm install of ``manifest`` into a directory of its own, renamed into place when it is
    complete: a failed or concurrent install never leaves a half-made ``directory``. The one
    install of every Node peer the tests and benches use (tus-node-server, tus-js-client, the
    browser's Uppy and playwright-core); ``env`` adds to npm's environment."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    except OSError as exc:
        raise PeerUnavailable(f"cannot create {directory.parent}: {exc}") from None
    try:
        (staging / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        command = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--omit=dev", "--loglevel=error"]
        npm_env = {**os.environ, "npm_config_update_notifier": "false", **(env or {})}
        try:
            done = subprocess.run(
                command, cwd=staging, env=npm_env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"npm install did not finish in {INSTALL_TIMEOUT} s") from None
        except OSError as exc:
            raise PeerUnavailable(f"npm install could not run: {exc}") from None
        if done.returncode != 0:
            detail = npm_error(done.stderr or done.stdout)
            raise PeerUnavailable(f"npm install failed (exit {done.returncode}): {detail}")
        (staging / ".installed").write_text("")
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / ".installed").is_file():  # not another run's complete install
                raise PeerUnavailable(f"cannot move the install into {directory}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def npm_error(output: str) -> str:
    """One line from npm's error output: its code and first message, e.g. ``ENOTFOUND: request to
    https://registry.npmjs.org/... failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org``."""
    code, message = "", ""
    for raw in output.splitlines():
        line = raw.strip()
        for prefix in ("npm error ", "npm ERR! "):
            line = line.removeprefix(prefix)
        word, _, rest = line.partition(" ")
        if word == "code" and not code:
            code = rest.strip()
        elif line and word not in ("code", "syscall", "errno", "npm") and not message:
            message = line
    return (f"{code}: {message}" if code and message else code or message or "no message")[:240]


def _write_atomically(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(text)
    temporary.replace(path)


@dataclasses.dataclass
class TusServer:
    process: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve(installation: Installation, store: Path, timeout: float = 30) -> Iterator[TusServer]:
    """The peer's server (one Node process) with its FileStore in ``store``, until the block ends.
    ``PeerUnavailable`` when it does not start."""
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [installation.node, str(installation.script)],
            cwd=installation.directory,
            env={**os.environ, "TUS_DIRECTORY": str(store), "NODE_ENV": "production"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert process.stdout is not None
            port = _read_port(process, timeout)
            if port is None:
                process.kill()
                process.wait()
                stderr.seek(0)
                lines = [line for line in stderr.read().splitlines() if line.strip()]
                raise PeerUnavailable(
                    f"the tus server did not start (exit {process.returncode}): {lines[-1][:200] if lines else ''}"
                )
            yield TusServer(process, port)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _read_port(process: subprocess.Popen[str], timeout: float) -> int | None:
    """The port the script prints, or None if it exits or says nothing within ``timeout``."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    line = process.stdout.readline().strip()
    return int(line) if line.isdigit() else None


class TusError(Exception):
    pass


class TusClient:
    """One persistent connection to a tus server: creation (POST with Upload-Length), PATCH at
    Upload-Offset, termination (DELETE) — the same minimal client as ``tools.client.Client``."""

    def __init__(self, base_url: str, path: str = "/files", timeout: float = 300) -> None:
        parts = urlsplit(base_url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        self._path = path

    def close(self) -> None:
        self._conn.close()

    def _request(
        self, method: str, path: str, body: memoryview | None = None, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        if self._conn.sock is None:
            self._conn.connect()
            sock = cast(socket.socket, self._conn.sock)  # connect() opened it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.request(method, path, body=body, headers={"Tus-Resumable": TUS_RESUMABLE, **(headers or {})})
        response = self._conn.getresponse()
        data = response.read()
        if not 200 <= response.status < 300:
            raise TusError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return response

    def options(self) -> None:
        self._request("OPTIONS", self._path)

    def create(self, length: int) -> str:
        """A new upload of ``length`` bytes; its path."""
        response = self._request("POST", self._path, headers={"Upload-Length": str(length), "Content-Length": "0"})
        location = response.getheader("Location")
        if not location:
            raise TusError("POST: no Location in the answer")
        return urlsplit(location).path

    def patch(self, upload: str, offset: int, data: bytes | memoryview) -> int:
        """Append ``data`` at ``offset``; the new offset the server answers."""
        body = data if isinstance(data, memoryview) else memoryview(data)
        headers = {
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(len(body)),
        }
        response = self._request("PATCH", upload, body, headers)
        return int(response.getheader("Upload-Offset") or -1)

    def delete(self, upload: str) -> None:
        self._request("DELETE", upload)
