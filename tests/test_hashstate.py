"""The resumable SHA-256 (chunksvc.hashstate) that the hash frontier saves and resumes: its states
carried across instances give hashlib's digests, for every split of the input."""

from __future__ import annotations

import hashlib
import os

import pytest

from chunksvc import hashstate

pytestmark = pytest.mark.skipif(not hashstate.available(), reason="no libcrypto with SHA-256 here")


@pytest.mark.parametrize("cut", [0, 1, 55, 56, 63, 64, 65, 1000, 4095])
def test_a_state_saved_at_any_byte_resumes_to_hashlibs_digest(cut):
    data = os.urandom(4096)
    first = hashstate.ResumableSha256()
    first.update(data[:cut])
    resumed = hashstate.ResumableSha256(first.state())
    resumed.update(memoryview(bytearray(data[cut:])))  # writable buffers and bytes alike
    assert resumed.hexdigest() == hashlib.sha256(data).hexdigest()
    assert first.hexdigest() == hashlib.sha256(data[:cut]).hexdigest()  # the original is untouched


def test_hexdigest_does_not_end_the_hash():
    sha = hashstate.ResumableSha256()
    sha.update(b"abc")
    assert sha.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    sha.update(b"def")
    assert sha.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


def test_a_state_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="112 bytes"):
        hashstate.ResumableSha256(b"\0" * 32)
