"""The storage key layout (``chunksvc.services.layout``), pinned literally: stored bytes are
found only under these names, so a change here would orphan every existing upload's bytes."""

from __future__ import annotations

import re
import uuid

from chunksvc.services import layout
from chunksvc.storage.base import valid_key

SESSION = uuid.UUID("3f1c2a9e-5b7d-4c1e-9a2b-6d8e0f1a2b3c")


def test_the_layout_is_the_one_existing_data_was_stored_under() -> None:
    assert layout.PREFIXES == ("parts/", "objects/")
    assert layout.parts_prefix(SESSION) == "parts/3f1c2a9e-5b7d-4c1e-9a2b-6d8e0f1a2b3c/"
    assert layout.object_key(SESSION) == "objects/3f1c2a9e-5b7d-4c1e-9a2b-6d8e0f1a2b3c"
    key = layout.part_key(SESSION)
    assert re.fullmatch(r"parts/3f1c2a9e-5b7d-4c1e-9a2b-6d8e0f1a2b3c/[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", key)


def test_every_part_gets_a_fresh_valid_key() -> None:
    keys = {layout.part_key(SESSION) for _ in range(100)}
    assert len(keys) == 100
    assert all(valid_key(key) and key.startswith(layout.parts_prefix(SESSION)) for key in keys)
    assert valid_key(layout.object_key(SESSION))


def test_a_key_names_its_session() -> None:
    assert layout.session_of(layout.part_key(SESSION)) == SESSION
    assert layout.session_of(layout.object_key(SESSION)) == SESSION
    for foreign in ("parts/not-a-session/x", "objects/not-a-session", "backups/x", f"other/{SESSION}", ""):
        assert layout.session_of(foreign) is None, foreign
