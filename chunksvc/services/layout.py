"""Where the service keeps an upload's bytes: the one statement of its storage key layout.

    parts/<session id>/<uuid>      one part's stored body (a fresh key per request)
    parts/<session id>/assembly    the parts written in place, at their offsets (local storage)
    parts/<session id>/piece-<n>   a part sent straight into the session's staging as its piece
                                   number n (S3): no object of its own, the name of where its
                                   bytes are (``services.pieces``), and of its local copy (``Spill``)
    objects/<session id>           the assembled object (on local storage, the same file linked;
                                   on S3, while the parts arrive, also the key of the session's
                                   staging, a multipart upload: ``services.staging``)

Stored data depends on these names: completion, abort and the reaper find a session's bytes
only under them, so changing the layout orphans every existing upload's bytes (a change needs a
migration of the stored keys, not just of this module). Storage adapters do not know it: they
store bytes under whatever keys they are given, and are told the prefixes the service owns
where they need them (``Storage.sweep_incomplete``).
"""

from __future__ import annotations

import uuid
from uuid import UUID

# A session id is a UUID, or its canonical text (as the API and the database spell it).
PARTS = "parts/"
OBJECTS = "objects/"
#: Every prefix the service writes under; anything else in a bucket is not the service's.
PREFIXES = (PARTS, OBJECTS)


def part_key(session_id: UUID | str) -> str:
    """A fresh key per incoming body: a retry or a conflicting upload never overwrites a part."""
    return f"{parts_prefix(session_id)}{uuid.uuid4()}"


def assembly_key(session_id: UUID | str) -> str:
    """The one file of the session's parts written in place: each part at its offset, shared by
    their rows (``InPlace``); it becomes the object at completion. Never a fresh part key (those
    are UUIDs)."""
    return f"{parts_prefix(session_id)}assembly"


_PIECE = "piece-"


def piece_key(session_id: UUID | str, number: int) -> str:
    """Where a part sent as piece ``number`` of the session's staging is (never a stored key:
    fresh part keys are UUIDs)."""
    return f"{parts_prefix(session_id)}{_PIECE}{number:05d}"


def piece_number(key: str) -> int | None:
    """The piece a part's key names (``piece_key``); None for a key of stored bytes."""
    name = key.rsplit("/", 1)[-1]
    if not name.startswith(_PIECE) or not name.removeprefix(_PIECE).isdigit():
        return None
    return int(name.removeprefix(_PIECE))


def parts_prefix(session_id: UUID | str) -> str:
    """The prefix every part key of the session starts with (ends with ``/``)."""
    return f"{PARTS}{session_id}/"


def object_key(session_id: UUID | str) -> str:
    """The key of the session's assembled object."""
    return f"{OBJECTS}{session_id}"


def session_of(key: str) -> UUID | None:
    """The session a stored key belongs to; None for a key outside the layout."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            try:
                return UUID(key.removeprefix(prefix).split("/", 1)[0])
            except ValueError:
                return None
    return None
