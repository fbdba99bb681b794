"""Server configuration: etcd-style defaults and refusals with readable reasons."""
from __future__ import annotations

import pytest

from metastore.config import ConfigError, ServerConfig


def test_defaults_are_a_single_loopback_member():
    cfg = ServerConfig().resolved()
    assert cfg.name == "default" and cfg.engine == "memory"
    assert cfg.data_dir == "default.metastore"
    assert cfg.listen_client_urls == ["http://127.0.0.1:2379"]
    assert cfg.advertise_client_urls == ["http://127.0.0.1:2379"]
    assert cfg.listen_peer_urls == ["http://127.0.0.1:2380"]
    assert cfg.initial_members() == {"default": ["http://127.0.0.1:2380"]}


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(listen_peer_urls=["http://0.0.0.0:2380"]), "without a cluster secret"),
    (dict(listen_peer_urls=["http://10.1.2.3:2380"]), "without a cluster secret"),
    (dict(initial_cluster="other=http://127.0.0.1:2380"), "no entry for this member"),
    (dict(initial_cluster="default=http://127.0.0.1:9999"), "must match"),
    (dict(initial_cluster="default"), "expected name=http://host:port"),
    (dict(listen_client_urls=["127.0.0.1:2379"]), "expected http://host:port"),
    (dict(engine="leveldb"), "--engine must be one of"),
    (dict(listen_client_http_urls=["http://127.0.0.1:2379"]), "the JSON gateway needs a port of its own"),
    (dict(listen_client_http_urls=["http://127.0.0.1:2381"]), "the JSON gateway needs a port of its own"),
    (dict(heartbeat_interval_ms=500, election_timeout_ms=1000), "at least 5x"),
    (dict(listen_peer_urls=["http://[::1]:2380"], initial_advertise_peer_urls=["http://[::1]:2380"]),
     "IPv6 addresses are not supported"),
])
def test_bad_configs_are_refused_with_a_reason(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        ServerConfig(**kwargs).resolved()
    assert fragment in str(info.value)


def test_peer_port_beyond_loopback_is_allowed_with_a_secret():
    cfg = ServerConfig(listen_peer_urls=["http://0.0.0.0:2380"], peer_secret="s3cret").resolved()
    assert cfg.peer_secret == "s3cret"


def test_request_timeout_follows_etcds_rule():
    """etcd waits 5 s plus two election timeouts for Raft before "request timed out"."""
    assert ServerConfig().resolved().request_timeout == 7.0
    assert ServerConfig(election_timeout_ms=2500).resolved().request_timeout == 10.0
    assert ServerConfig(request_timeout=3.0).resolved().request_timeout == 3.0
