"""The peer clients the end-to-end tests drive (a pytest plugin): each prepared once per test
module, and a test that needs one skipped, saying why, where it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import tus_js as tus_js_client
from tools.peer_tus import PeerUnavailable


@pytest.fixture(scope="module")
def tus_js() -> Path:
    """The directory holding tus-js-client and its upload script (tools/tus_js.py)."""
    try:
        return tus_js_client.prepare()
    except PeerUnavailable as exc:
        print(f"tus-js-client unavailable: {exc}")
        pytest.skip(f"tus-js-client unavailable: {exc}")
