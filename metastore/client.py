"""A small synchronous client for metastore (or any etcd v3 endpoint).

What an application embedding a cluster state store needs -- keys and
prefixes, compare-and-swap, watches, leases, status and members -- over the
gRPC stubs in `metastore.api.pb`, without a full etcd client library:

    from metastore.client import Client

    with Client("127.0.0.1:2379") as c:
        c.put("config/a", "1")
        value, meta = c.get("config/a")          # (b"1", KeyValue(...)) or None
        with c.watch_prefix("config/") as events:
            for event in events: ...             # Event("PUT", KeyValue(...), prev=None)

Keys and values are bytes; str is accepted and encoded as UTF-8. Every failure
is an `EtcdClientError` carrying etcd's message (e.g. "etcdserver: requested
lease not found") and the gRPC code.

Several endpoints: requests go to the one that last answered. A read that gets
UNAVAILABLE (member down, "no leader") is tried on the next endpoint; a write
only when it never reached a server (connection refused), because a write that
reached one may have been applied -- etcd's own client retries the same way.
A watch that breaks resumes on the next endpoint from the revision after the
last event it delivered, so no event is lost or repeated.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar, Union

import grpc

from metastore.api.pb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from metastore.keys import prefix_range_end

Bytesish = Union[bytes, str]
T = TypeVar("T")

__all__ = ["Client", "EtcdClientError", "CompactedError", "KeyValue", "PutResult", "Event", "Watch",
           "Lease", "KeepAlive", "Status", "ClusterMember", "prefix_range_end"]

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 2**31 - 1),
                    ("grpc.max_send_message_length", 2**31 - 1)]


class EtcdClientError(Exception):
    """A request failed. `message` is etcd's text ("etcdserver: no leader"),
    `code` the gRPC status code (None for failures found by the client) and
    `endpoint` the member that answered."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint

    def __str__(self) -> str:
        where = [self.code.name] if self.code is not None else []
        if self.endpoint:
            where.append(self.endpoint)
        return f"{self.message} ({', '.join(where)})" if where else self.message


class CompactedError(EtcdClientError):
    """A watch (or read) asked for history older than the compaction."""

    def __init__(self, message: str, compact_revision: int, endpoint: str | None = None) -> None:
        super().__init__(message, grpc.StatusCode.OUT_OF_RANGE, endpoint)
        self.compact_revision = compact_revision


def _b(value: Bytesish) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected bytes or str, not {type(value).__name__}")


def _endpoint(url: str) -> str:
    """'http://host:port' or 'host:port' -> 'host:port'."""
    url = url.strip()
    if url.startswith("https://"):
        raise ValueError(f"endpoint {url}: TLS is not supported by this client")
    if url.startswith("http://"):
        url = url[len("http://"):]
    url = url.rstrip("/")
    if not url or ":" not in url:
        raise ValueError(f"endpoint {url!r}: expected host:port or http://host:port")
    return url


# -- values -------------------------------------------------------------------
@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> "KeyValue":
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True)
class PutResult:
    revision: int               # the store revision the put created
    prev: KeyValue | None       # the previous key-value (only with prev_kv=True)


@dataclass(frozen=True)
class Event:
    type: str                   # "PUT" or "DELETE"
    kv: KeyValue                # after the change (for a DELETE: key and mod_revision only)
    prev: KeyValue | None = None  # with prev_kv=True

    @property
    def key(self) -> bytes:
        return self.kv.key

    @property
    def value(self) -> bytes:
        return self.kv.value

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True)
class Status:
    endpoint: str
    member_id: int
    leader: int                 # member id of the leader; 0: none
    version: str
    db_size: int
    raft_term: int
    raft_index: int
    raft_applied_index: int
    revision: int
    errors: tuple[str, ...]

    @property
    def is_leader(self) -> bool:
        return self.leader != 0 and self.leader == self.member_id


@dataclass(frozen=True)
class ClusterMember:
    id: int
    name: str                   # "" until the member has started and published itself
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool


class _Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.kv = rpc_pb2_grpc.KVStub(channel)
        self.watch = rpc_pb2_grpc.WatchStub(channel)
        self.lease = rpc_pb2_grpc.LeaseStub(channel)
        self.cluster = rpc_pb2_grpc.ClusterStub(channel)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(channel)


