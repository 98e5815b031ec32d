"""Webhook signatures: the server's signing key, each endpoint's secret derived from it, and the
``Chunksvc-Signature`` header.

HMAC needs the sender to hold the secret, so it must be recoverable; it is not stored. Each
endpoint's secret is derived, ``HMAC-SHA256(signing key, nonce)``, from a random per-endpoint nonce
in the database and the server's signing key, which lives outside it (``CHUNKSVC_WEBHOOK_KEY`` or a
key file). A database dump alone (a backup, a replica, a read-only SQL hole) holds nonces only and
cannot sign. Each endpoint records the ``key_id`` of the key that derived its secret: a process
with another key does not claim its deliveries (it could only send signatures that fail).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from chunksvc.errors import ConfigError

# One logger for every webhook module: docs/operations.md tells ops its name.
log = logging.getLogger("chunksvc.services.webhooks")

SIGNATURE_HEADER = "Chunksvc-Signature"
SECRET_PREFIX = "whsec_"
KEY_BYTES = 32


class SigningKey:
    """The server's webhook signing key: every endpoint's secret is derived from it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ConfigError(f"the webhook signing key must be at least {KEY_BYTES} bytes")
        self._key = key
        # Names the key without revealing it: endpoints record which key derived their secret.
        self.key_id = hmac.new(key, b"chunksvc webhook key id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_hex(cls, text: str, source: str) -> SigningKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError:
            raise ConfigError(f"{source} must be hex (64 digits or more: `openssl rand -hex 32`)") from None

    @classmethod
    def load(cls, hex_key: str | None, key_file: Path, *, create: bool) -> SigningKey | None:
        """The key from ``CHUNKSVC_WEBHOOK_KEY`` if set, else from ``key_file``, which is made
        (mode 0600, a fresh random key) when absent and ``create`` says so; None when absent."""
        if hex_key:
            return cls.from_hex(hex_key, "CHUNKSVC_WEBHOOK_KEY")
        with contextlib.suppress(FileNotFoundError):
            return cls.from_hex(key_file.read_text("ascii"), str(key_file))
        if not create:
            return None
        key_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as written:
            written.write(secrets.token_hex(KEY_BYTES) + "\n")
            written.flush()
            os.fsync(written.fileno())
        try:
            # link, not rename: two processes creating it at once keep the first one's key.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, key_file)
        finally:
            temporary.unlink()
        # The directory too: a key lost to a power cut would strand every endpoint made with it.
        directory = os.open(key_file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        log.warning(
            "made a new webhook signing key in %s (set CHUNKSVC_WEBHOOK_KEY on every host to share one)", key_file
        )
        return cls.from_hex(key_file.read_text("ascii"), str(key_file))

    def secret(self, nonce: bytes) -> str:
        """The endpoint's secret: what its receiver verifies with (the whole string, as UTF-8)."""
        derived = hmac.new(self._key, b"chunksvc webhook secret\x00" + nonce, hashlib.sha256).digest()
        return SECRET_PREFIX + base64.urlsafe_b64encode(derived).decode("ascii").rstrip("=")


def sign(secrets_in_use: list[str], timestamp: int, body: bytes) -> str:
    """The ``Chunksvc-Signature`` header: ``t=<unix>,v1=<hex>``, one ``v1`` per secret in use
    (two only during a secret roll, the newest first)."""
    signed = str(timestamp).encode("ascii") + b"." + body
    signatures = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets_in_use]
    return ",".join([f"t={timestamp}", *(f"v1={signature}" for signature in signatures)])
