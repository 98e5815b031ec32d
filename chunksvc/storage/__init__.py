"""Byte storage: the interface and ``open_storage`` to get the configured adapter."""

from __future__ import annotations

from chunksvc.config import StorageSpec
from chunksvc.errors import ConfigError
from chunksvc.storage.base import ListedKey, PartSource, Readable, Storage, StoredObject
from chunksvc.storage.local import LocalStorage

__all__ = ["ListedKey", "PartSource", "Readable", "Storage", "StoredObject", "open_storage"]


def open_storage(spec: StorageSpec) -> Storage:
    """The adapter for ``spec``; ``ConfigError`` if it cannot be set up."""
    if spec.kind == "file":
        if spec.root is None:
            raise ConfigError("file storage needs a root directory")
        return LocalStorage(spec.root)
    if spec.kind == "s3":
        # Imported here so a file-only deployment never imports minio.
        from chunksvc.storage.s3 import S3Storage

        return S3Storage(spec)
    raise ConfigError(f"unknown storage kind {spec.kind!r} (use 'file' or 's3')")
