"""Credentials: API keys and upload tokens, minting, hashing, looking up the client behind a
Bearer credential.

A key is ``csk_<8 hex>_<43 url-safe chars>``: the first part is its public prefix (shown in
``keys list``, used to revoke), the whole key has 256 random bits and is stored only as SHA-256.

An upload token (contract v1.2) is ``cst_<43 url-safe chars>``, 256 random bits, stored only as
SHA-256 too. Its owner's session's owner mints it; it acts as that client, but only on that one
session (``Client.session_scope``) and only for the calls a browser or device uploading it needs.
The resources say which calls those are (``token_methods``); ``check_scope`` holds a scoped
client to its session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from datetime import datetime
from typing import Any
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import Forbidden, InvalidRequest, SessionNotActive, SessionNotFound, Unauthorized
from chunksvc.rows import ApiKeyRow, AuthRow, RevokedKeyRow
from chunksvc.services import rules, states

_KEY = re.compile(r"^csk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")
_TOKEN = re.compile(r"^cst_[A-Za-z0-9_-]{43}$")
TOKEN_PREFIX = "cst_"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A token's session in one of these states ended: its token answers 401 (contract v1.2). Not
# COMPLETED: the token still reads the session it finished (its object, its SHA-256).
TOKEN_DEAD_STATES = frozenset({states.ABORTED, states.EXPIRED, states.FAILED})


@dataclasses.dataclass(frozen=True)
class Client:
    """Who a request acts as. ``session_scope``: the request came with an upload token, and may
    touch only this session of the client's (None: an API key, every session of the client)."""

    id: int
    name: str
    session_scope: UUID | None = None


@dataclasses.dataclass(frozen=True)
class Credential:
    """A Bearer credential's hash, by kind: exactly one of the two is set."""

    key_hash: bytes | None = None
    token_hash: bytes | None = None


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


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def presented_credential(authorization: str | None) -> Credential:
    """The hash to look up for an ``Authorization`` header, as a key's or a token's (told apart by
    their prefixes); malformed ones are refused here, without a database round trip."""
    token = bearer_token(authorization)
    if token is not None and _KEY.match(token):
        return Credential(key_hash=hash_key(token))
    if token is not None and _TOKEN.match(token):
        return Credential(token_hash=hash_key(token))
    raise Unauthorized("send Authorization: Bearer <api-key or upload token>")


def client_of(found: AuthRow | None) -> Client:
    """The client an ``authenticate`` row names, or ``Unauthorized``: an unknown or revoked key,
    an unknown or expired token, or a token whose session ended (checked before anything about
    the request: 401 comes first)."""
    if found is None:
        raise Unauthorized("unknown or revoked API key, or unknown upload token")
    if found.token_session_id is None:
        return Client(id=found.client_id, name=found.client_name)
    if found.token_expired:
        raise Unauthorized("the upload token has expired")
    if found.session is None or found.session.effective_status in TOKEN_DEAD_STATES:
        status = found.session.effective_status if found.session is not None else "gone"
        raise Unauthorized(f"the upload token's session has ended ({status})")
    return Client(id=found.client_id, name=found.client_name, session_scope=found.token_session_id)


def check_scope(client: Client, session_id: UUID | None) -> None:
    """A token's request names its own session, or it is told there is no such session (404, as
    for another client's: a token learns nothing of the others). ``None``: a malformed id."""
    if client.session_scope is not None and session_id != client.session_scope:
        raise SessionNotFound()


def refuse_token(client: Client, what: str) -> None:
    """``Forbidden`` for an upload token: ``what`` is for API keys only."""
    if client.session_scope is not None:
        raise Forbidden(f"an upload token cannot {what}; it allows only its own session's upload calls")


class Authenticator:
    def __init__(self, db: Database) -> None:
        self._db = db

    def authenticate(self, authorization: str | None) -> Client:
        credential = presented_credential(authorization)
        with self._db.connection() as conn:
            return client_of(dao.authenticate(conn, credential.key_hash, token_hash=credential.token_hash))


@dataclasses.dataclass(frozen=True)
class MintedToken:
    token: str  # the only time it exists in clear: the service keeps its hash
    session_id: UUID
    expires_at: datetime


class UploadTokens:
    """``POST /uploads/sessions/{id}/tokens``: the session's owner mints a token for it."""

    def __init__(self, db: Database, default_ttl: int, max_ttl: int) -> None:
        self._db = db
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl

    def mint(self, client: Client, raw_id: str, body: Any) -> MintedToken:
        refuse_token(client, "mint tokens")  # a token must not outlive, or widen, its own grant
        session_id = rules.parse_session_id(raw_id)
        ttl = rules.parse_token_ttl(body, self._default_ttl, self._max_ttl)
        token = new_token()
        with self._db.transaction() as conn:
            session = dao.get_session(conn, session_id, client.id)
            if session is None:
                raise SessionNotFound()
            if session.effective_status in TOKEN_DEAD_STATES:
                raise SessionNotActive(f"the session is {session.effective_status}: a token for it could do nothing")
            minted = dao.insert_upload_token(conn, hash_key(token), session_id, client.id, ttl)
        if minted is None:  # it expired between the two statements
            raise SessionNotActive("the session is EXPIRED: a token for it could do nothing")
        return MintedToken(token, minted.session_id, minted.expires_at)


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
