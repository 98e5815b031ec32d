"""Run the shipped nginx configuration (``deploy/nginx/``) in front of a test or bench server.

The files are used as shipped, but for the values every deployment sets for itself: listen
addresses, the upstream's address, certificate and log paths, and ``client_max_body_size`` (which
must equal the server's ``CHUNKSVC_MAX_PART_SIZE``). Each such value is replaced where the shipped
file has it, and a replacement that finds nothing fails: the files cannot drift from what is tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from tools.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "nginx"

# What the shipped files say, which each deployment (and the harness) sets for itself.
UPSTREAM = "server 127.0.0.1:8000;"
HTTP_LISTEN = "listen 80;\n    listen [::]:80;"
TLS_LISTEN = "listen 443 ssl;\n    listen [::]:443 ssl;"
CERTIFICATE = "/etc/ssl/chunksvc/fullchain.pem"
CERTIFICATE_KEY = "/etc/ssl/chunksvc/privkey.pem"
ACCESS_LOG = "/var/log/nginx/chunksvc.access.log"
BODY_LIMIT = "client_max_body_size 5g;"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )


def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for a day: ``(cert, key)``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _replace(text: str, old: str, new: str, name: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"deploy/nginx/{name} no longer has exactly one {old!r}: update tools.nginx")
    return text.replace(old, new)


@dataclasses.dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    directory: Path
    http_port: int
    tls_port: int
    certificate: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "logs" / "chunksvc.access.log"


@contextlib.contextmanager
def nginx(
    directory: Path,
    upstream_port: int,
    *,
    max_part_size: int,
    overrides: Mapping[str, str] | None = None,
    worker_processes: int = 1,
) -> Iterator[Nginx]:
    """nginx with ``deploy/nginx/`` under ``directory``, HTTP and TLS on free loopback ports, in front
    of gunicorn on ``upstream_port``; stopped (and waited for) on the way out.

    ``overrides`` replaces further settings of the proxy snippet (``{"proxy_read_timeout 120s;":
    "proxy_read_timeout 2s;"}``), for tests that cannot wait for the shipped timeouts.
    """
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("conf.d", "snippets", "sites", "logs", "temp"):
        (directory / sub).mkdir(exist_ok=True)
    http_port, tls_port = free_port(), free_port()
    cert, key = throwaway_certificate(directory)

    def install(name: str, *replacements: tuple[str, str]) -> None:
        text = (SHIPPED / name).read_text()
        for old, new in replacements:
            text = _replace(text, old, new, name)
        (directory / name).write_text(text)

    install("conf.d/chunksvc.conf", (UPSTREAM, f"server 127.0.0.1:{upstream_port};"))
    install(
        "snippets/chunksvc-proxy.conf",
        (ACCESS_LOG, str(directory / "logs" / "chunksvc.access.log")),
        (BODY_LIMIT, f"client_max_body_size {max_part_size};"),
        *(overrides or {}).items(),
    )
    install("sites/chunksvc-http.conf", (HTTP_LISTEN, f"listen 127.0.0.1:{http_port};"))
    install(
        "sites/chunksvc-tls.conf",
        (TLS_LISTEN, f"listen 127.0.0.1:{tls_port} ssl;"),
        (CERTIFICATE, str(cert)),
        (CERTIFICATE_KEY, str(key)),
    )
    temp = directory / "temp"
    # The top level a distribution's nginx.conf provides; the shipped files go in as they would there.
    (directory / "nginx.conf").write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes {worker_processes};
pid {directory / "nginx.pid"};
error_log {directory / "logs" / "error.log"} info;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    include conf.d/*.conf;
    include sites/*.conf;
}}
""")
    log = open(directory / "logs" / "stderr.log", "w+b")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        _wait_for_ports(process, (http_port, tls_port), log)
        yield Nginx(process, directory, http_port, tls_port, cert)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for_ports(process: subprocess.Popen[bytes], ports: tuple[int, ...], log: BinaryIO) -> None:
    deadline = time.monotonic() + 20
    pending = list(ports)
    while pending:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            log.seek(0)
            raise RuntimeError(f"nginx did not start:\n{log.read().decode(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", pending[0]), timeout=1):
            pending.pop(0)
            continue
        time.sleep(0.05)
