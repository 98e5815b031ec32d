"""The webhook ops commands (``python -m chunksvc webhooks ...``): endpoints, their secrets, and
redelivery of events, through the DAO's named queries."""

from __future__ import annotations

import secrets
import urllib.parse
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ConfigError, InvalidRequest
from chunksvc.rows import WebhookDeliveryRow, WebhookEndpointRow, WebhookEndpointStateRow
from chunksvc.services.webhook_signing import KEY_BYTES, SigningKey

MAX_URL_LENGTH = 2048


def validate_url(raw: str) -> str:
    """An endpoint URL ops may register: http or https, with a host, no fragment."""
    url = raw.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"the URL must be http:// or https:// with a host, got {raw!r}")
    if parts.fragment or len(url) > MAX_URL_LENGTH or any(c.isspace() for c in url):
        raise InvalidRequest(f"the URL must have no fragment or spaces and at most {MAX_URL_LENGTH} characters")
    if parts.username is not None or parts.password is not None:
        # Never sent (the signature authenticates chunksvc), and it would be shown by `list`.
        raise InvalidRequest("the URL must not carry a user name or password")
    try:
        parts.port  # noqa: B018 - urllib checks the port only when asked
    except ValueError:
        raise InvalidRequest(f"the URL's port is not a number in range: {raw!r}") from None
    return url


class WebhookRegistry:
    """The ops commands: endpoints and their secrets, and redelivery of events. Only making a
    secret (``add``, ``rotate``) needs the signing key; looking and managing do not."""

    def __init__(self, db: Database, signing_key: SigningKey | None) -> None:
        self._db = db
        self._key = signing_key
        self.key_id = signing_key.key_id if signing_key else None

    def _signing_key(self) -> SigningKey:
        if self._key is None:
            raise ConfigError("no webhook signing key (CHUNKSVC_WEBHOOK_KEY): a secret cannot be made without it")
        return self._key

    def add(self, client_name: str, url: str) -> tuple[WebhookEndpointRow, str]:
        """The new endpoint and its secret (shown once: it is not stored)."""
        key = self._signing_key()
        nonce = secrets.token_bytes(KEY_BYTES)
        with self._db.connection() as conn:
            endpoint = dao.insert_webhook_endpoint(conn, client_name, validate_url(url), nonce, key.key_id)
        if endpoint is None:
            raise InvalidRequest(f"no client named {client_name!r} (a client exists once it has an API key)")
        return endpoint, key.secret(nonce)

    def endpoints(self, client_name: str | None = None) -> list[WebhookEndpointStateRow]:
        with self._db.connection() as conn:
            return dao.list_webhook_endpoints(conn, client_name)

    def remove(self, endpoint_id: int) -> int:
        """Stop sending to the endpoint; the count of its undelivered events dropped."""
        with self._db.transaction() as conn:
            if not dao.remove_webhook_endpoint(conn, endpoint_id):
                raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
            return dao.drop_pending_deliveries(conn, endpoint_id)

    def rotate(self, endpoint_id: int, overlap: int) -> tuple[WebhookEndpointRow, str]:
        """A new secret for the endpoint; the old one signs beside it for ``overlap`` seconds."""
        key = self._signing_key()
        nonce = secrets.token_bytes(KEY_BYTES)
        with self._db.connection() as conn:
            current = dao.get_webhook_endpoint(conn, endpoint_id)
            if current is not None and current.key_id != key.key_id and overlap > 0:
                # The previous secret would be derived with this key, not the one that made it:
                # a signature no receiver could verify.
                raise InvalidRequest(
                    f"endpoint {endpoint_id}'s secret came from another signing key: rotate with --overlap 0"
                    " (the old secret cannot be derived with this key)"
                )
            endpoint = dao.rotate_webhook_secret(conn, endpoint_id, nonce, key.key_id, overlap)
        if endpoint is None:
            raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
        return endpoint, key.secret(nonce)

    def set_url(self, endpoint_id: int, url: str) -> WebhookEndpointRow:
        """Move the endpoint: its secret and its undelivered events go with it."""
        with self._db.connection() as conn:
            endpoint = dao.set_webhook_url(conn, endpoint_id, validate_url(url))
        if endpoint is None:
            raise InvalidRequest(f"no webhook endpoint {endpoint_id} in use")
        return endpoint

    def deliveries(
        self,
        *,
        endpoint_id: int | None = None,
        session_id: UUID | None = None,
        state: str | None = None,
        limit: int = 50,
    ) -> list[WebhookDeliveryRow]:
        """Deliveries, newest event first (``state``: pending, failing, dead or delivered)."""
        with self._db.connection() as conn:
            return dao.list_webhook_deliveries(
                conn, endpoint_id=endpoint_id, session_id=session_id, state=state, limit=limit
            )

    def redeliver(self, event_id: UUID | str) -> list[int]:
        """Send the event again to its endpoints still in use, now; their ids."""
        if isinstance(event_id, str):
            try:
                event_id = UUID(event_id)
            except ValueError:
                raise InvalidRequest(f"an event id is a UUID (as in Chunksvc-Event-Id), got {event_id!r}") from None
        with self._db.connection() as conn:
            endpoints = dao.redeliver_webhook_event(conn, event_id)
        if endpoints is None:
            raise InvalidRequest(
                f"no event {event_id}: never made, or pruned with its deliveries (events whose deliveries"
                " all ended are kept CHUNKSVC_WEBHOOK_RETENTION seconds)"
            )
        if not endpoints:
            raise InvalidRequest(
                f"no delivered or dead delivery of event {event_id} to an endpoint still in use"
                " (a pending one is being sent anyway: `webhooks events` shows it)"
            )
        return endpoints
