"""The storage contract (chunksvc.storage.base), run against both adapters.

S3 runs over real HTTP against radosgw (never a mocked client); boto3 is used only to look
behind the adapter, e.g. for unfinished multipart uploads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from chunksvc.config import GiB, KiB, Limits, MiB, StorageSpec, TiB
from chunksvc.errors import ConfigError, IncompleteBody, StorageError, StorageFull, StorageUnavailable
from chunksvc.storage import PartSource, Storage, open_storage, s3
from chunksvc.storage.local import INCOMING, LocalStorage
from chunksvc.storage.s3 import S3Storage, can_compose, part_size_for
from tests.storage_fixtures import SECRET_KEY, make_s3_spec, radosgw_cluster, s3_admin
from tools import radosgw

BLOCK = 64 * KiB


class GeneratedBody:
    """``length`` bytes made block by block (never held whole), served in short reads.

    Each 64 KiB block starts with its index, so a misplaced block changes the digest. Optionally
    raises ``fail_with`` once ``fail_after`` bytes have been served.
    """

    def __init__(self, length: int, fail_after: int | None = None, fail_with: BaseException | None = None) -> None:
        self._blocks = self._generate(length)
        self._pending = memoryview(b"")
        self._fail_after = fail_after
        self._fail_with = fail_with
        self.served = 0
        self.largest_request = 0
        self.sha256 = hashlib.sha256()

    @staticmethod
    def _generate(length: int) -> Iterator[bytes]:
        pattern = bytes(range(256)) * (BLOCK // 256)
        for index, start in enumerate(range(0, length, BLOCK)):
            yield (index.to_bytes(8, "big") + pattern[8:])[: length - start]

    def read(self, size: int = -1, /) -> bytes:
        self.largest_request = max(self.largest_request, size)
        if self._fail_after is not None and self.served >= self._fail_after:
            raise self._fail_with or IncompleteBody("client went away")
        if not self._pending:
            self._pending = memoryview(next(self._blocks, b""))
        take = len(self._pending) if size < 0 else min(size, len(self._pending))
        chunk = bytes(self._pending[:take])
        self._pending = self._pending[take:]
        self.served += take
        self.sha256.update(chunk)
        return chunk


def put(storage: Storage, key: str, data: bytes, block_size: int = BLOCK) -> None:
    storage.write(key, io.BytesIO(data), len(data), block_size)


def read_all(storage: Storage, key: str) -> bytes:
    with storage.open(key) as f:
        return f.read()


def sha256_of(storage: Storage, key: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with storage.open(key) as f:
        while block := f.read(MiB):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def leftovers(spec: StorageSpec) -> list[str]:
    """What a failed write could leave behind: temporary files, unfinished multipart uploads."""
    if spec.kind == "file":
        assert spec.root is not None
        return [p.name for p in (spec.root / INCOMING).iterdir()]
    uploads = s3_admin(spec).list_multipart_uploads(Bucket=spec.bucket).get("Uploads", [])
    return [upload["Key"] for upload in uploads]


def compose_calls(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and pass through) the S3 adapter's server-side composes; none on a directory."""
    calls: list[str] = []
    if isinstance(storage, S3Storage):
        real = storage._compose

        def compose(sources: list, key: str) -> None:
            calls.append(key)
            real(sources, key)

        monkeypatch.setattr(storage, "_compose", compose)
    return calls


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- write / read -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 100_000, 6 * MiB + 123], ids=["empty", "1B", "100KB", "6MiB-multipart"])
def test_write_then_read_back(storage: Storage, storage_spec: StorageSpec, length: int) -> None:
    body = GeneratedBody(length)
    storage.write("parts/s/p1", body, length, BLOCK)

    assert body.largest_request <= BLOCK
    assert body.served == length
    assert storage.exists("parts/s/p1")
    assert sha256_of(storage, "parts/s/p1") == (length, body.sha256.hexdigest())
    assert leftovers(storage_spec) == []


def test_write_reads_no_further_than_length(storage: Storage) -> None:
    reader = io.BytesIO(b"0123456789")
    storage.write("parts/s/p1", reader, 4, BLOCK)
    assert read_all(storage, "parts/s/p1") == b"0123"
    assert reader.read() == b"456789"


def test_write_replaces_existing_object(storage: Storage) -> None:
    put(storage, "objects/s", b"old contents")
    put(storage, "objects/s", b"new")
    assert read_all(storage, "objects/s") == b"new"


