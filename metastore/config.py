"""Server configuration: etcd's flags as one validated value object.

`metastore serve` builds it from the command line; `metastore.testing` and
embedders build it directly. Validation happens here, once, with messages a
person can act on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from metastore import cluster

DEFAULT_CLIENT_URL = "http://127.0.0.1:2379"
DEFAULT_PEER_URL = "http://127.0.0.1:2380"
# etcd's default --listen-metrics-urls is empty (metrics on the client port);
# metastore's client port speaks gRPC only, so it serves them on etcd's
# conventional metrics port instead -- but only for the default single-member
# setup, see `ServerConfig.resolved`.
DEFAULT_METRICS_URL = "http://127.0.0.1:2381"
ENGINES = ("memory", "rocksdb")


class ConfigError(ValueError):
    """A configuration a server cannot start with; the message says why."""


@dataclass
class ServerConfig:
    name: str = "default"
    data_dir: str = ""  # "" -> "<name>.metastore", like etcd's "<name>.etcd"
    listen_client_urls: list[str] = field(default_factory=lambda: [DEFAULT_CLIENT_URL])
    advertise_client_urls: list[str] = field(default_factory=list)  # [] -> listen_client_urls
    listen_peer_urls: list[str] = field(default_factory=lambda: [DEFAULT_PEER_URL])
    # Where the HTTP listener serves /metrics, /health and /version. None: the
    # default (DEFAULT_METRICS_URL when the client URLs are the default ones,
    # else none); []: no HTTP listener.
    listen_metrics_urls: list[str] | None = None
    # Where etcd's JSON gateway (POST /v3/kv/range, ...: api/gateway.py) is
    # served over plain HTTP; etcd 3.5's flag. [] (the default): nowhere.
    listen_client_http_urls: list[str] = field(default_factory=list)
    initial_advertise_peer_urls: list[str] = field(default_factory=lambda: [DEFAULT_PEER_URL])
    initial_cluster: str = ""  # "" -> "<name>=<initial_advertise_peer_urls>"
    initial_cluster_token: str = "metastore-cluster"
    initial_cluster_state: str = "new"
    engine: str = "memory"
    # Shared secret of the cluster's members; encrypts and authenticates the
    # Raft peer port. Required when peers listen beyond loopback.
    peer_secret: str | None = None
    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000
    max_request_bytes: int = 1536 * 1024
    # Backend size at which the NOSPACE alarm is raised (etcd's flag): 0 is
    # etcd's default of 2 GiB, a negative value disables the quota.
    quota_backend_bytes: int = 0
    # Seconds a request may wait for Raft; 0: etcd's rule, 5 s plus two
    # election timeouts (a leader change or a long apply fits in it).
    request_timeout: float = 0.0
    # Applied requests between snapshots (after which the Raft log is
    # trimmed): etcd's flag, meaning and default.
    snapshot_count: int = 100_000
    # Acknowledge writes before they are fsynced: for tests and benchmarks
    # only -- a power loss can then lose acknowledged writes.
    unsafe_no_fsync: bool = False
    # Placement and drain (metastore.placement): seconds a member may go
    # without heartbeat before it counts as offline (at least the minimum
    # lease TTL); drain moves in flight at once; seconds a destination has
    # to accept a move before the workload is placed elsewhere.
    session_ttl: int = 5
    drain_batch_size: int = 1
    workload_move_timeout: float = 30.0

    def resolved(self) -> "ServerConfig":
        """A copy with defaults filled in and everything checked."""
        cfg = ServerConfig(**self.__dict__)
        cfg.data_dir = cfg.data_dir or f"{cfg.name}.metastore"
        cfg.advertise_client_urls = cfg.advertise_client_urls or list(cfg.listen_client_urls)
        if cfg.listen_metrics_urls is None:
            # Several members on one machine each need their own client URL,
            # so at most one of them keeps the default one: only that member
            # takes the default metrics port, and the others never collide on
            # it. A member with its own client URLs serves metrics only where
            # --listen-metrics-urls says.
            default = cfg.listen_client_urls == [DEFAULT_CLIENT_URL]
            cfg.listen_metrics_urls = [DEFAULT_METRICS_URL] if default else []
        else:
            cfg.listen_metrics_urls = list(cfg.listen_metrics_urls)
        if not cfg.initial_cluster:
            cfg.initial_cluster = ",".join(f"{cfg.name}={u}" for u in cfg.initial_advertise_peer_urls)
        if cfg.request_timeout <= 0:
            cfg.request_timeout = 5.0 + 2 * cfg.election_timeout_ms / 1000
        cfg._validate()
        return cfg

    def initial_members(self) -> dict[str, list[str]]:
        return cluster.parse_initial_cluster(self.initial_cluster)

    def _validate(self) -> None:
        if not self.name:
            raise ConfigError("--name must not be empty")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.initial_cluster_state not in ("new", "existing"):
            raise ConfigError("--initial-cluster-state must be 'new' or 'existing'")
        try:
            for url in (self.listen_client_urls + self.advertise_client_urls + self.listen_peer_urls
                        + self.initial_advertise_peer_urls + (self.listen_metrics_urls or [])
                        + self.listen_client_http_urls):
                cluster.hostport(url)
            members = self.initial_members()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.listen_client_urls:
            raise ConfigError("--listen-client-urls must name at least one URL")
        if len(self.listen_peer_urls) != 1:
            raise ConfigError("--listen-peer-urls takes exactly one URL (the Raft transport binds one address)")
        taken = {cluster.hostport(u): flag for flag, urls in (("--listen-client-urls", self.listen_client_urls),
                                                              ("--listen-peer-urls", self.listen_peer_urls))
                 for u in urls}
        for url in self.listen_metrics_urls or []:
            if cluster.hostport(url) in taken:
                raise ConfigError(f"--listen-metrics-urls {url} is also in {taken[cluster.hostport(url)]}; "
                                  f"the metrics listener needs a port of its own")
        taken.update({cluster.hostport(u): "--listen-metrics-urls" for u in self.listen_metrics_urls or []})
        for url in self.listen_client_http_urls:
            if cluster.hostport(url) in taken:
                raise ConfigError(f"--listen-client-http-urls {url} is also in {taken[cluster.hostport(url)]}; "
                                  f"the JSON gateway needs a port of its own")
        peer_urls = self.listen_peer_urls + self.initial_advertise_peer_urls + [
            u for urls in members.values() for u in urls]
        for url in peer_urls:
            if ":" in (urlsplit(url).hostname or ""):
                # pysyncobj splits node addresses at the first ':'.
                raise ConfigError(f"peer URL {url}: IPv6 addresses are not supported for the Raft "
                                  f"peer transport; use an IPv4 address or a host name")
        if self.name not in members:
            raise ConfigError(f"--initial-cluster has no entry for this member's --name {self.name!r}")
        mine = sorted(cluster.hostport(u) for u in members[self.name])
        advertised = sorted(cluster.hostport(u) for u in self.initial_advertise_peer_urls)
        if mine != advertised:
            raise ConfigError(
                f"--initial-cluster has {self.name}={','.join(members[self.name])} but "
                f"--initial-advertise-peer-urls is {','.join(self.initial_advertise_peer_urls)}; they must match")
        if not self.peer_secret and not all(cluster.is_loopback(u) for u in self.listen_peer_urls):
            raise ConfigError(
                "refusing to listen for peers beyond loopback without a cluster secret: the Raft peer "
                "protocol runs pickled messages, so anyone who reaches the port could run code here. "
                "Set --peer-secret-file (or METASTORE_PEER_SECRET) to the same secret on every member.")
        if self.heartbeat_interval_ms <= 0 or self.election_timeout_ms < 5 * self.heartbeat_interval_ms:
            raise ConfigError("--election-timeout must be at least 5x --heartbeat-interval (both in ms)")
        if self.snapshot_count < 100:
            raise ConfigError("--snapshot-count must be at least 100")
        if self.session_ttl < 1:
            raise ConfigError("--session-ttl must be at least 1 (seconds)")
        if self.drain_batch_size < 1:
            raise ConfigError("--drain-batch-size must be at least 1")
        if self.workload_move_timeout <= 0:
            raise ConfigError("--workload-move-timeout must be positive (seconds)")
        if self.max_request_bytes <= 0:
            raise ConfigError("--max-request-bytes must be positive")

    @property
    def member_dir(self) -> str:
        return os.path.join(self.data_dir, "member")
