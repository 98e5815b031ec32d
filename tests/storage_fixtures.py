"""Storage fixtures (a pytest plugin): each storage test runs on a directory and on S3 (moto).

``storage_spec`` / ``storage`` are parametrized over both backends. S3 runs over real HTTP
against moto's server, each test in a fresh bucket.

``moto_server`` runs in this process: fast, but its allocations count in ``tracemalloc``
(moto buffers whole parts and assembles multipart objects in memory). Memory tests use
``moto_process`` instead, the same server in a child process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunksvc.config import StorageSpec
from chunksvc.storage import Storage, open_storage
from tools import harness

# moto, boto3 and minio are imported where used: this plugin loads for every test run, and
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


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """An S3 server (moto) in this process; yields its endpoint, ``127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"{host}:{port}"
    finally:
        server.stop()


# An S3 server (moto) in a child process: its endpoint, and the process (to kill it early).
moto_child = harness.moto_s3_process


@pytest.fixture(scope="session")
def moto_process() -> Iterator[str]:
    """An S3 server (moto) in a child process, for tests that measure this process's memory."""
    with moto_child() as (endpoint, _child):
        yield endpoint


@pytest.fixture
def s3_spec(moto_server: str) -> Iterator[StorageSpec]:
    spec = make_s3_spec(moto_server)
    yield spec
    drop_bucket(spec)  # moto keeps objects in memory for the whole session otherwise


@pytest.fixture
def file_spec(tmp_path: Path) -> StorageSpec:
    return StorageSpec(kind="file", root=tmp_path / "storage")


@pytest.fixture(params=["file", "s3"], ids=["file", "s3"])
def storage_spec(request: pytest.FixtureRequest) -> StorageSpec:
    # Looked up lazily so file-only runs never start moto.
    return request.getfixturevalue(f"{request.param}_spec")


@pytest.fixture
def storage(storage_spec: StorageSpec) -> Iterator[Storage]:
    adapter = open_storage(storage_spec)
    yield adapter
    adapter.close()
