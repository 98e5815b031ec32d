"""Run a throwaway single-node Ceph with its S3 gateway (Debian's ``radosgw``, ``ceph-mon``,
``ceph-osd``) on loopback, for tests and benches: a real S3 server, stricter than moto.

One monitor, one OSD (bluestore on a sparse file by default; ``memstore`` on request, which keeps
every byte in RAM) and radosgw with the beast frontend on a free loopback port, all under a
temporary directory that is removed on the way out; a user with fixed keys. No manager daemon:
nothing here needs one.

What it took (each cost time to find):

- ``auth_*_required = none`` (no keyrings to make) requires every ``ms_*_mode`` to be ``crc``:
  with the default ``secure`` radosgw hangs on ``get_initial_auth_request returned -13``.
- The monitor's paxos waits (``paxos propose interval``, ``paxos min wait``) are cut to
  milliseconds, and radosgw's seven pools are created up front in one ``ceph`` CLI session: each
  pool radosgw creates itself costs it a few seconds. Start-up falls from 12-18 s to a few.
- One OSD holds every replica: ``osd pool default size = 1`` and ``mon allow pool size one``.
- Memory is kept small (the machine runs tests beside it): small bluestore cache and OSD memory
  target, few radosgw threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tools import harness
from tools.harness import free_port

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
PACKAGES = "radosgw ceph-mon ceph-osd"

# The pools radosgw would otherwise create one by one on its first requests (the default zone).
RGW_POOLS = (
    ".rgw.root",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.log",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
)

START_TIMEOUT = 90.0  # seconds for the whole start-up; a slow, shared machine may need tens
# The one OSD's bluestore file, sparse (only what is written takes disk): the suite's, and the
# benches', which hold a 10 GiB object next to a peer's while radosgw's garbage is collected.
OSD_GIB = 20
BENCH_OSD_GIB = 48


def missing_binaries() -> list[str]:
    """The Ceph programs this harness needs that are not installed (empty when all are)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def version() -> str:
    """``ceph version 16.2.15 (...) pacific (stable)``, say, or ``not installed``."""
    if shutil.which("radosgw") is None:
        return "not installed"
    result = subprocess.run(["radosgw", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or result.stderr.strip()


@dataclasses.dataclass
class Radosgw:
    """A running cluster: radosgw's S3 endpoint ``127.0.0.1:PORT`` and the user's keys."""

    directory: Path
    port: int
    access_key: str
    secret_key: str
    processes: dict[str, subprocess.Popen[bytes]]
    started_in: float  # seconds from nothing to serving S3

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def gateway(self) -> subprocess.Popen[bytes]:
        """The radosgw process (a test may kill it; the cluster below it stays up)."""
        return self.processes["radosgw"]

    def admin(self, *arguments: str, timeout: float = 30.0) -> str:
        """``radosgw-admin ARGUMENTS`` against this cluster (e.g. ``quota set``); its stdout.
        Fails with its output."""
        result = subprocess.run(
            ["radosgw-admin", *arguments, "-c", str(self.directory / "ceph.conf")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"radosgw-admin {' '.join(arguments)} failed ({result.returncode}): {result.stderr[-2000:]}"
            )
        return result.stdout


class _Cluster:
    """Runs the commands and daemons of one cluster under ``directory``, logs there too."""

    def __init__(self, directory: Path, deadline: float) -> None:
        self.directory = directory
        self.deadline = deadline
        self.conf = directory / "ceph.conf"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}
        self.helpers: list[subprocess.Popen[str]] = []  # commands run in the background

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"radosgw harness: start-up took longer than {START_TIMEOUT:.0f} s")
        return left

    def run(self, *command: str, stdin: str | None = None) -> str:
        """A Ceph command against this cluster; its stdout. Fails with its output."""
        try:
            result = subprocess.run(
                [*command, "-c", str(self.conf)],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.remaining(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"radosgw harness: {' '.join(command)} did not finish in time") from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"radosgw harness: {' '.join(command)} failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result.stdout

    def background(self, *command: str) -> tuple[list[str], subprocess.Popen[str]]:
        """A Ceph command started now, finished by ``finish``."""
        process = subprocess.Popen(
            [*command, "-c", str(self.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.helpers.append(process)
        return list(command), process

    def finish(self, started: tuple[list[str], subprocess.Popen[str]]) -> None:
        command, process = started
        try:
            output, _ = process.communicate(timeout=self.remaining())
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"radosgw harness: {' '.join(command)} did not finish in time") from exc
        if process.returncode != 0:
            raise RuntimeError(f"radosgw harness: {' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")

    def spawn(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        """A daemon in the foreground (``-f``), its stderr to ``<name>.stderr``."""
        log = open(self.directory / f"{name}.stderr", "w+b")  # noqa: SIM115 - closed in stop()
        self.logs[name] = log
        process = subprocess.Popen(
            [*command, "-f", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C in the terminal reaches us, and we stop them in order
        )
        self.processes[name] = process
        return process

    def log_tail(self) -> str:
        """The end of every daemon's stderr and log file, for a failure's message."""
        parts = []
        for path in sorted(self.directory.glob("*.stderr")) + sorted((self.directory / "log").glob("*.log")):
            text = path.read_text(errors="replace")[-1500:]
            parts.append(f"--- {path.name}:\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """radosgw, then the OSD, then the monitor: SIGTERM, killed if still there after 10 s."""
        for helper in self.helpers:
            if helper.poll() is None:
                helper.kill()
            helper.communicate()
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log in self.logs.values():
            log.close()


def _config(directory: Path, fsid: str, mon_port: int, rgw_port: int, objectstore: str, osd_gib: int) -> str:
    osd = directory / "osd"
    settings = {
        "fsid": fsid,
        "mon host": f"v2:127.0.0.1:{mon_port}",
        "mon initial members": "a",
        "public network": "127.0.0.0/8",
        "ms bind ipv4": "true",
        "ms bind ipv6": "false",
        "ms bind msgr1": "false",
        # No keyrings: loopback only, throwaway data. Then every mode must be crc (see above).
        "auth cluster required": "none",
        "auth service required": "none",
        "auth client required": "none",
        **{
            f"ms {who} mode": "crc"
            for who in ("cluster", "service", "client", "mon cluster", "mon service", "mon client")
        },
        "run dir": str(directory / "run"),
        "admin socket": str(directory / "run" / "$name.asok"),
        "log file": str(directory / "log" / "$name.log"),
        "debug ms": "0",
        "debug rgw": os.environ.get("RGW_DEBUG", "1"),
        "mon data": str(directory / "mon"),
        "paxos propose interval": "0.05",
        "paxos min wait": "0.01",
        "mon allow pool size one": "true",
        "mon allow pool delete": "true",
        "mon warn on pool no redundancy": "false",
        "mon max pg per osd": "1000",
        "osd pool default size": "1",
        "osd pool default min size": "1",
        "osd pool default pg num": "8",
        "osd pool default pgp num": "8",
        "osd pool default pg autoscale mode": "off",
        "osd data": str(osd),
        "osd objectstore": objectstore,
        "osd crush chooseleaf type": "0",  # one host
        "osd op num shards": "1",
        "osd op num threads per shard": "2",
        "osd memory target": str(512 << 20),
        "bluestore block path": str(directory / "osd.block"),  # osd/block becomes a link to it
        "bluestore block create": "true",
        "bluestore block size": str(osd_gib << 30),  # sparse: only what is written takes disk
        "bluestore cache autotune": "false",
        "bluestore cache size": str(64 << 20),
        "bluestore fsck on mount": "false",
        "bluestore fsck on mkfs": "false",
        # A client that met the OSD down (radosgw starts as it boots) retries on this tick: 5 s.
        "objecter tick interval": "0.2",
        "rgw frontends": f"beast endpoint=127.0.0.1:{rgw_port}",
        "rgw thread pool size": "32",
        "rgw dns name": "127.0.0.1",
        "rgw enable usage log": "false",
        # radosgw's background threads: its garbage collector frees deleted data two hours later
        # (never, in a throwaway cluster), and the lifecycle thread's 5 s sleeps hold up shutdown.
        "rgw enable gc threads": "false",
        "rgw enable lc threads": "false",
        "rgw enable quota threads": "false",
    }
    return "[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())


def _wait_for_s3(cluster: _Cluster, port: int) -> None:
    import http.client

    while True:
        process = cluster.processes["radosgw"]
        if process.poll() is not None:
            raise RuntimeError(f"radosgw harness: radosgw exited ({process.returncode})")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/")
                if conn.getresponse().status in (200, 403):
                    return
            finally:
                conn.close()
        cluster.remaining()
        time.sleep(0.05)


def _start(cluster: _Cluster, access_key: str, secret_key: str, objectstore: str, osd_gib: int) -> int:
    directory = cluster.directory
    for sub in ("run", "log", "mon", "osd"):
        (directory / sub).mkdir()
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = free_port(), free_port()
    cluster.conf.write_text(_config(directory, fsid, mon_port, rgw_port, objectstore, osd_gib))
    monmap = str(directory / "monmap")
    cluster.run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", monmap)
    cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
    # The OSD's store is made while the monitor starts (it needs none: --no-mon-config).
    osd_mkfs = cluster.background("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config")
    cluster.spawn("mon", "ceph-mon", "-i", "a")
    cluster.run("ceph", "osd", "new", osd_uuid, "0")
    cluster.finish(osd_mkfs)
    cluster.spawn("osd", "ceph-osd", "-i", "0")
    # One CLI session (commands on stdin) for every pool: one connection to the monitor, not seven.
    commands = "".join(f"osd pool create {pool} 8 8\nosd pool application enable {pool} rgw\n" for pool in RGW_POOLS)
    cluster.run("ceph", stdin=commands)
    cluster.spawn("radosgw", "radosgw", "-n", "client.rgw")
    _wait_for_s3(cluster, rgw_port)
    cluster.run(
        "radosgw-admin",
        "user",
        "create",
        "--uid",
        "chunksvc",
        "--display-name",
        "chunksvc tests",
        "--access-key",
        access_key,
        "--secret",
        secret_key,
    )
    return rgw_port


@contextlib.contextmanager
def radosgw(
    access_key: str,
    secret_key: str,
    *,
    objectstore: str = "bluestore",
    osd_gib: int = OSD_GIB,
    directory: Path | None = None,
    start_timeout: float = START_TIMEOUT,
) -> Iterator[Radosgw]:
    """A single-node Ceph with radosgw serving S3 on a free loopback port, and a user with
    ``access_key``/``secret_key``; everything stopped and removed on the way out.

    ``objectstore`` is ``bluestore`` (a sparse file on disk: long suites) or ``memstore`` (RAM:
    every byte stored stays in memory until the end); ``osd_gib`` is the bluestore file's size.
    If it does not serve within ``start_timeout`` seconds, or a step fails, every daemon is
    killed and the error carries the end of their logs."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed (apt-get install --no-install-recommends {PACKAGES})")
    with contextlib.ExitStack() as stack:
        work = directory or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chunksvc-radosgw-")))
        begun = time.monotonic()
        cluster = _Cluster(work, begun + start_timeout)
        stack.callback(cluster.stop)
        try:
            port = _start(cluster, access_key, secret_key, objectstore, osd_gib)
        except Exception as exc:
            for process in cluster.processes.values():
                if process.poll() is None:
                    process.kill()
            raise RuntimeError(f"{exc}\n{cluster.log_tail()}") from exc
        yield Radosgw(work, port, access_key, secret_key, cluster.processes, time.monotonic() - begun)


@contextlib.contextmanager
def bench_s3() -> Iterator[tuple[str, str]]:
    """The benches' S3 server, with ``tools.harness``'s keys: radosgw, or moto (in a child
    process) if Ceph is not installed, which is printed. Yields ``(endpoint, what it is)``."""
    missing = missing_binaries()
    if missing:
        print(f"S3: moto, not radosgw: {', '.join(missing)} not installed (apt-get install {PACKAGES})")
        with harness.moto_s3() as endpoint:
            yield endpoint, "moto"
        return
    with radosgw(harness.S3_ACCESS_KEY, harness.S3_SECRET_KEY, osd_gib=BENCH_OSD_GIB) as gateway:
        name = f"radosgw {version().split()[2]}"
        print(f"S3: {name} (bluestore, one OSD), started in {gateway.started_in:.1f} s")
        _BENCH_GATEWAYS[gateway.endpoint] = gateway
        try:
            yield gateway.endpoint, name
        finally:
            del _BENCH_GATEWAYS[gateway.endpoint]


_BENCH_GATEWAYS: dict[str, Radosgw] = {}


def free_deleted(endpoint: str) -> None:
    """Frees now what was deleted on the bench's radosgw at ``endpoint`` (nothing on moto). Its
    garbage collector is off (it would free deleted data two hours later), so a bench that
    deletes each round's objects would still fill the one OSD, and a full Ceph makes writes
    wait rather than fail."""
    gateway = _BENCH_GATEWAYS.get(endpoint)
    if gateway is not None:
        gateway.admin("gc", "process", "--include-all", timeout=300)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.radosgw``: start a cluster, print how to reach it, serve until ^C."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--access-key", default="radosgw-access-key")
    parser.add_argument("--secret-key", default="radosgw-secret-key")
    parser.add_argument("--objectstore", choices=("bluestore", "memstore"), default="bluestore")
    args = parser.parse_args(argv)
    with radosgw(args.access_key, args.secret_key, objectstore=args.objectstore) as gateway:
        print(f"{version()}: S3 at http://{gateway.endpoint} (started in {gateway.started_in:.1f} s)")
        print(f"access key {gateway.access_key}, secret key {gateway.secret_key}; ^C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
