"""Cluster identity: member ids, peer addresses and the member table.

pysyncobj names nodes by 'host:port' and has no numeric ids, while etcd
clients need stable u64 member and cluster ids. They are derived here from the
member name and the cluster token, so every member computes the same ids
without talking to anyone, and a restart keeps them.
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit


def _u64(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    value = int.from_bytes(digest[:8], "big")
    return value or 1  # etcd never uses id 0: it means "none"


def member_id(name: str, token: str) -> int:
    """The u64 member id of `name` in the cluster created with `token`."""
    return _u64("member", token, name)


def cluster_id(token: str, member_ids: list[int]) -> int:
    """The u64 cluster id: fixed by the token and the initial members."""
    return _u64("cluster", token, *(f"{m:016x}" for m in sorted(member_ids)))


def parse_urls(value: str) -> list[str]:
    """Split a comma-separated URL list, as etcd's flags take them."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    for url in urls:
        hostport(url)  # validates
    return urls


def hostport(url: str) -> str:
    """'http://127.0.0.1:2380' -> '127.0.0.1:2380' (pysyncobj's node address)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"invalid URL {url!r}: expected http://host:port")
    if parts.scheme == "https":
        raise ValueError(f"{url!r}: TLS (https) is not supported yet; use http:// on a trusted network")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}"


def is_loopback(url: str) -> bool:
    """True when the URL's host can only be reached from this machine."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def parse_initial_cluster(value: str) -> dict[str, list[str]]:
    """'a=http://h1:2380,b=http://h2:2380' -> {'a': [...], 'b': [...]}.

    A name may appear more than once to list several peer URLs, as in etcd.
    """
    members: dict[str, list[str]] = {}
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"invalid --initial-cluster entry {item!r}: expected name=http://host:port")
        hostport(url)
        members.setdefault(name, []).append(url)
    if not members:
        raise ValueError("--initial-cluster is empty")
    return members


@dataclass
class Member:
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str] = field(default_factory=list)
    is_learner: bool = False

    @property
    def raft_address(self) -> str:
        return hostport(self.peer_urls[0])


class Membership:
    """The member table: who is in the cluster and how to reach them.

    Seeded from --initial-cluster (identical on every member) and updated only
    by applied Raft entries (members publishing their client URLs), so every
    member holds the same table.
    """

    def __init__(self, token: str, initial: dict[str, list[str]]) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._members: dict[int, Member] = {}
        for name, urls in initial.items():
            mid = member_id(name, token)
            self._members[mid] = Member(mid, name, list(urls))
        self.cluster_id = cluster_id(token, list(self._members))
        self._by_address = {m.raft_address: m.id for m in self._members.values()}

    def members(self) -> list[Member]:
        with self._lock:
            return sorted((Member(m.id, m.name, list(m.peer_urls), list(m.client_urls), m.is_learner)
                           for m in self._members.values()), key=lambda m: m.id)

    def get(self, mid: int) -> Member | None:
        with self._lock:
            return self._members.get(mid)

    def id_of_address(self, address: str | None) -> int:
        """Member id of a pysyncobj node address; 0 when unknown or None."""
        if address is None:
            return 0
        return self._by_address.get(address, 0)

    def export(self) -> list[tuple[int, str, list[str]]]:
        """What applied entries changed, for a snapshot."""
        with self._lock:
            return [(m.id, m.name, list(m.client_urls)) for m in self._members.values()]

    def restore(self, exported: list[tuple[int, str, list[str]]]) -> None:
        for mid, name, client_urls in exported:
            self.publish(mid, name, client_urls)

    def publish(self, mid: int, name: str, client_urls: list[str]) -> None:
        """Apply a member's published attributes (called from the apply loop)."""
        with self._lock:
            member = self._members.get(mid)
            if member is None:
                return  # not (or no longer) a member: ignore, as etcd does
            member.name = name or member.name
            member.client_urls = list(client_urls)
