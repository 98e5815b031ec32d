"""API keys: minting, hashing, looking up the client behind a Bearer token.

A key is ``csk_<8 hex>_<43 url-safe chars>``: the first part is its public prefix (shown in
``keys list``, used to revoke), the whole key has 256 random bits and is stored only as SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import InvalidRequest, Unauthorized
from chunksvc.rows import ApiKeyRow, RevokedKeyRow

_KEY = re.compile(r"^csk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Client:
    id: int
    name: str


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key, prefix)``."""
    prefix = f"csk_{secrets.token_hex(4)}"
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def presented_key_hash(authorization: str | None) -> bytes:
    """The hash to look up for an ``Authorization`` header; malformed keys are refused here,
    without a database round trip."""
    token = bearer_token(authorization)
    if token is None or not _KEY.match(token):
        raise Unauthorized("send Authorization: Bearer <api-key>")
    return hash_key(token)


class Authenticator:
    def __init__(self, db: Database) -> None:
        self._db = db

    def authenticate(self, authorization: str | None) -> Client:
        key_hash = presented_key_hash(authorization)
        with self._db.connection() as conn:
            found = dao.authenticate(conn, key_hash)
        if found is None:
            raise Unauthorized("unknown or revoked API key")
        return Client(id=found.client_id, name=found.client_name)


class KeyManager:
    """What ``python -m chunksvc keys ...`` does."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, client_name: str) -> tuple[str, str]:
        """Mint a key for ``client_name`` (creating the client); return ``(key, prefix)``."""
        if not _CLIENT_NAME.match(client_name):
            raise InvalidRequest("client name: 1-64 characters of A-Z a-z 0-9 . _ -, starting alphanumeric")
        key, prefix = new_key()
        with self._db.transaction() as conn:
            client = dao.upsert_client(conn, client_name)
            dao.insert_api_key(conn, client.id, prefix, hash_key(key))
        return key, prefix

    def list_keys(self) -> list[ApiKeyRow]:
        with self._db.connection() as conn:
            return dao.list_api_keys(conn)

    def revoke(self, target: str) -> list[RevokedKeyRow]:
        """Revoke the key with this prefix, or every key of the client with this name."""
        with self._db.transaction() as conn:
            return dao.revoke_api_keys(conn, target)
