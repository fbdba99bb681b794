"""Cluster identity: member ids, peer addresses and the member table.

pysyncobj names nodes by 'host:port' and has no numeric ids, while etcd
clients need stable u64 member and cluster ids. As in etcd, a member's id is
derived from its peer URLs and the cluster token, so every member computes the
same ids without talking to anyone, a restart keeps them, and a member added
later (`member add` knows only its peer URLs) gets the id it will compute for
itself when it starts. The cluster id comes from the token alone: it must not
change when members come and go.
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from grpc import StatusCode

from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.errors import EtcdError

# etcd 3.4's learner errors (clients match on code and text). A learner
# refuses what needs Raft or a vote: writes, linearizable reads, leases,
# membership calls; it serves serializable reads and Status.
NOT_SUPPORTED_FOR_LEARNER = EtcdError(StatusCode.UNAVAILABLE, "etcdserver: rpc not supported for learner")
LEARNER_NOT_READY = EtcdError(StatusCode.FAILED_PRECONDITION,
                              "etcdserver: can only promote a learner member which is in sync with leader")
MEMBER_NOT_LEARNER = EtcdError(StatusCode.FAILED_PRECONDITION, "etcdserver: can only promote a learner member")
# etcd 3.4 allows one learner at a time.
TOO_MANY_LEARNERS = EtcdError(StatusCode.FAILED_PRECONDITION, "etcdserver: too many learner members in cluster")
MAX_LEARNERS = 1
# etcd promotes a learner whose log reaches 90% of the leader's.
LEARNER_READY_RATIO = 0.9


def _u64(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    value = int.from_bytes(digest[:8], "big")
    return value or 1  # etcd never uses id 0: it means "none"


def member_id(peer_urls: list[str], token: str) -> int:
    """The u64 id of the member reached at `peer_urls` in the cluster `token`."""
    return _u64("member", token, *sorted(hostport(u) for u in peer_urls))


def cluster_id(token: str) -> int:
    """The u64 cluster id of the cluster created with `token`."""
    return _u64("cluster", token)


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


def is_loopback(url: str, resolve: bool = True) -> bool:
    """True when the URL's host can only be reached from this machine.
    resolve=False: no DNS lookup (on an event loop), other names count as
    remote."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if not resolve:
            return False
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


def member_pb(m: Member) -> rpc_pb2.Member:
    """etcd's wire form of a member."""
    return rpc_pb2.Member(ID=m.id, name=m.name, peerURLs=m.peer_urls, clientURLs=m.client_urls,
                          isLearner=m.is_learner)


class Membership:
    """The member table: who is in the cluster and how to reach them.

    Seeded from --initial-cluster and updated only by applied Raft entries
    (members publishing their client URLs, members added and removed) or by
    a Raft snapshot, so every member holds the same table.
    """

    def __init__(self, token: str, initial: dict[str, list[str]]) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._members: dict[int, Member] = {}
        for name, urls in initial.items():
            mid = member_id(urls, token)
            self._members[mid] = Member(mid, name, list(urls))
        self.cluster_id = cluster_id(token)
        self._reindex()

    def _reindex(self) -> None:
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

    def export(self) -> list[dict]:
        """The whole table, for a snapshot."""
        with self._lock:
            return [{"id": m.id, "name": m.name, "peer_urls": list(m.peer_urls),
                     "client_urls": list(m.client_urls), "is_learner": m.is_learner}
                    for m in self._members.values()]

    def restore(self, exported: list[dict]) -> None:
        """Replace the table with a snapshot's."""
        with self._lock:
            self._members = {d["id"]: Member(d["id"], d["name"], list(d["peer_urls"]), list(d["client_urls"]),
                                             d["is_learner"]) for d in exported}
            self._reindex()

    def add(self, mid: int, peer_urls: list[str], is_learner: bool = False) -> None:
        """Apply a `MemberChange` that is not a removal: add the member, or
        set the peer URLs and learner flag of one already in the table (a
        promotion; name and client URLs stay). Idempotent, and applied in log
        order, so a replay ends where the log does. Updating matters even for
        a plain add: the table is seeded from --initial-cluster, which lists
        a learner like any member, and only its applied add says learner."""
        with self._lock:
            member = self._members.get(mid)
            if member is None:
                self._members[mid] = Member(mid, "", list(peer_urls), [], is_learner)
            else:
                if peer_urls:
                    member.peer_urls = list(peer_urls)
                member.is_learner = is_learner
            self._reindex()

    def remove(self, mid: int) -> None:
        with self._lock:
            if self._members.pop(mid, None) is not None:
                self._reindex()

    def voters(self) -> list[Member]:
        return [m for m in self.members() if not m.is_learner]

    def learners(self) -> list[Member]:
        return [m for m in self.members() if m.is_learner]

    def id_of_peer_urls(self, peer_urls: list[str]) -> int:
        """Id of the member using any of these peer addresses; 0 if none."""
        addresses = {hostport(u) for u in peer_urls}
        with self._lock:
            for m in self._members.values():
                if addresses & {hostport(u) for u in m.peer_urls}:
                    return m.id
        return 0

    def publish(self, mid: int, name: str, client_urls: list[str]) -> bool:
        """Apply a member's published attributes (called from the apply loop);
        False, nothing changed, if it is not (or no longer) a member."""
        with self._lock:
            member = self._members.get(mid)
            if member is None:
                return False
            member.name = name or member.name
            member.client_urls = list(client_urls)
            return True


def proposal_allowed_on_learner(payload: bytes) -> bool:
    """Whether a learner may propose this Raft entry (a serialized
    `ProposalBatch`): only its own published attributes, which every member,
    learners too, announces through the log (etcd's learners publish the
    same way). Client writes are refused with NOT_SUPPORTED_FOR_LEARNER, as
    etcd 3.4 does (linearizable reads too: RaftNode.read_barrier)."""
    if not payload:
        return False
    try:
        batch = raft_entry_pb2.ProposalBatch.FromString(payload)
    except Exception:  # not ours: refuse
        return False
    return bool(batch.proposals) and all(p.WhichOneof("op") == "publish" for p in batch.proposals)
