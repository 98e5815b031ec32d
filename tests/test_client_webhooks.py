"""verify_event, the receiver's side of a completion event: the signature by any secret in use,
the replay window, and every way a header or body can be wrong. Pure functions: no server."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from chunksvc_client import SignatureError, verify_event

SECRET = "whsec_current"
OLD_SECRET = "whsec_previous"
NOW = 1_800_000_000
BODY = json.dumps(
    {"id": "0b7d0c4e-3f39-4b8e-9a51-5a4b1d1c2e3f", "type": "session.completed", "created_at": "x", "session": {}},
    separators=(",", ":"),
).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def header(timestamp: int = NOW, *secrets: str, body: bytes = BODY) -> str:
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets or (SECRET,))])


def test_a_valid_signature_returns_the_parsed_event():
    event = verify_event(BODY, header(), [SECRET], now=NOW)
    assert event == json.loads(BODY)


def test_either_secret_of_a_roll_verifies_and_either_signature_is_accepted():
    both = header(NOW, SECRET, OLD_SECRET)  # what the server sends during a roll
    assert verify_event(BODY, both, [SECRET], now=NOW)["type"] == "session.completed"
    assert verify_event(BODY, both, [OLD_SECRET], now=NOW)["type"] == "session.completed"
    # A receiver mid-roll holds both secrets; a sender that signs with one of them is accepted.
    assert verify_event(BODY, header(NOW, OLD_SECRET), [SECRET, OLD_SECRET], now=NOW)
    assert verify_event(BODY, header(NOW, SECRET), [SECRET, OLD_SECRET], now=NOW)


def test_spaces_after_commas_are_tolerated():
    spaced = header().replace(",", ", ")
    assert verify_event(BODY, spaced, [SECRET], now=NOW)


@pytest.mark.parametrize(
    "body",
    [
        BODY.replace(b"completed", b"failed"),  # a changed byte
        BODY + b" ",  # a byte added: the signature covers the raw body, not its JSON value
        BODY[:-1],
    ],
)
def test_a_tampered_body_is_refused(body):
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_event(body, header(), [SECRET], now=NOW)


def test_a_wrong_secret_is_refused():
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_event(BODY, header(), ["whsec_other"], now=NOW)
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_event(BODY, header(), [], now=NOW)


def test_the_timestamp_is_signed_too():
    """Moving ``t`` into the window (a replayed capture made fresh) breaks the signature."""
    old = header(NOW - 3600)
    forged = old.replace(f"t={NOW - 3600}", f"t={NOW}")
    with pytest.raises(SignatureError, match="no signature matches"):
        verify_event(BODY, forged, [SECRET], now=NOW)


def test_the_replay_window():
    assert verify_event(BODY, header(NOW - 300), [SECRET], now=NOW)  # the edge is inside
    assert verify_event(BODY, header(NOW + 300), [SECRET], now=NOW)  # a receiver's clock behind
    with pytest.raises(SignatureError, match="more than 300 s from now"):
        verify_event(BODY, header(NOW - 301), [SECRET], now=NOW)
    with pytest.raises(SignatureError, match="more than 300 s from now"):
        verify_event(BODY, header(NOW + 301), [SECRET], now=NOW)
    assert verify_event(BODY, header(NOW - 3000), [SECRET], now=NOW, tolerance=3600)
    with pytest.raises(SignatureError, match="more than 10 s"):
        verify_event(BODY, header(NOW - 11), [SECRET], now=NOW, tolerance=10)


def test_now_defaults_to_the_clock():
    import time

    assert verify_event(BODY, header(int(time.time())), [SECRET])
    with pytest.raises(SignatureError, match="from now"):
        verify_event(BODY, header(NOW - 10**6), [SECRET])


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        f"v1={signature(SECRET, NOW, BODY)}",  # no t=
        f"t={NOW}",  # no v1=
        f"t=-{NOW},v1={signature(SECRET, NOW, BODY)}",  # not a number
        f"t={NOW}.5,v1={signature(SECRET, NOW, BODY)}",
        f"t=,v1={signature(SECRET, NOW, BODY)}",
        "garbage",
    ],
)
def test_a_missing_or_malformed_header_is_refused(bad):
    with pytest.raises(SignatureError):
        verify_event(BODY, bad, [SECRET], now=NOW)


def test_a_non_ascii_digit_in_t_is_a_signature_error():
    with pytest.raises(SignatureError):
        verify_event(BODY, f"t=\u00b2,v1={signature(SECRET, NOW, BODY)}", [SECRET], now=NOW)


def test_an_unknown_scheme_is_ignored_not_accepted():
    """Only v1 signatures count: a v0 (say, of a weaker scheme) does not verify on its own."""
    only_v0 = f"t={NOW},v0={signature(SECRET, NOW, BODY)}"
    with pytest.raises(SignatureError):
        verify_event(BODY, only_v0, [SECRET], now=NOW)
    assert verify_event(BODY, f"t={NOW},v0=abc,v1={signature(SECRET, NOW, BODY)}", [SECRET], now=NOW)


def test_signature_error_is_a_value_error():
    assert issubclass(SignatureError, ValueError)