@pytest.mark.parametrize(
    ("length", "fail_after"),
    [(100, 0), (100_000, 50_000), (12 * MiB, 7 * MiB)],
    ids=["at-start", "mid-single-put", "mid-multipart"],
)
@pytest.mark.parametrize(
    "error", [IncompleteBody("client went away"), TimeoutError("socket timed out")], ids=["incomplete", "oserror"]
)
def test_failed_read_leaves_nothing(
    storage: Storage, storage_spec: StorageSpec, length: int, fail_after: int, error: Exception
) -> None:
    body = GeneratedBody(length, fail_after=fail_after, fail_with=error)
    with pytest.raises(type(error)) as raised:
        storage.write("parts/s/p1", body, length, BLOCK)

    assert raised.value is error  # the reader's own exception, untranslated
    assert not storage.exists("parts/s/p1")
    assert list(storage.list_keys("")) == []
    assert leftovers(storage_spec) == []


def test_reader_error_wins_when_cleanup_fails_too() -> None:
    """The server dies mid-upload, then the reader fails: the SDK cannot abort the multipart
    upload, yet the caller still gets the reader's exception (with a note about the abort)."""
    with radosgw_cluster("memstore") as cluster:  # a cluster of its own: its gateway is killed
        server = cluster.gateway
        storage = S3Storage(make_s3_spec(cluster.endpoint))
        storage.max_single_put = 5 * MiB  # a multipart upload, which leaves something to abort
        error = IncompleteBody("client went away")

        class DyingBody(GeneratedBody):
            def read(self, size: int = -1, /) -> bytes:
                if self.served >= 7 * MiB:  # part 1 is uploaded: a multipart upload exists
                    server.kill()
                    server.wait()
                    raise error
                return super().read(size)

        with pytest.raises(IncompleteBody) as raised:
            storage.write("parts/s/p1", DyingBody(12 * MiB), 12 * MiB, BLOCK)
    assert raised.value is error
    assert any("aborting the partial upload" in note for note in raised.value.__notes__)
    assert all(SECRET_KEY not in note for note in raised.value.__notes__)


def test_reader_ending_early_is_incomplete_body(storage: Storage, storage_spec: StorageSpec) -> None:
    with pytest.raises(IncompleteBody):
        storage.write("parts/s/p1", GeneratedBody(1000), 1001, BLOCK)
    assert not storage.exists("parts/s/p1")
    assert leftovers(storage_spec) == []


def test_open_reads_in_pieces(storage: Storage) -> None:
    put(storage, "objects/s", b"abcdefghij")
    with storage.open("objects/s") as f:
        assert f.read(3) == b"abc"
        assert f.read(4) == b"defg"
        assert f.read() == b"hij"
        assert f.read(5) == b""
    assert f.closed


def test_open_missing_is_storage_error(storage: Storage) -> None:
    with pytest.raises(StorageError):
        storage.open("objects/missing")


# --- assemble -----------------------------------------------------------------------------


def write_parts(storage: Storage, sizes: list[int]) -> tuple[list[PartSource], bytes]:
    sources, expected = [], b""
    for number, size in enumerate(sizes, start=1):
        data = bytes([number % 256]) * size
        put(storage, f"parts/s/p{number}", data, block_size=MiB)
        sources.append(PartSource(f"parts/s/p{number}", size))
        expected += data
    return sources, expected


@pytest.mark.parametrize(
    ("sizes", "composed"),
    [
        ([MiB] * 6 + [12_345], False),  # small parts: streamed, across a 5 MiB multipart boundary
        ([300, 200, 1], False),  # small parts, small total: one streamed PUT
        ([5 * MiB, 5 * MiB, MiB + 3], True),  # server-side compose
        ([7 * MiB], True),  # one part: a server-side copy
        ([], False),
        ([0], True),
        ([10, 0, 10], False),
    ],
    ids=["small-parts", "tiny-parts", "compose", "single", "none", "one-empty", "with-empty"],
)
def test_assemble(storage: Storage, monkeypatch: pytest.MonkeyPatch, sizes: list[int], composed: bool) -> None:
    sources, expected = write_parts(storage, sizes)
    composes = compose_calls(storage, monkeypatch)

    stored = storage.assemble(sources, "objects/s", 256 * KiB)

    assert stored.key == "objects/s"
    assert stored.size == len(expected)
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert read_all(storage, "objects/s") == expected
    assert all(storage.exists(src.key) for src in sources)  # parts are the caller's to delete
    if isinstance(storage, S3Storage):
        assert composes == (["objects/s"] if composed else [])


