"""Completion events: webhook endpoints, their signing secrets, and delivery from the outbox.

The outbox is written by PostgreSQL itself (the trigger of migration 0005): every change of a
session to ``COMPLETED``, ``FAILED``, ``ABORTED`` or ``EXPIRED`` adds, in the same transaction,
one event and one pending delivery per endpoint of its client. These modules read that outbox:

- ``webhook_signing``: the server's ``SigningKey``, each endpoint's secret derived from it (never
  stored), and ``sign``, the ``Chunksvc-Signature`` header.
- ``webhook_registry``: ``WebhookRegistry``, the ops commands (add, list, remove, rotate a secret,
  redeliver).
- ``webhook_deliverer``: ``WebhookDeliverer``, which claims due deliveries, signs and sends each,
  and records the outcome (retries with backoff, then dead).
- ``webhook_post``: ``post``, one attempt on the wire within its deadline.

Sibling modules rather than a package: the layering check (tests/test_house.py) reads
``services/*.py``. This module keeps the names callers have always imported from it.
"""

from __future__ import annotations

from chunksvc.services.webhook_deliverer import (
    FAILURE_MEMORY,
    DeliveryCounts,
    DeliverySettings,
    EventRenderer,
    WebhookDeliverer,
)
from chunksvc.services.webhook_post import post
from chunksvc.services.webhook_registry import MAX_URL_LENGTH, WebhookRegistry, validate_url
from chunksvc.services.webhook_signing import KEY_BYTES, SECRET_PREFIX, SIGNATURE_HEADER, SigningKey, sign

__all__ = [
    "FAILURE_MEMORY",
    "KEY_BYTES",
    "MAX_URL_LENGTH",
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "DeliveryCounts",
    "DeliverySettings",
    "EventRenderer",
    "SigningKey",
    "WebhookDeliverer",
    "WebhookRegistry",
    "post",
    "sign",
    "validate_url",
]
