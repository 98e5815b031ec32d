"""Receiving chunksvc's completion events: check the ``Chunksvc-Signature`` of a webhook POST.

    event = verify_event(request_body, request.headers["Chunksvc-Signature"], [secret])

``secrets``: the endpoint's secrets in use (during a roll, the new one and the old one: either
signature is accepted). The signature covers ``"<t>.<raw body>"``; an event signed more than
``tolerance`` seconds from now is refused (a replayed capture). The event's ``id`` is the same on
every retry: a receiver deduplicates by it (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

DEFAULT_TOLERANCE = 300  # seconds


class SignatureError(ValueError):
    """The event is not chunksvc's, was altered, or is too old (or too new) to accept."""


def verify_event(
    body: bytes,
    header: str | None,
    secrets: list[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """The event (parsed JSON) when ``header`` is a valid signature of ``body`` by one of
    ``secrets`` made within ``tolerance`` seconds of ``now``; else ``SignatureError``."""
    if not header:
        raise SignatureError("no Chunksvc-Signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():  # isdigit alone takes "²"
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("the Chunksvc-Signature header has no t= or no v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(f"signed at {timestamp}, more than {tolerance:g} s from now")
    signed = str(timestamp).encode("ascii") + b"." + body
    expected = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets]
    if not any(hmac.compare_digest(mine, theirs) for mine in expected for theirs in signatures):
        raise SignatureError("no signature matches a secret in use")
    event: dict[str, Any] = json.loads(body)
    return event