def _never_sent(err: grpc.RpcError) -> bool:
    """True when gRPC could not reach the server at all, so the request was
    certainly not applied (safe to send a write elsewhere)."""
    details = (err.details() or "").lower()
    return not details.startswith("etcdserver:") and "failed to connect" in details


def _error(err: grpc.RpcError, endpoint: str) -> EtcdClientError:
    code = err.code()
    message = err.details() or (code.name if code is not None else "request failed")
    if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in message:
        return CompactedError(message, 0, endpoint)
    return EtcdClientError(message, code, endpoint)


# -- the client ---------------------------------------------------------------
class Client:
    """A synchronous client over one or more endpoints ("host:port" or
    "http://host:port", a list or a comma-separated string). `timeout` bounds
    every unary request, in seconds. Thread-safe; close() when done (or use
    it as a context manager)."""

    # How long a broken watch keeps trying to resume before it reports the error.
    watch_reconnect_timeout = 30.0

    def __init__(self, endpoints: str | Sequence[str] = "127.0.0.1:2379", *, timeout: float = 5.0) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = [_endpoint(e) for e in endpoints if e.strip()]
        if not self.endpoints:
            raise ValueError("a Client needs at least one endpoint")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, _Stubs] = {}
        self._current = 0
        self._closed = False

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({','.join(self.endpoints)})"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            channel.close()

    # -- plumbing ------------------------------------------------------------
    def _stub(self, endpoint: str) -> _Stubs:
        with self._lock:
            if self._closed:
                raise EtcdClientError("client is closed")
            stubs = self._stubs.get(endpoint)
            if stubs is None:
                channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
                self._channels[endpoint] = channel
                stubs = self._stubs[endpoint] = _Stubs(channel)
            return stubs

    def _order(self) -> list[str]:
        """The endpoints, starting with the one that answered last."""
        start = self._current
        return self.endpoints[start:] + self.endpoints[:start]

    def _call(self, fn: Callable[[_Stubs, float], T], *, repeatable: bool, timeout: float | None = None) -> T:
        """Run `fn(stubs, timeout)` on the current endpoint; on UNAVAILABLE
        move on to the next one (for a non-repeatable request only when it
        never reached a server)."""
        order = self._order()
        for i, endpoint in enumerate(order):
            try:
                result = fn(self._stub(endpoint), timeout if timeout is not None else self.timeout)
            except grpc.RpcError as err:
                last = i == len(order) - 1
                if (not last and err.code() is grpc.StatusCode.UNAVAILABLE
                        and (repeatable or _never_sent(err))):
                    continue
                raise _error(err, endpoint) from None
            self._current = self.endpoints.index(endpoint)
            return result
        raise AssertionError("unreachable")

    def _rotate(self) -> str:
        """Switch to the next endpoint (after a broken stream); return it."""
        self._current = (self._current + 1) % len(self.endpoints)
        return self.endpoints[self._current]

    # -- KV --------------------------------------------------------------------
    def get(self, key: Bytesish, *, serializable: bool = False) -> tuple[bytes, KeyValue] | None:
        """(value, meta) of `key`, or None when it does not exist. Linearizable
        unless serializable=True (then the answering member's local view)."""
        req = rpc_pb2.RangeRequest(key=_b(key), serializable=serializable)
        resp = self._call(lambda s, t: s.kv.Range(req, timeout=t), repeatable=True)
        if not resp.kvs:
            return None
        kv = KeyValue.from_pb(resp.kvs[0])
        return kv.value, kv

    def get_prefix(self, prefix: Bytesish, *, serializable: bool = False,
                   limit: int = 0) -> list[tuple[bytes, KeyValue]]:
        """[(value, meta), ...] of every key starting with `prefix`, sorted by key."""
        p = _b(prefix)
        req = rpc_pb2.RangeRequest(key=p or b"\0", range_end=prefix_range_end(p), serializable=serializable,
                                   limit=limit)
        resp = self._call(lambda s, t: s.kv.Range(req, timeout=t), repeatable=True)
        return [(kv.value, KeyValue.from_pb(kv)) for kv in resp.kvs]

    def put(self, key: Bytesish, value: Bytesish, lease: "int | Lease | None" = None,
            prev_kv: bool = False) -> PutResult:
        req = rpc_pb2.PutRequest(key=_b(key), value=_b(value), lease=_lease_id(lease), prev_kv=prev_kv)
        resp = self._call(lambda s, t: s.kv.Put(req, timeout=t), repeatable=False)
        return PutResult(resp.header.revision, KeyValue.from_pb(resp.prev_kv) if resp.HasField("prev_kv") else None)

    def delete(self, key: Bytesish) -> bool:
        """Delete `key`; True when it existed."""
        req = rpc_pb2.DeleteRangeRequest(key=_b(key))
        return self._call(lambda s, t: s.kv.DeleteRange(req, timeout=t), repeatable=False).deleted > 0

    def delete_prefix(self, prefix: Bytesish) -> int:
        """Delete every key starting with `prefix`; the number deleted."""
        p = _b(prefix)
        req = rpc_pb2.DeleteRangeRequest(key=p or b"\0", range_end=prefix_range_end(p))
        return self._call(lambda s, t: s.kv.DeleteRange(req, timeout=t), repeatable=False).deleted

    def txn(self, compare: Sequence[rpc_pb2.Compare], success: Sequence[rpc_pb2.RequestOp] = (),
            failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.TxnResponse:
        """etcd's Txn with the protobuf messages (`metastore.api.pb.rpc_pb2`),
        for what the helpers below do not cover."""
        req = rpc_pb2.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return self._call(lambda s, t: s.kv.Txn(req, timeout=t), repeatable=False)

    def put_if_absent(self, key: Bytesish, value: Bytesish, lease: "int | Lease | None" = None) -> bool:
        """Create `key` unless it exists; True when this call created it."""
        k = _b(key)
        cmp = rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0)
        return self.txn([cmp], [_put_op(k, value, lease)]).succeeded

    def compare_and_swap(self, key: Bytesish, expected: Bytesish | None, value: Bytesish,
                         lease: "int | Lease | None" = None) -> bool:
        """Set `key` to `value` if its value is `expected` (None: if it does
        not exist); True when it was set."""
        k = _b(key)
        if expected is None:
            return self.put_if_absent(k, value, lease)
        cmp = rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL,
                              value=_b(expected))
        return self.txn([cmp], [_put_op(k, value, lease)]).succeeded

    def compare_and_delete(self, key: Bytesish, expected: Bytesish) -> bool:
        """Delete `key` if its value is `expected`; True when it was deleted."""
        k = _b(key)
        cmp = rpc_pb2.Compare(key=k, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL,
                              value=_b(expected))
        op = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k))
        return self.txn([cmp], [op]).succeeded

    # -- watch -------------------------------------------------------------------
    def watch(self, key: Bytesish, *, prefix: bool = False, start_revision: int | None = None,
              prev_kv: bool = False) -> "Watch":
        """Watch `key` (or every key under it with prefix=True). Returns once
        the server has created the watch: every change after that is seen.
        With start_revision, history from that revision is replayed first."""
        k = _b(key)
        range_end = prefix_range_end(k) if prefix else b""
        return Watch(self, (k or b"\0") if prefix else k, range_end, start_revision or 0, prev_kv)

    def watch_prefix(self, prefix: Bytesish, *, start_revision: int | None = None,
                     prev_kv: bool = False) -> "Watch":
        return self.watch(prefix, prefix=True, start_revision=start_revision, prev_kv=prev_kv)

    # -- leases ------------------------------------------------------------------
    def lease(self, ttl: int, lease_id: int = 0) -> "Lease":
        """Grant a lease of `ttl` seconds (the server may raise it to its
        minimum TTL; `Lease.ttl` is what was granted)."""
        req = rpc_pb2.LeaseGrantRequest(TTL=int(ttl), ID=lease_id)
        resp = self._call(lambda s, t: s.lease.LeaseGrant(req, timeout=t), repeatable=False)
        if resp.error:
            raise EtcdClientError(resp.error)
        return Lease(self, resp.ID, resp.TTL)

    def leases(self) -> list[int]:
        resp = self._call(lambda s, t: s.lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=t),
                          repeatable=True)
        return [lease.ID for lease in resp.leases]

    # -- cluster -------------------------------------------------------------------
    def status(self) -> Status:
        """Maintenance.Status of the member this client talks to."""
        resp = self._call(lambda s, t: s.maintenance.Status(rpc_pb2.StatusRequest(), timeout=t),
                          repeatable=True)
        return Status(
            endpoint=self.endpoints[self._current], member_id=resp.header.member_id, leader=resp.leader,
            version=resp.version, db_size=resp.dbSize, raft_term=resp.raftTerm, raft_index=resp.raftIndex,
            raft_applied_index=resp.raftAppliedIndex, revision=resp.header.revision, errors=tuple(resp.errors))

    def members(self) -> list[ClusterMember]:
        resp = self._call(lambda s, t: s.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=t),
                          repeatable=True)
        return [ClusterMember(m.ID, m.name, tuple(m.peerURLs), tuple(m.clientURLs), m.isLearner)
                for m in resp.members]


