"""Storage fixtures (a pytest plugin): each storage test runs on a directory and on S3.

``storage_spec`` / ``storage`` are parametrized over both backends. S3 runs over real HTTP
against a real S3 server, Ceph's radosgw (``tools/radosgw.py``: one throwaway single-node
cluster for the session, started on first use), each test in a fresh bucket. Without Ceph's
packages (``apt-get install --no-install-recommends radosgw ceph-mon ceph-osd``; ``.ci/run``
installs them) the S3 cases are skipped, saying so.

radosgw runs in other processes, so its memory never counts in this one's ``tracemalloc``.
No test needs moto any more: what moto does differently is in docs/storage-s3.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunksvc.config import StorageSpec
from chunksvc.storage import Storage, open_storage
from tools import harness, radosgw

# boto3 and minio are imported where used: this plugin loads for every test run, and
# most runs need none of them.

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-never-logged"
REGION = "us-east-1"


def make_s3_spec(endpoint: str, bucket: str | None = None, create: bool = True) -> StorageSpec:
    """A spec for a new uniquely-named bucket at ``endpoint`` (created unless ``create`` is false)."""
    return harness.s3_spec(endpoint, bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY, create=create)


def s3_admin(spec: StorageSpec) -> Any:
    """A boto3 client on the spec's server, to look behind the adapter (e.g. at multipart uploads)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://{spec.endpoint}",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def drop_bucket(spec: StorageSpec) -> None:
    """Remove the bucket and everything in it, including unfinished multipart uploads."""
    s3 = s3_admin(spec)
    bucket = spec.bucket
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    s3.delete_bucket(Bucket=bucket)


@contextlib.contextmanager
def radosgw_cluster(objectstore: str = "bluestore") -> Iterator[radosgw.Radosgw]:
    """A throwaway Ceph with radosgw and the tests' keys (the test is skipped without Ceph)."""
    missing = radosgw.missing_binaries()
    if missing:
        pytest.skip(f"S3 on radosgw: {', '.join(missing)} not installed (apt-get install {radosgw.PACKAGES})")
    with radosgw.radosgw(ACCESS_KEY, SECRET_KEY, objectstore=objectstore) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def radosgw_gateway() -> Iterator[radosgw.Radosgw]:
    """The session's radosgw on bluestore, for tests that also administer it (``admin``: quotas)."""
    with radosgw_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def radosgw_server(radosgw_gateway: radosgw.Radosgw) -> str:
    """The session's S3 server (``radosgw_gateway``); its endpoint, ``127.0.0.1:PORT``."""
    return radosgw_gateway.endpoint


@pytest.fixture
def s3_spec(radosgw_server: str) -> Iterator[StorageSpec]:
    spec = make_s3_spec(radosgw_server)
    yield spec
    drop_bucket(spec)  # the session's cluster would keep every test's bytes otherwise


@pytest.fixture
def s3_retries_without_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 storages made in the test retry as many times as ops' do (``chunksvc.storage.s3._RETRIES``)
    but without sleeping between the attempts (0.4 s, then 0.8 s): for tests of what an endpoint
    that refuses every connection leads to, not of how long the client keeps trying."""
    from chunksvc.storage import s3

    monkeypatch.setattr(s3, "_RETRIES", s3._RETRIES.new(backoff_factor=0))


@pytest.fixture
def file_spec(tmp_path: Path) -> StorageSpec:
    return StorageSpec(kind="file", root=tmp_path / "storage")


@pytest.fixture(params=["file", "s3"], ids=["file", "s3"])
def storage_spec(request: pytest.FixtureRequest) -> StorageSpec:
    # Looked up lazily so file-only runs never start Ceph.
    return request.getfixturevalue(f"{request.param}_spec")


@pytest.fixture
def storage(storage_spec: StorageSpec) -> Iterator[Storage]:
    adapter = open_storage(storage_spec)
    yield adapter
    adapter.close()
