"""Readiness: do PostgreSQL and the storage answer within a short time?"""

from __future__ import annotations

import logging

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError
from chunksvc.storage import Storage

log = logging.getLogger(__name__)


class HealthService:
    def __init__(self, db: Database, storage: Storage, timeout: float = 2.0, min_free: int = 0) -> None:
        self._db = db
        self._storage = storage
        self._timeout = timeout
        self._min_free = min_free

    def readiness(self) -> dict[str, str]:
        """``{"database": "ok" | reason, "storage": "ok" | reason}``."""
        return {"database": self._check_database(), "storage": self._check_storage()}

    def _check_database(self) -> str:
        try:
            with self._db.connection(timeout=self._timeout) as conn:
                dao.ping(conn)
        except ChunksvcError as exc:
            log.warning("readiness: database: %s", exc.detail)
            return exc.detail
        return "ok"

    def _check_storage(self) -> str:
        try:
            self._storage.check(self._timeout)
            free = self._storage.free_bytes()
        except ChunksvcError as exc:
            log.warning("readiness: storage: %s", exc.detail)
            return exc.detail
        if free is not None and free < self._min_free:
            reason = f"storage is nearly full: {free} bytes free, below the {self._min_free} required"
            log.warning("readiness: %s", reason)
            return reason
        return "ok"
