"""The peer clients the end-to-end tests drive (a pytest plugin): each prepared once per test
module, and a test that needs one skipped, saying why, where it cannot be."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tools import tus_js as tus_js_client
from tools.peer_tus import PeerUnavailable


def prepared_or_skipped(prepare: Callable[[], Path], what: str) -> Path:
    """What ``prepare`` made ready; where it cannot (no node, npm, Chromium...), the test is
    skipped and the reason printed, so a run's output says what it did not test."""
    try:
        return prepare()
    except PeerUnavailable as exc:
        print(f"{what} unavailable: {exc}")
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="module")
def tus_js() -> Path:
    """The directory holding tus-js-client and its upload script (tools/tus_js.py)."""
    return prepared_or_skipped(tus_js_client.prepare, "tus-js-client")