def test_assemble_missing_part(storage: Storage, storage_spec: StorageSpec) -> None:
    sources, _ = write_parts(storage, [10, 10])
    with pytest.raises(StorageError):
        storage.assemble([*sources, PartSource("parts/s/gone", 10)], "objects/s", BLOCK)
    assert not storage.exists("objects/s")
    assert leftovers(storage_spec) == []


@pytest.mark.parametrize("sizes", [[100, 100], [5 * MiB, 5 * MiB]], ids=["streamed", "composed"])
def test_assemble_part_of_unexpected_size(storage: Storage, storage_spec: StorageSpec, sizes: list[int]) -> None:
    sources, _ = write_parts(storage, sizes)
    sources[-1] = PartSource(sources[-1].key, sizes[-1] - 1)
    with pytest.raises(StorageError, match="parts/s/p2"):
        storage.assemble(sources, "objects/s", BLOCK)
    assert not storage.exists("objects/s")
    assert leftovers(storage_spec) == []


# --- keys ---------------------------------------------------------------------------------


def test_delete_and_exists(storage: Storage) -> None:
    put(storage, "parts/s/p1", b"1")
    put(storage, "parts/s/p2", b"2")

    storage.delete(["parts/s/p1", "parts/s/never-written", "parts/s"])

    assert not storage.exists("parts/s/p1")
    assert storage.exists("parts/s/p2")
    assert not storage.exists("parts/s")  # a "directory" is not an object
    storage.delete([])


def test_list_keys_and_delete_prefix(storage: Storage, storage_spec: StorageSpec) -> None:
    keys = ["parts/s1/p1", "parts/s1/p2", "parts/s10/p1", "parts/s2/p1", "objects/s1"]
    for key in keys:
        put(storage, key, key.encode())
    before = datetime.now(UTC) - timedelta(minutes=5)

    def listed(prefix: str) -> set[str]:
        items = list(storage.list_keys(prefix))
        assert all(before < item.last_modified <= datetime.now(UTC) + timedelta(minutes=5) for item in items)
        return {item.key for item in items}

    assert listed("") == set(keys)
    assert listed("parts/") == set(keys[:4])
    assert listed("parts/s1/") == {"parts/s1/p1", "parts/s1/p2"}
    assert listed("parts/s1") == {"parts/s1/p1", "parts/s1/p2", "parts/s10/p1"}
    assert listed("parts/none/") == set()

    assert storage.delete_prefix("parts/s1/") == 2
    assert listed("") == {"parts/s10/p1", "parts/s2/p1", "objects/s1"}
    assert storage.delete_prefix("parts/s1/") == 0
    if storage_spec.kind == "file":
        assert storage_spec.root is not None
        assert not (storage_spec.root / "parts" / "s1").exists()  # no empty directories left


@pytest.mark.parametrize("prefix", ["", "/", "parts", "../", "parts//"])
def test_delete_prefix_refuses_bad_prefixes(storage: Storage, prefix: str) -> None:
    put(storage, "parts/s/p1", b"1")
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)
    assert storage.exists("parts/s/p1")


@pytest.mark.parametrize(
    "key", ["", "/abs", "../x", "a/../b", "a/./b", "a//b", "a/", "Upper", ".incoming/x", "a b", "a\\b", "x" * 1025]
)
def test_invalid_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.exists(key)
    with pytest.raises(ValueError):
        put(storage, key, b"x")
    with pytest.raises(ValueError):
        storage.open(key)
    with pytest.raises(ValueError):
        storage.delete([key])
    with pytest.raises(ValueError):
        storage.assemble([PartSource(key, 1)], "objects/s", BLOCK)
    with pytest.raises(ValueError):
        list(storage.list_keys(key + "/"))


def test_bucket_names_where_the_keys_live(storage: Storage, storage_spec: StorageSpec) -> None:
    if storage_spec.kind == "s3":
        assert storage.bucket == storage_spec.bucket and storage.bucket
    else:
        assert storage.bucket is None


# --- unfinished writes --------------------------------------------------------------------