def _lease_id(lease: "int | Lease | None") -> int:
    if lease is None:
        return 0
    return lease.id if isinstance(lease, Lease) else int(lease)


def _put_op(key: bytes, value: Bytesish, lease: "int | Lease | None") -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=_b(value), lease=_lease_id(lease)))


# -- watches ----------------------------------------------------------------------
_END = object()


class Watch:
    """The events of one watch, in revision order.

    Iterate it (blocks for the next event; ends after cancel()), or poll with
    `get(timeout)`. A stream that breaks is resumed on the next endpoint from
    the revision after the last event delivered; an error it cannot get past
    (history compacted, nothing reachable for `Client.watch_reconnect_timeout`)
    is raised from the iteration. A context manager: cancel() on exit."""

    def __init__(self, client: Client, key: bytes, range_end: bytes, start_revision: int, prev_kv: bool) -> None:
        self._client = client
        self._key = key
        self._range_end = range_end
        self._prev_kv = prev_kv
        # The next revision this watch must deliver; 0 until the server says.
        self._next_revision = start_revision
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self._created = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._requests: queue.Queue[Any] | None = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"metastore-watch-{key[:32]!r}", daemon=True)
        self._thread.start()
        # Created (or failed) before returning, so no later change is missed.
        deadline = time.monotonic() + max(client.timeout, 1.0)
        while not self._created.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.cancel()
                error = self._first_error()
                raise error or EtcdClientError(f"watch on {key!r} was not created within {client.timeout:g} s")

    @property
    def next_revision(self) -> int:
        """The revision of the next event this watch would deliver."""
        return self._next_revision

    def _first_error(self) -> EtcdClientError | None:
        try:
            while True:
                item = self._events.get_nowait()
                if isinstance(item, EtcdClientError):
                    return item
        except queue.Empty:
            return None

    # -- consumer side ---------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self._take(None)
        if event is None:
            raise StopIteration
        return event

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if there is none within `timeout` seconds
        (or the watch has ended)."""
        return self._take(timeout)

    def _take(self, timeout: float | None) -> Event | None:
        if self._done:
            return None
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._done = True
            return None
        if isinstance(item, EtcdClientError):
            self._done = True
            raise item
        return item

    def cancel(self) -> None:
        """End the watch (idempotent); iteration stops after the events already received."""
        self._cancelled.set()
        with self._lock:
            call, requests = self._call, self._requests
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    # -- the stream (own thread) -------------------------------------------------
    def _run(self) -> None:
        endpoint = self._client.endpoints[self._client._current]
        broken_since: float | None = None
        try:
            while True:
                self._stream_created = False
                reason: EtcdClientError | None = None  # None: the server ended the stream (stopping)
                try:
                    self._stream(endpoint)
                except grpc.RpcError as err:
                    if not self._cancelled.is_set() and err.code() is not grpc.StatusCode.UNAVAILABLE:
                        raise _error(err, endpoint) from None
                    reason = _error(err, endpoint)
                if self._cancelled.is_set():
                    return
                # Broken: resume on the next endpoint from _next_revision,
                # for as long as the last working stream is recent enough.
                now = time.monotonic()
                if self._stream_created or broken_since is None:
                    broken_since = now
                elif now - broken_since > self._client.watch_reconnect_timeout:
                    raise reason or EtcdClientError("watch stream ended and could not be resumed", None, endpoint)
                if self._cancelled.wait(0.1):
                    return
                endpoint = self._client._rotate()
        except EtcdClientError as err:
            self._events.put(err)
        except Exception as exc:  # a bug here must still end the consumer's wait
            self._events.put(EtcdClientError(f"watch failed: {exc!r}"))
        finally:
            self._events.put(_END)

    _stream_created = False

    def _stream(self, endpoint: str) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=self._key, range_end=self._range_end, start_revision=self._next_revision, prev_kv=self._prev_kv)))

        def request_iterator() -> Iterator[rpc_pb2.WatchRequest]:
            # Never half-close on our own: the server keeps the watch only
            # while the stream is open.
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = self._client._stub(endpoint).watch.Watch(request_iterator())
        with self._lock:
            self._call, self._requests = call, requests
        if self._cancelled.is_set():
            call.cancel()
            return
        try:
            for resp in call:
                self._handle(resp, endpoint)
        finally:
            requests.put(None)
            with self._lock:
                self._call = self._requests = None

    def _handle(self, resp: rpc_pb2.WatchResponse, endpoint: str) -> None:
        if resp.compact_revision:
            raise CompactedError(resp.cancel_reason or "etcdserver: mvcc: required revision has been compacted",
                                 resp.compact_revision, endpoint)
        if resp.canceled:
            raise EtcdClientError(resp.cancel_reason or "watch canceled by the server", None, endpoint)
        if resp.created:
            if not self._next_revision:
                self._next_revision = resp.header.revision + 1
            self._stream_created = True
            self._created.set()
            return
        for ev in resp.events:
            kv = KeyValue.from_pb(ev.kv)
            prev = KeyValue.from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
            kind = "DELETE" if ev.type == kv_pb2.Event.DELETE else "PUT"
            self._next_revision = kv.mod_revision + 1
            self._events.put(Event(kind, kv, prev))


# -- leases -------------------------------------------------------------------------
class Lease:
    """A granted lease. `refresh()` restarts its TTL once, `keep_alive()` does
    so in the background, `revoke()` ends it (deleting its keys). A context
    manager: revoked on exit."""

    def __init__(self, client: Client, lease_id: int, ttl: int) -> None:
        self._client = client
        self.id = lease_id
        self.ttl = ttl
        self._keep_alive: KeepAlive | None = None

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl})"

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()

    def refresh(self) -> int:
        """Restart the lease's clock; the TTL it now has, 0 when the lease no
        longer exists (expired or revoked)."""
        req = rpc_pb2.LeaseKeepAliveRequest(ID=self.id)

        def call(s: _Stubs, t: float) -> rpc_pb2.LeaseKeepAliveResponse:
            responses = s.lease.LeaseKeepAlive(iter([req]), timeout=t)
            try:
                return next(responses)
            except StopIteration:
                raise EtcdClientError("lease keep-alive stream ended without an answer") from None
            finally:
                responses.cancel()

        return self._client._call(call, repeatable=True).TTL

    def time_to_live(self) -> int:
        """Seconds left; -1 when the lease no longer exists."""
        req = rpc_pb2.LeaseTimeToLiveRequest(ID=self.id)
        return self._client._call(lambda s, t: s.lease.LeaseTimeToLive(req, timeout=t), repeatable=True).TTL

    def keys(self) -> list[bytes]:
        req = rpc_pb2.LeaseTimeToLiveRequest(ID=self.id, keys=True)
        return list(self._client._call(lambda s, t: s.lease.LeaseTimeToLive(req, timeout=t), repeatable=True).keys)

    def revoke(self) -> bool:
        """Revoke the lease, deleting its keys; False if it was already gone."""
        self.stop_keep_alive()
        req = rpc_pb2.LeaseRevokeRequest(ID=self.id)
        try:
            self._client._call(lambda s, t: s.lease.LeaseRevoke(req, timeout=t), repeatable=False)
        except EtcdClientError as err:
            if err.code is grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def keep_alive(self, interval: float | None = None) -> "KeepAlive":
        """Refresh the lease every `interval` s (default: a third of its TTL)
        on a background thread until stop_keep_alive() or revoke(). The
        returned KeepAlive's `lost` event is set if the lease is gone."""
        if self._keep_alive is None or not self._keep_alive.running:
            self._keep_alive = KeepAlive(self, interval if interval is not None else max(self.ttl / 3, 0.1))
        return self._keep_alive

    def stop_keep_alive(self) -> None:
        if self._keep_alive is not None:
            self._keep_alive.stop()


class KeepAlive:
    """Background refreshes of one lease. `lost` is set when the lease no
    longer exists, or no refresh succeeded for a whole TTL."""

    def __init__(self, lease: Lease, interval: float) -> None:
        self.lease = lease
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metastore-keepalive-{lease.id:x}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.lease._client.timeout + 1)

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                ttl = self.lease.refresh()
            except EtcdClientError:
                if time.monotonic() - last_ok > self.lease.ttl:
                    self.lost.set()
                    return
                continue
            if ttl <= 0:
                self.lost.set()
                return
            last_ok = time.monotonic()
