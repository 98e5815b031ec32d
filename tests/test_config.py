"""Configuration parsing: the trusted-proxy list and the client address it yields."""

from __future__ import annotations

import pytest

from chunksvc.config import Config, ServerSettings, TrustedProxies
from chunksvc.errors import ConfigError

LOOPBACK = TrustedProxies.parse("127.0.0.1,::1")


def test_an_untrusted_peer_is_the_client_whatever_it_claims():
    assert LOOPBACK.client_address("198.51.100.9", "203.0.113.7") == "198.51.100.9"


def test_a_trusted_proxy_reports_the_client():
    assert LOOPBACK.client_address("127.0.0.1", "203.0.113.7") == "203.0.113.7"
    assert LOOPBACK.client_address("::1", "2001:db8::5") == "2001:db8::5"


def test_without_the_header_the_peer_is_the_client():
    assert LOOPBACK.client_address("127.0.0.1", None) == "127.0.0.1"
    assert LOOPBACK.client_address("127.0.0.1", "") == "127.0.0.1"


def test_entries_a_client_wrote_left_of_the_first_untrusted_hop_are_ignored():
    # The caller sent "X-Forwarded-For: 10.9.9.9"; nginx appended the address it saw.
    assert LOOPBACK.client_address("127.0.0.1", "10.9.9.9, 203.0.113.7") == "203.0.113.7"


def test_a_chain_of_trusted_proxies_is_walked():
    proxies = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8")
    assert proxies.client_address("127.0.0.1", "203.0.113.7, 10.1.2.3") == "203.0.113.7"
    # Every hop trusted: the leftmost is the best anyone vouches for.
    assert proxies.client_address("127.0.0.1", "10.1.2.3, 10.4.5.6") == "10.1.2.3"


def test_garbage_in_the_header_stops_the_walk_at_the_last_address():
    assert LOOPBACK.client_address("127.0.0.1", "203.0.113.7, not-an-ip") == "127.0.0.1"
    assert LOOPBACK.client_address("127.0.0.1", "<script>, 203.0.113.7") == "203.0.113.7"


def test_star_trusts_every_peer_and_an_empty_list_none():
    assert TrustedProxies.parse("*").client_address("198.51.100.9", "203.0.113.7") == "203.0.113.7"
    assert TrustedProxies.parse("").client_address("127.0.0.1", "203.0.113.7") == "127.0.0.1"


def test_a_unix_socket_peer_is_never_trusted():
    assert LOOPBACK.client_address("unix:/run/chunksvc.sock", "203.0.113.7") == "unix:/run/chunksvc.sock"


@pytest.mark.parametrize("raw", ["nginx", "10.0.0.5/8", "300.1.1.1"])
def test_a_bad_entry_is_refused_at_start_up(raw):
    with pytest.raises(ConfigError, match="CHUNKSVC_FORWARDED_ALLOW_IPS"):
        TrustedProxies.parse(raw)


def test_the_environment_sets_the_list():
    config = Config.from_env({"CHUNKSVC_FORWARDED_ALLOW_IPS": "10.0.0.7", "CHUNKSVC_VAR_DIR": "/tmp/x"})
    assert config.trusted_proxies.trusts("10.0.0.7") and not config.trusted_proxies.trusts("127.0.0.1")
    assert Config.from_env({"CHUNKSVC_VAR_DIR": "/tmp/x"}).trusted_proxies == LOOPBACK


def test_server_settings_default_to_cores_plus_one_gthread_workers():
    settings = ServerSettings.from_env({}, cpu_count=2)
    assert (settings.worker_class, settings.workers, settings.threads, settings.timeout) == ("gthread", 3, 64, 30)
    assert settings.control_socket is None and settings.forwarded_allow_ips == "127.0.0.1,::1"
    assert ServerSettings.from_env({"CHUNKSVC_WORKER_CLASS": "sync"}, cpu_count=2).timeout == 900


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("CHUNKSVC_WORKERS", "three", "CHUNKSVC_WORKERS must be an integer"),
        ("CHUNKSVC_WORKERS", "0", "CHUNKSVC_WORKERS must be at least 1"),
        ("CHUNKSVC_THREADS", "-4", "CHUNKSVC_THREADS must be at least 1"),
        ("CHUNKSVC_WORKER_CLASS", "gevent", "CHUNKSVC_WORKER_CLASS must be one of gthread, sync"),
        ("CHUNKSVC_LOG_LEVEL", "loud", "CHUNKSVC_LOG_LEVEL must be one of"),
        ("CHUNKSVC_FORWARDED_ALLOW_IPS", "nginx", "CHUNKSVC_FORWARDED_ALLOW_IPS"),
    ],
)
def test_a_bad_server_setting_is_refused_by_name(name, raw, message):
    with pytest.raises(ConfigError, match=message):
        ServerSettings.from_env({name: raw})


def test_prepared_statements_are_off_unless_asked_for():
    """Off by default: behind a transaction-pooling PgBouncer (1.18) they break (chunksvc.db)."""
    base = {"CHUNKSVC_VAR_DIR": "/tmp/x"}
    assert Config.from_env(base).db_prepare_threshold is None
    assert Config.from_env({**base, "CHUNKSVC_DB_PREPARE_THRESHOLD": "none"}).db_prepare_threshold is None
    assert Config.from_env({**base, "CHUNKSVC_DB_PREPARE_THRESHOLD": "5"}).db_prepare_threshold == 5
    with pytest.raises(ConfigError, match="CHUNKSVC_DB_PREPARE_THRESHOLD"):
        Config.from_env({**base, "CHUNKSVC_DB_PREPARE_THRESHOLD": "-1"})


def test_the_lease_is_30_seconds_unless_set():
    base = {"CHUNKSVC_VAR_DIR": "/tmp/x"}
    assert Config.from_env(base).lease == 30
    assert Config.from_env({**base, "CHUNKSVC_LEASE": "2"}).lease == 2
    with pytest.raises(ConfigError, match="CHUNKSVC_LEASE"):
        Config.from_env({**base, "CHUNKSVC_LEASE": "0"})