def test_sweep_removes_old_unfinished_writes(storage: Storage, storage_spec: StorageSpec) -> None:
    if storage_spec.kind == "file":
        assert storage_spec.root is not None
        (storage_spec.root / INCOMING / "left-by-a-killed-writer").write_bytes(b"half a part")
    else:
        s3_admin(storage_spec).create_multipart_upload(Bucket=storage_spec.bucket, Key="mine/a")
    found: list[str] = []
    assert storage.sweep_incomplete(["mine/"], datetime.now(UTC) + timedelta(minutes=1), found=found.append) == 1
    assert leftovers(storage_spec) == []
    [item] = found
    if storage_spec.kind == "file":
        assert item == f"{INCOMING}/left-by-a-killed-writer"  # its own files, whatever the prefixes
    else:
        assert item.startswith("mine/a (multipart upload ")


def test_s3_sweep_aborts_old_uploads_under_the_given_prefixes_only(s3_spec: StorageSpec) -> None:
    """Listed through ``s3.list_multipart_uploads`` (the one private SDK call), aborted through a
    signed DELETE, against a real S3 server."""
    admin = s3_admin(s3_spec)
    keys = ["mine/a", "mine/a", "mine/b", "also/c", "theirs/d"]
    for key in keys:
        admin.create_multipart_upload(Bucket=s3_spec.bucket, Key=key)
    storage = S3Storage(s3_spec)
    prefixes = ["mine/", "also/"]
    later = datetime.now(UTC) + timedelta(minutes=1)
    found: list[str] = []

    assert storage.sweep_incomplete(prefixes, datetime(2000, 1, 1, tzinfo=UTC)) == 0  # none begun before
    assert storage.sweep_incomplete(prefixes, later, dry_run=True, found=found.append) == 4
    assert sorted(leftovers(s3_spec)) == sorted(keys)
    assert sorted(item.split(" ", 1)[0] for item in found) == sorted(keys[:4])
    assert storage.sweep_incomplete(prefixes, later) == 4
    assert leftovers(s3_spec) == ["theirs/d"]
    assert storage.sweep_incomplete(prefixes, later) == 0


def test_s3_an_upload_aborted_meanwhile_is_not_counted(s3_spec: StorageSpec) -> None:
    upload_id = s3_admin(s3_spec).create_multipart_upload(Bucket=s3_spec.bucket, Key="mine/a")["UploadId"]
    storage = S3Storage(s3_spec)
    assert storage._abort_upload("mine/a", upload_id) is True
    assert storage._abort_upload("mine/a", upload_id) is False  # NoSuchUpload: another sweep won


