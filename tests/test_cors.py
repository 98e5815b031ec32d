"""CORS (contract v1.2, ``CHUNKSVC_CORS_ORIGINS``): preflights answered without credentials, every
answer to an allowed origin readable by its page (errors too), nothing for any other origin, and
nothing at all when no origin is configured. Through webtest on a real PostgreSQL and directory;
tests/test_nginx.py shows a preflight and an exposed header through the shipped nginx."""

from __future__ import annotations

import dataclasses

import pytest
import webtest

from chunksvc.app import create_app
from chunksvc.config import Config, CorsOrigins, Quotas
from chunksvc.errors import ConfigError
from tests.helpers import create, payload, put_part

PORTAL = "https://portal.example.com"
STRANGER = "https://evil.example.net"
TUS = {"Tus-Resumable": "1.0.0"}

# The contract's lists (v1.2): the service's may be longer, never shorter.
CONTRACT_ALLOW_HEADERS = {
    "authorization",
    "content-type",
    "content-digest",
    "idempotency-key",
    "x-request-id",
    "tus-resumable",
    "upload-length",
    "upload-offset",
    "upload-metadata",
    "upload-checksum",
    "upload-concat",
    "x-http-method-override",
}
CONTRACT_EXPOSE_HEADERS = {
    "location",
    "etag",
    "retry-after",
    "x-request-id",
    "upload-offset",
    "upload-length",
    "upload-expires",
    "upload-metadata",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "tus-checksum-algorithm",
}


@pytest.fixture
def storage_spec(file_spec):
    return file_spec  # CORS is the same whatever the storage


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, cors=CorsOrigins.parse(f"{PORTAL}, https://admin.example.com:8443"))


def _listed(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",") if item.strip()}


def _cors_headers(response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


def _preflight(app, path: str, origin: str = PORTAL, method: str = "PUT", status: int | str = 204):
    return app.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type,content-digest",
        },
        status=status,
    )


def _assert_readable_by(response, origin: str) -> None:
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in [v.strip() for v in response.headers.get("Vary", "").split(",")]
    assert _listed(response.headers["Access-Control-Expose-Headers"]) >= CONTRACT_EXPOSE_HEADERS


# --- configuration --------------------------------------------------------------------------------


def test_the_setting_parses_exact_origins_a_star_or_nothing():
    assert not CorsOrigins.parse("").enabled
    assert not Config.from_env({}).cors.enabled
    listed = Config.from_env({"CHUNKSVC_CORS_ORIGINS": f" {PORTAL} ,http://127.0.0.1:5173,"}).cors
    assert listed.allows(PORTAL) and listed.allows("http://127.0.0.1:5173")
    # Exact: another scheme, port or case is another origin.
    assert not listed.allows("http://portal.example.com")
    assert not listed.allows("https://portal.example.com:444")
    assert not listed.allows("https://PORTAL.example.com")
    assert not listed.allows(None) and not listed.allows("")
    star = CorsOrigins.parse("*")
    assert star.allows(STRANGER) and not star.allows(None)


@pytest.mark.parametrize(
    "raw", [f"{PORTAL}/", f"{PORTAL}/app", "portal.example.com", "ftp://portal.example.com", f"*,{PORTAL}"]
)
def test_a_setting_that_names_no_origin_stops_the_start(raw):
    with pytest.raises(ConfigError, match="CHUNKSVC_CORS_ORIGINS"):
        Config.from_env({"CHUNKSVC_CORS_ORIGINS": raw})


# --- preflights -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, method",
    [
        ("/uploads/sessions", "POST"),
        ("/uploads/sessions/00000000-0000-4000-8000-000000000000/parts/1", "PUT"),
        ("/uploads/sessions/00000000-0000-4000-8000-000000000000", "DELETE"),
        ("/tus/", "POST"),
        ("/tus/00000000-0000-4000-8000-000000000000", "PATCH"),
        ("/uploads/no/such/route", "GET"),
    ],
)
def test_a_preflight_from_an_allowed_origin_is_204_without_credentials(app, path, method):
    response = _preflight(app, path, method=method)
    assert response.headers["Access-Control-Allow-Origin"] == PORTAL
    assert method.lower() in _listed(response.headers["Access-Control-Allow-Methods"])
    assert _listed(response.headers["Access-Control-Allow-Headers"]) >= CONTRACT_ALLOW_HEADERS
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert response.headers["X-Request-ID"]
    assert response.body == b""


def test_each_listed_origin_gets_its_own_name_back(app):
    other = "https://admin.example.com:8443"
    assert _preflight(app, "/tus/", origin=other).headers["Access-Control-Allow-Origin"] == other


