"""Unit tests of the pure upload rules and the session state machine (no database, no storage)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from chunksvc import errors
from chunksvc.config import Config, GiB, Limits, MiB, StorageSpec
from chunksvc.services import rules, states

LIMITS = Limits(min_part_size=5 * MiB, max_part_size=5 * GiB, default_part_size=8 * MiB, max_parts=10_000)


def body(**overrides):
    return {"filename": "backup.tar", "size": 100 * MiB, **overrides}


# --- create-session validation ----------------------------------------------------------------


def test_new_session_defaults():
    new = rules.validate_new_session(body(), LIMITS)
    assert (new.part_size, new.total_parts) == (8 * MiB, 13)
    assert new.content_type == "application/octet-stream"
    assert new.metadata == {} and new.sha256 is None


def test_default_part_size_is_raised_to_fit_max_parts():
    limits = Limits(min_part_size=1, default_part_size=1 * MiB, max_part_size=1 * GiB, max_parts=10)
    new = rules.validate_new_session(body(size=100 * MiB + 1), limits)
    assert new.total_parts <= 10
    assert new.part_size == 11 * MiB  # ceil((100 MiB + 1) / 10) rounded up to a whole MiB


def test_explicit_part_size_that_gives_too_many_parts():
    limits = Limits(min_part_size=1, default_part_size=1024, max_part_size=1 * GiB, max_parts=10)
    with pytest.raises(errors.TooManyParts):
        rules.validate_new_session(body(size=11 * 1024, part_size=1024), limits)


@pytest.mark.parametrize(
    "overrides",
    [
        {"filename": ""},
        {"filename": "x" * 1025},
        {"filename": "a\nb"},
        {"filename": "a\x00b"},
        {"filename": 7},
        {"size": 0},
        {"size": -5},
        {"size": "10"},
        {"size": True},
        {"size": 1.5},
        {"part_size": 1},  # below the minimum
        {"part_size": 6 * GiB},  # above the maximum
        {"part_size": "8"},
        {"sha256": "abc"},
        {"sha256": "g" * 64},
        {"metadata": {"a": 1}},
        {"metadata": {"a": {"b": "c"}}},
        {"metadata": ["a"]},
        {"metadata": {"k": "v" * 9000}},
        {"content_type": ""},
        {"content_type": "text/plain\r\nX: y"},
        {"colour": "blue"},
    ],
)
def test_invalid_create_bodies(overrides):
    with pytest.raises(errors.InvalidRequest):
        rules.validate_new_session(body(**overrides), LIMITS)


def test_missing_required_fields():
    for missing in ("filename", "size"):
        payload = body()
        del payload[missing]
        with pytest.raises(errors.InvalidRequest, match=missing):
            rules.validate_new_session(payload, LIMITS)


def test_body_must_be_object():
    with pytest.raises(errors.InvalidRequest):
        rules.validate_new_session(["filename"], LIMITS)


def test_upload_too_large():
    with pytest.raises(errors.UploadTooLarge):
        rules.validate_new_session(body(size=LIMITS.max_upload_size + 1), LIMITS)


def test_sha256_is_normalised_to_lowercase():
    new = rules.validate_new_session(body(sha256="AB" * 32), LIMITS)
    assert new.sha256 == "ab" * 32


def test_fingerprint_ignores_key_order_but_not_values():
    a = rules.request_fingerprint({"filename": "a", "size": 1})
    assert a == rules.request_fingerprint({"size": 1, "filename": "a"})
    assert a != rules.request_fingerprint({"filename": "a", "size": 2})


# --- part rules --------------------------------------------------------------------------------


def test_part_lengths():
    assert rules.part_length(10, 4, 1) == 4
    assert rules.part_length(10, 4, 2) == 4
    assert rules.part_length(10, 4, 3) == 2
    assert rules.part_length(8, 4, 2) == 4
    assert rules.total_parts(8, 4) == 2 and rules.total_parts(9, 4) == 3


@pytest.mark.parametrize(
    "raw", ["0", "4", "-1", "+1", "1.0", "abc", "", "٣", "1e2", "99999999999", "01", "001", " 1", "1 ", "1\n"]
)
def test_invalid_part_numbers(raw):
    with pytest.raises(errors.InvalidPartNumber):
        rules.parse_part_number(raw, 3)


def test_valid_part_numbers():
    assert [rules.parse_part_number(str(n), 3) for n in (1, 2, 3)] == [1, 2, 3]


def test_part_length_checks_in_contract_order():
    with pytest.raises(errors.LengthRequired):
        rules.check_part_length(None, 10, 4, 1)
    with pytest.raises(errors.PartTooLarge):
        rules.check_part_length("5", 10, 4, 1)
    with pytest.raises(errors.PartSizeMismatch):
        rules.check_part_length("3", 10, 4, 1)
    with pytest.raises(errors.PartSizeMismatch):
        rules.check_part_length("4", 10, 4, 3)  # the last part is 2 bytes
    with pytest.raises(errors.InvalidRequest):
        rules.check_part_length("four", 10, 4, 1)
    assert rules.check_part_length("2", 10, 4, 3) == 2


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_content_digest_parsing():
    sha256 = hashlib.sha256(b"hello").digest()
    sha512 = hashlib.sha512(b"hello").digest()
    header = f"sha-256=:{b64(sha256)}:"
    assert rules.parse_content_digest(header) == {"sha256": sha256}
    assert rules.parse_content_digest(f"sha-512=:{b64(sha512)}:") == {"sha512": sha512}
    assert rules.parse_content_digest(f"sha-512=:{b64(sha512)}:, {header}") == {"sha256": sha256, "sha512": sha512}
    assert rules.parse_content_digest(f"unixsum=:AAAA:, {header}") == {"sha256": sha256}
    assert rules.parse_content_digest(None) == {}
    for bad in (
        "sha-256=abc",
        "sha-256=:!!!:",
        f"sha-256=:{b64(b'short')}:",
        f"sha-512=:{b64(sha256)}:",  # a SHA-256 value under the sha-512 name
    ):
        with pytest.raises(errors.InvalidRequest):
            rules.parse_content_digest(bad)
    for unsupported in ("md5=:AAAA:", "unixsum=:AAAA:, crc32c=:AAAA:"):
        with pytest.raises(errors.UnsupportedDigest):
            rules.parse_content_digest(unsupported)


@pytest.mark.parametrize(
    "raw",
    [
        "3f1c2a9e-7b4d-4c1e-9a2b-0c3d4e5f6a7b",
    ],
)
def test_canonical_session_id(raw):
    assert str(rules.parse_session_id(raw)) == raw


@pytest.mark.parametrize(
    "raw",
    [
        "3F1C2A9E-7B4D-4C1E-9A2B-0C3D4E5F6A7B",  # upper case
        "3f1c2a9e7b4d4c1e9a2b0c3d4e5f6a7b",  # no dashes
        "{3f1c2a9e-7b4d-4c1e-9a2b-0c3d4e5f6a7b}",
        "urn:uuid:3f1c2a9e-7b4d-4c1e-9a2b-0c3d4e5f6a7b",
        " 3f1c2a9e-7b4d-4c1e-9a2b-0c3d4e5f6a7b",
        "3f1c2a9e-7b4d-4c1e-9a2b-0c3d4e5f6a7b\n",
        "not-a-uuid",
        "",
    ],
)
def test_other_spellings_of_a_session_id_are_not_found(raw):
    with pytest.raises(errors.SessionNotFound):
        rules.parse_session_id(raw)


@pytest.mark.parametrize(("raw", "expected"), [(None, 100), ("", 100), ("1", 1), ("1000", 1000)])
def test_bounded_int(raw, expected):
    assert rules.parse_bounded_int(raw, "limit", 100, 1, 1000) == expected


@pytest.mark.parametrize("raw", ["0", "1001", "-1", "x", "1.5", "01", "+5", " 5"])
def test_bounded_int_rejects(raw):
    with pytest.raises(errors.InvalidRequest):
        rules.parse_bounded_int(raw, "limit", 100, 1, 1000)


def test_idempotency_key_rules():
    assert rules.parse_idempotency_key(None) is None
    assert rules.parse_idempotency_key("k-1") == "k-1"
    for bad in ("", "x" * 256, "a\tb"):
        with pytest.raises(errors.InvalidRequest):
            rules.parse_idempotency_key(bad)


# --- state machine -----------------------------------------------------------------------------


def test_only_open_states_accept_parts():
    assert {s for s in states.ALL if states.accepts_parts(s)} == {states.INIT, states.IN_PROGRESS}


def test_every_state_has_a_row_in_the_transition_table():
    # What the rows allow is checked against the SQL itself, state by state, in tests/test_states.py.
    assert set(states.TRANSITIONS) == set(states.ALL)


# --- configuration -----------------------------------------------------------------------------


def test_config_from_env_defaults(tmp_path):
    config = Config.from_env({"CHUNKSVC_VAR_DIR": str(tmp_path)})
    assert config.database_url is None
    assert config.storage == StorageSpec(kind="file", root=tmp_path / "storage")
    assert config.bind == "127.0.0.1:8000"
    assert config.limits == Limits()


def test_config_parses_s3_urls():
    spec = StorageSpec.from_url("s3+http://AK:S%2FK@minio.local:9000/uploads")
    assert (spec.kind, spec.endpoint, spec.access_key, spec.secret_key, spec.bucket, spec.secure) == (
        "s3",
        "minio.local:9000",
        "AK",
        "S/K",
        "uploads",
        False,
    )
    assert StorageSpec.from_url("s3://a:b@host/bkt").secure is True
    assert "S/K" not in spec.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x/y",
        "file://relative/path",
        "s3://host:9000/bucket",
        "s3://a:b@host:9000/",
        "s3://a:b@h/b/c",
        "s3://a:b@host:9000/ab",
        "s3://a:b@host:9000/Upper_Case",
    ],
)
def test_config_rejects_bad_storage_urls(url):
    with pytest.raises(errors.ConfigError):
        StorageSpec.from_url(url)


@pytest.mark.parametrize(
    "env",
    [
        {"CHUNKSVC_MIN_PART_SIZE": "10", "CHUNKSVC_DEFAULT_PART_SIZE": "5"},
        {"CHUNKSVC_MAX_PARTS": "0"},
        {
            "CHUNKSVC_MAX_PARTS": "10",
            "CHUNKSVC_MAX_PART_SIZE": "100",
            "CHUNKSVC_MAX_UPLOAD_SIZE": "1001",
            "CHUNKSVC_MIN_PART_SIZE": "1",
            "CHUNKSVC_DEFAULT_PART_SIZE": "10",
        },
        {"CHUNKSVC_SESSION_TTL": "nope"},
    ],
)
def test_config_refuses_inconsistent_limits(env):
    with pytest.raises(errors.ConfigError):
        Config.from_env(env)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 0.0),
        ("wait=5", 5.0),
        ("respond-async, wait=7", 7.0),
        ('WAIT = "3"', 3.0),
        ("wait=100000", 20.0),  # capped
        ("wait=-1", 0.0),
        ("wait=soon", 0.0),
        ("wait=\u00b2", 0.0),  # a digit to str.isdigit, not to RFC 7240
        ("return=minimal", 0.0),
        ("wait", 0.0),
    ],
)
def test_prefer_wait_is_read_capped_and_a_malformed_one_ignored(header, seconds):
    assert rules.parse_prefer_wait(header, 20) == seconds