def test_s3_unfinished_uploads_are_listed_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages are served here: a real page holds 1,000 uploads (radosgw, S3), and making 1,001 of
    them on radosgw would cost the suite about a minute (moto ignored max-uploads). minio 7.2 does not parse
    NextUploadIdMarker: the last upload of a page marks where the next one starts."""
    pages = {
        (None, None): (["a/1", "a/2"], True),
        ("a/2", "a/2-id"): (["b/3"], True),
        ("b/3", "b/3-id"): (["c/4"], False),
    }
    asked: list[tuple[str, str | None, str | None]] = []

    def list_page(client: object, bucket: str, prefix: str, key_marker: str | None, upload_id_marker: str | None):
        asked.append((prefix, key_marker, upload_id_marker))
        keys, truncated = pages[key_marker, upload_id_marker]
        begun = datetime(2010, 11, 10, tzinfo=UTC)
        uploads = [SimpleNamespace(object_name=k, upload_id=f"{k}-id", initiated_time=begun) for k in keys]
        return SimpleNamespace(uploads=uploads, is_truncated=truncated)

    monkeypatch.setattr(s3, "list_multipart_uploads", list_page)
    storage = S3Storage(make_s3_spec(f"127.0.0.1:{closed_port()}", bucket="bucket", create=False))
    found: list[str] = []
    assert storage.sweep_incomplete(["p/"], datetime.now(UTC), dry_run=True, found=found.append) == 4
    assert asked == [("p/", None, None), ("p/", "a/2", "a/2-id"), ("p/", "b/3", "b/3-id")]
    assert [item.split(" ", 1)[0] for item in found] == ["a/1", "a/2", "b/3", "c/4"]


# --- health and configuration -------------------------------------------------------------


def test_check_succeeds(storage: Storage) -> None:
    storage.check(2.0)


def test_local_check_fails_without_root(file_spec: StorageSpec) -> None:
    assert file_spec.root is not None
    storage = LocalStorage(file_spec.root)
    (file_spec.root / INCOMING).rmdir()
    file_spec.root.rmdir()
    with pytest.raises(StorageUnavailable):
        storage.check(1.0)


def test_local_root_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="file/storage"):
        LocalStorage(tmp_path / "file" / "storage")


def test_s3_check_fails_for_missing_bucket(radosgw_server: str) -> None:
    storage = S3Storage(make_s3_spec(radosgw_server, bucket="no-such-bucket", create=False))
    with pytest.raises(StorageUnavailable, match="no-such-bucket") as raised:
        storage.check(2.0)
    assert SECRET_KEY not in str(raised.value)


def test_s3_dead_endpoint_is_unavailable(s3_retries_without_backoff: None) -> None:
    spec = make_s3_spec(f"127.0.0.1:{closed_port()}", bucket="bucket", create=False)
    storage = S3Storage(spec)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=re.escape(spec.endpoint or "")) as checked:
        storage.check(0.5)
    assert time.monotonic() - started < 2
    with pytest.raises(StorageUnavailable) as used:
        storage.exists("objects/s")  # the ordinary client, after its few retries
    for raised in (checked, used):
        assert SECRET_KEY not in str(raised.value)
    assert SECRET_KEY not in repr(storage)


def test_s3_missing_bucket_is_storage_error(radosgw_server: str) -> None:
    storage = S3Storage(make_s3_spec(radosgw_server, bucket="no-such-bucket", create=False))
    with pytest.raises(StorageError, match="NoSuchBucket"):
        put(storage, "objects/s", b"x")


def test_s3_wrong_keys_fail_the_check(radosgw_server: str) -> None:
    """moto accepts any keys; radosgw refuses them, and the check says so (not "did not answer")."""
    bucket = make_s3_spec(radosgw_server).bucket
    wrong_secret = dataclasses.replace(make_s3_spec(radosgw_server, bucket, create=False), secret_key="not-the-secret")
    unknown_key = dataclasses.replace(wrong_secret, access_key="nobody")
    for spec, code in ((wrong_secret, "SignatureDoesNotMatch"), (unknown_key, "InvalidAccessKeyId")):
        # A HEAD's answer has no body: the SDK names a 403 AccessDenied itself.
        with pytest.raises(
            StorageUnavailable, match="refused the check of its bucket: AccessDenied \\(HTTP 403\\)"
        ) as raised:
            S3Storage(spec).check(2.0)
        assert "not-the-secret" not in str(raised.value)
        with pytest.raises(StorageError, match=f"answered {code} \\(HTTP 403\\)$"):  # radosgw's message is empty
            put(S3Storage(spec), "objects/s", b"x")


def test_an_empty_error_message_still_names_the_answer() -> None:
    from minio.error import S3Error

    response = SimpleNamespace(status=403)
    with pytest.raises(StorageError) as raised, s3._boundary("write parts/x", "host/bucket"):
        raise S3Error(response, "AccessDenied", "", "/bucket/parts/x", "req", "host")  # type: ignore[arg-type]
    assert raised.value.detail == "write parts/x: host/bucket answered AccessDenied (HTTP 403)"


def test_s3_a_full_quota_is_storage_full(radosgw_gateway: radosgw.Radosgw, s3_spec: StorageSpec) -> None:
    """radosgw answers a full user or bucket quota with 403 QuotaExceeded (MinIO's full drives:
    507): the same StorageFull, for a part's PUT and for an assembly, composed or streamed."""
    storage = S3Storage(s3_spec)
    parts = [PartSource("parts/big/1", 5 * MiB), PartSource("parts/big/2", KiB)]  # composed
    small = [PartSource("parts/small/1", KiB), PartSource("parts/small/2", KiB)]  # streamed
    for part in parts + small:
        put(storage, part.key, b"p" * part.size, block_size=MiB)
    # Every object the bucket may hold is there: the next one is over the quota.
    radosgw_gateway.admin("quota", "set", "--quota-scope=bucket", f"--bucket={s3_spec.bucket}", "--max-objects=4")
    radosgw_gateway.admin("quota", "enable", "--quota-scope=bucket", f"--bucket={s3_spec.bucket}")
    with pytest.raises(StorageFull):
        put(storage, "parts/one-too-many", b"x")
    with pytest.raises(StorageFull):
        storage.assemble(parts, "objects/composed", BLOCK)
    with pytest.raises(StorageFull):
        storage.assemble(small, "objects/streamed", BLOCK)
    assert not storage.exists("objects/composed") and not storage.exists("objects/streamed")
    assert leftovers(s3_spec) == []  # no multipart upload left behind either


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (Limits(max_parts=10_001), "at most 10000 parts"),
        (Limits(max_upload_size=5 * TiB + 1), "5 TiB"),
    ],
    ids=["max-parts", "max-upload-size"],
)
def test_s3_validate_limits_refuses(s3_spec: StorageSpec, limits: Limits, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        S3Storage(s3_spec).validate_limits(limits)


@pytest.mark.parametrize(
    "limits",
    [Limits(), Limits(min_part_size=64 * KiB, default_part_size=MiB)],
    ids=["defaults", "small-parts"],
)
def test_validate_limits_accepts(storage: Storage, limits: Limits) -> None:
    storage.validate_limits(limits)


@pytest.mark.parametrize(
    "spec",
    [
        StorageSpec(kind="file"),
        StorageSpec(kind="s3", endpoint="h:9000", access_key="a", secret_key="s"),  # no bucket
        StorageSpec(kind="gcs"),
    ],
    ids=["file-without-root", "s3-without-bucket", "unknown-kind"],
)
def test_open_storage_refuses_incomplete_specs(spec: StorageSpec) -> None:
    with pytest.raises(ConfigError):
        open_storage(spec)


def test_minio_is_imported_only_by_the_s3_adapter() -> None:
    root = Path(__file__).resolve().parents[1] / "chunksvc"
    importers = {
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if any(
            line.lstrip().startswith(("import minio", "from minio"))
            for line in path.read_text(encoding="utf-8").splitlines()
        )
    }
    assert importers == {"storage/s3.py"}
    # And a file-only deployment never loads it.
    script = (
        "import sys, tempfile, pathlib\n"
        "from chunksvc.config import StorageSpec\n"
        "from chunksvc.storage import open_storage\n"
        "open_storage(StorageSpec(kind='file', root=pathlib.Path(tempfile.mkdtemp())))\n"
        "assert 'minio' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root.parent)


# --- pure helpers -------------------------------------------------------------------------


def sources(*sizes: int) -> list[PartSource]:
    return [PartSource(f"parts/s/p{i}", size) for i, size in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ((5 * MiB, 5 * MiB, 1), True),
        ((5 * MiB, 5 * MiB - 1, 1), False),  # a part before the last is under 5 MiB
        ((5 * MiB, 1, 5 * MiB), False),
        ((8 * MiB,), True),
        ((1,), True),  # a single part is a plain copy, whatever its size
        ((0,), True),
        ((5 * MiB, 0), False),  # S3 refuses an empty copy range
        ((), False),
        ((5 * MiB,) * 10_000, True),
        ((5 * MiB,) * 10_001, False),  # more than 10,000 parts
        ((6 * GiB, 5 * MiB), True),  # 6 GiB is copied as 5 GiB + 1 GiB
        ((5 * GiB + 1, 5 * MiB), False),  # ... but 5 GiB + 1 leaves a 1-byte copy part
        ((5 * GiB, 5 * GiB), True),
        ((5 * GiB,) * 1025, False),  # over 5 TiB
    ],
)
def test_can_compose(sizes: tuple[int, ...], expected: bool) -> None:
    assert can_compose(sources(*sizes)) is expected


@pytest.mark.parametrize("length", [0, 1, 5 * MiB, 10_000 * 5 * MiB, 10_000 * 5 * MiB + 1, 5 * TiB])
def test_part_size_for(length: int) -> None:
    size = part_size_for(length)
    assert 5 * MiB <= size <= 5 * GiB
    assert -(-length // size) <= 10_000
    if length <= 10_000 * 5 * MiB:
        assert size == 5 * MiB


# --- memory -------------------------------------------------------------------------------


@pytest.fixture(params=["file", "s3"], ids=["file", "s3"])
def measured_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Like ``storage``, but S3 is served from another process so its buffers are not traced."""
    if request.param == "file":
        spec = StorageSpec(kind="file", root=tmp_path / "storage")
    else:
        spec = make_s3_spec(request.getfixturevalue("radosgw_server"))
    adapter = open_storage(spec)
    yield adapter
    adapter.close()


def test_write_memory_is_bounded(measured_storage: Storage) -> None:
    length = 64 * MiB
    body = GeneratedBody(length)
    tracemalloc.start()
    try:
        measured_storage.write("objects/big", body, length, MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 16 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    assert body.largest_request <= MiB
    assert sha256_of(measured_storage, "objects/big") == (length, body.sha256.hexdigest())
