"""Uppy in a real Chromium, for tests/test_browser.py: the browser example (docs/examples/browser/)
as a user runs it, driven by playwright-core.

Nothing of it is in this repository: ``prepare`` installs exact versions of ``@uppy/core``,
``@uppy/tus``, ``esbuild`` and ``playwright-core`` with npm into a cache directory outside the tree
(reused by later runs), as ``tools.tus_js`` installs tus-js-client, and writes the driver script
below there. ``bundle`` builds the example's app.js for the browser; ``drive`` runs the driver. The
browser is Debian's Chromium (``/usr/bin/chromium``), not one playwright downloads. Missing node,
npm or Chromium, or a failed install: ``PeerUnavailable`` with a one-line reason (the test prints it
and skips).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tools.peer_tus import PeerUnavailable, _write_atomically, default_cache, npm_install

CHROMIUM = "/usr/bin/chromium"
PACKAGES = {"@uppy/core": "6.3.1", "@uppy/tus": "6.0.0", "esbuild": "0.28.2", "playwright-core": "1.65.2"}
INSTALL_TIMEOUT = 300
# No first-run, sync, update or background traffic: the browser talks only to the two test servers.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The driver: open the page, pick the file, reload once `reloadAfter` PATCHes were answered 204
# (the upload midway, slowed to `throttle` bytes per second so that it is), pick the same file
# again, wait for the page to say the upload is complete, take a screenshot. It prints what the
# page's tus requests were, before and after the reload, as JSON.
DRIVER_SCRIPT = """\
import { chromium } from "playwright-core";

const options = JSON.parse(process.argv[2]);
const context = await chromium.launchPersistentContext(options.profile, {
  executablePath: options.executablePath,
  headless: true,
  args: options.args,
});
const result = { before: [], after: [], console: [] };
let phase = "before";
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (message) => result.console.push(message.text()));
  // By when a request was sent: a PATCH the old page sent just before the reload is its, though
  // its answer may come after.
  const sentIn = new WeakMap();
  page.on("request", (request) => sentIn.set(request, phase));
  page.on("response", (response) => {
    const request = response.request();
    if (!request.url().includes("/tus/")) return;
    result[sentIn.get(request) ?? phase].push({
      method: request.method(),
      status: response.status(),
      requestOffset: request.headers()["upload-offset"] ?? null,
      responseOffset: response.headers()["upload-offset"] ?? null,
      allowOrigin: response.headers()["access-control-allow-origin"] ?? null,
    });
  });
  const cdp = await context.newCDPSession(page);
  const throttle = (bytesPerSecond) =>
    cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: bytesPerSecond,
    });
  await throttle(options.throttle);
  await page.goto(options.pageUrl);
  await page.setInputFiles("#file", options.file);
  const patched = () => result.before.filter((r) => r.method === "PATCH" && r.status === 204).length;
  const deadline = Date.now() + options.timeoutMs;
  while (patched() < options.reloadAfter) {
    if (Date.now() > deadline) throw new Error("the upload made no progress before the reload");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  result.progressBeforeReload = await page.locator("#progress").evaluate((bar) => bar.value);
  phase = "after";
  await throttle(-1);
  await page.reload();
  await page.setInputFiles("#file", options.file);
  await page.waitForSelector("#status.done", { timeout: options.timeoutMs });
  result.status = await page.locator("#status").textContent();
  await page.screenshot({ path: options.screenshot, fullPage: true });
} finally {
  await context.close();
  console.log(JSON.stringify(result));
}
"""

BUNDLE_SCRIPT = """\
import * as esbuild from "esbuild";
import * as path from "node:path";

const [entry, outfile] = process.argv.slice(2);
await esbuild.build({
  entryPoints: [entry],
  outfile,
  bundle: true,
  format: "esm",
  minify: true,
  // The example's imports are resolved from this cache, not from beside the example.
  nodePaths: [path.join(process.cwd(), "node_modules")],
  logLevel: "error",
});
"""


def prepare(cache: Path | None = None) -> Path:
    """The directory holding the packages and the scripts (installed now unless a finished install
    is there); ``PeerUnavailable`` when it cannot be."""
    if not os.access(CHROMIUM, os.X_OK):
        raise PeerUnavailable(f"{CHROMIUM} not found (apt-get install chromium)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise PeerUnavailable("node or npm not found on PATH (Uppy and playwright-core need both)")
    tag = "-".join(f"{name.replace('/', '_').lstrip('@')}-{version}" for name, version in sorted(PACKAGES.items()))
    directory = (cache or default_cache()) / f"browser-{tag}"
    if not (directory / ".installed").is_file():
        _install(npm, directory)
    _write_atomically(directory / "drive.mjs", DRIVER_SCRIPT)
    _write_atomically(directory / "bundle.mjs", BUNDLE_SCRIPT)
    return directory


def _install(npm: str, directory: Path) -> None:
    manifest = {"name": "chunksvc-test-browser", "private": True, "type": "module", "dependencies": PACKAGES}
    # esbuild's binary comes as an optional dependency (scripts stay off); playwright-core's own
    # browsers are not wanted: Debian's Chromium is used.
    npm_install(npm, directory, manifest, env={"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})


def bundle(directory: Path, entry: Path, outfile: Path) -> None:
    """``entry`` (the example's app.js) and the Uppy it imports as one browser script."""
    done = subprocess.run(
        ["node", str(directory / "bundle.mjs"), str(entry), str(outfile)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"esbuild failed: {done.stderr.strip()[-2000:]}"


def drive(directory: Path, options: dict[str, object], timeout: float = 180) -> dict[str, object]:
    """Run the driver with ``options`` (pageUrl, file, screenshot, profile, throttle, reloadAfter,
    timeoutMs); what it saw. ``AssertionError`` with its output when it fails."""
    given = {"executablePath": CHROMIUM, "args": CHROMIUM_ARGS, **options}
    done = subprocess.run(
        ["node", str(directory / "drive.mjs"), json.dumps(given)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"the browser driver failed: {done.stderr.strip()[-3000:]} {lines[-1:]}"
    seen: dict[str, object] = json.loads(lines[-1])
    return seen