def test_a_preflight_from_another_origin_gets_no_cors_header(app):
    # It goes on as a plain OPTIONS: /uploads wants credentials (401), /tus/ answers tus discovery.
    refused = _preflight(app, "/uploads/sessions", origin=STRANGER, status=401)
    assert _cors_headers(refused) == {}
    discovery = _preflight(app, "/tus/", origin=STRANGER, status=204)
    assert _cors_headers(discovery) == {} and discovery.headers["Tus-Version"] == "1.0.0"


def test_a_plain_options_without_a_request_method_is_no_preflight(app):
    # No Access-Control-Request-Method: an ordinary OPTIONS, authenticated as any /uploads request.
    response = app.options("/uploads/sessions", headers={"Origin": PORTAL}, status=401)
    assert response.json["code"] == "unauthorized"
    assert "Access-Control-Allow-Methods" not in response.headers
    _assert_readable_by(response, PORTAL)


# --- every other answer -------------------------------------------------------------------------------


def test_successes_to_an_allowed_origin_are_readable_with_their_headers(app, auth):
    origin = {"Origin": PORTAL}
    data = payload(10)
    created = create(app, auth, headers=origin, size=len(data), part_size=len(data))
    _assert_readable_by(created, PORTAL)
    assert created.headers["Location"] == f"/uploads/sessions/{created.json['id']}"
    part = put_part(app, {**auth, **origin}, created.json["id"], 1, data)
    _assert_readable_by(part, PORTAL)
    assert part.headers["ETag"]

    tus = app.post("/tus/", headers={**auth, **origin, **TUS, "Upload-Length": "5"}, status=201)
    _assert_readable_by(tus, PORTAL)
    head = app.head(tus.headers["Location"], headers={**auth, **origin, **TUS}, status=200)
    _assert_readable_by(head, PORTAL)
    assert head.headers["Upload-Offset"] == "0"


def test_errors_to_an_allowed_origin_are_readable_too(app, auth, config, db, storage):
    origin = {"Origin": PORTAL}
    unauthorized = app.get("/uploads/sessions", headers=origin, status=401)
    assert unauthorized.json["code"] == "unauthorized"
    _assert_readable_by(unauthorized, PORTAL)
    missing = app.get("/uploads/sessions/00000000-0000-4000-8000-000000000000", headers={**auth, **origin}, status=404)
    assert missing.json["code"] == "session_not_found"
    _assert_readable_by(missing, PORTAL)
    unrouted = app.get("/uploads/no/such/route", headers={**auth, **origin}, status=404)
    _assert_readable_by(unrouted, PORTAL)
    tus_version = app.post("/tus/", headers={**auth, **origin, "Upload-Length": "5"}, status=412)
    _assert_readable_by(tus_version, PORTAL)

    limited = webtest.TestApp(
        create_app(dataclasses.replace(config, quotas=Quotas(sessions=0, bytes=100)), db=db, storage=storage)
    )
    over_quota = create(limited, auth, status=429, headers=origin, size=10)
    assert over_quota.json["code"] == "quota_exceeded"
    _assert_readable_by(over_quota, PORTAL)


def test_answers_outside_the_api_carry_the_headers_as_well(app):
    _assert_readable_by(app.get("/healthz", headers={"Origin": PORTAL}), PORTAL)


def test_another_origin_or_none_gets_no_cors_header_but_the_cache_is_told(app, auth):
    for headers in ({**auth, "Origin": STRANGER}, auth, {**auth, "Origin": "null"}):
        response = app.get("/uploads/sessions", headers=headers, status=200)
        assert _cors_headers(response) == {}
        # The answer differs by Origin: a shared cache must not give this one to the portal.
        assert "Origin" in response.headers.get("Vary", "")


def test_a_star_allows_any_origin_by_its_name(config, db, storage, auth):
    anyone = webtest.TestApp(
        create_app(dataclasses.replace(config, cors=CorsOrigins.parse("*")), db=db, storage=storage)
    )
    assert _preflight(anyone, "/tus/", origin=STRANGER).headers["Access-Control-Allow-Origin"] == STRANGER
    _assert_readable_by(anyone.get("/uploads/sessions", headers={**auth, "Origin": STRANGER}), STRANGER)


def test_without_origins_configured_no_answer_has_a_cors_header(config, db, storage, auth):
    plain = webtest.TestApp(create_app(dataclasses.replace(config, cors=CorsOrigins()), db=db, storage=storage))
    preflight = _preflight(plain, "/uploads/sessions", status=401)  # an ordinary OPTIONS: credentials first
    assert _cors_headers(preflight) == {}
    listed = plain.get("/uploads/sessions", headers={**auth, "Origin": PORTAL})
    assert _cors_headers(listed) == {} and "Vary" not in listed.headers
