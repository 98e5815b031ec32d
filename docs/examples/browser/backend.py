"""The example's backend: serves the page, and for each file the page picks creates a chunksvc
session with its API key and mints an upload token for it. The browser gets the session's tus URL
and the token, never the key.

    CHUNKSVC_URL=https://uploads.example.com CHUNKSVC_API_KEY=csk_... EXAMPLE_PORT=8080 \\
    EXAMPLE_BUNDLE=bundle.js python backend.py
"""

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SERVICE = os.environ["CHUNKSVC_URL"].rstrip("/")
API_KEY = os.environ["CHUNKSVC_API_KEY"]  # stays here: the page never sees it
HERE = Path(__file__).parent
BUNDLE = Path(os.environ.get("EXAMPLE_BUNDLE", HERE / "bundle.js"))  # app.js bundled by esbuild


def chunksvc(path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        SERVICE + path,
        data=json.dumps(body).encode() if body is not None else b"",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        files = {"/": (HERE / "index.html", "text/html"), "/app.js": (BUNDLE, "text/javascript")}
        if self.path not in files:
            return self.answer(404, b"not found", "text/plain")
        path, kind = files[self.path]
        self.answer(200, path.read_bytes(), kind)

    def do_POST(self) -> None:
        if self.path != "/start":
            return self.answer(404, b"not found", "text/plain")
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        wanted = {"filename": asked["filename"], "size": asked["size"]}
        if asked.get("content_type"):
            wanted["content_type"] = asked["content_type"]
        try:
            session = chunksvc("/uploads/sessions", wanted)
            token = chunksvc(f"/uploads/sessions/{session['id']}/tokens")
        except urllib.error.HTTPError as refused:  # chunksvc's problem document, passed on
            return self.answer(refused.code, refused.read(), "application/problem+json")
        started = {"session_id": session["id"], "upload_url": f"{SERVICE}/tus/{session['id']}", **token}
        self.answer(201, json.dumps(started).encode(), "application/json")

    def answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("EXAMPLE_PORT", "8080"))), Handler).serve_forever()
