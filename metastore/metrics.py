"""Prometheus metrics of one member, with etcd's metric names where the meaning matches.

Each `NodeMetrics` has its own `CollectorRegistry` (several members may run in
one process: tests, embedders); nothing goes into prometheus-client's global
registry. Most values are read from the node when scraped (Raft status, store
size, the journal's fsync totals) by a custom collector, so nothing below the
API layer needs counters of its own. What cannot be read later is counted as it
happens:

- gRPC requests, by a `grpc.aio.ServerInterceptor` (go-grpc-prometheus's
  names: `grpc_server_started_total`, `grpc_server_handled_total`,
  `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`,
  `grpc_server_handling_seconds`), kept as plain numbers on the event loop
  and turned into metrics when scraped (the interceptor is their collector);
  the JSON gateway's calls too, through `GrpcMetrics.instrument`;
- leader changes seen by this member, by sampling the Raft leader every
  100 ms on the event loop (and at every scrape);
- proposals pending and failed, counted by the Proposer.
"""
from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from metastore import ETCD_COMPAT_VERSION
from metastore.api.grpc_server import SerializedMessages
from metastore.api.pb import rpc_pb2
from metastore.types import RaftRole

log = logging.getLogger("metastore.metrics")

# Prometheus' (and so etcd's) default histogram buckets for request latency.
GRPC_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Their `le` labels as Prometheus writes them, +Inf last.
_LE = [floatToGoString(bound) for bound in GRPC_LATENCY_BUCKETS] + ["+Inf"]
# etcd's etcd_disk_wal_fsync_duration_seconds buckets: 1 ms .. 8 s, doubling.
WAL_FSYNC_BUCKETS = tuple(0.001 * 2**i for i in range(14))
# Drains: a second to a few hours.
DRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)


def cluster_version(version: str = ETCD_COMPAT_VERSION) -> str:
    """etcd's cluster version: major.minor of the server version."""
    return ".".join(version.split(".")[:2])


def grpc_code_name(code: grpc.StatusCode) -> str:
    """Go's name for a status code (go-grpc-prometheus labels): InvalidArgument, Canceled, OK."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


# -- gRPC ---------------------------------------------------------------------
class _MethodMetrics:
    """One method's counts, as plain numbers read when scraped.

    Every gRPC handler runs on the member's event loop, so nothing else
    changes them (a scrape on another thread reads them under the GIL; a
    free-threaded Python would need a lock here). prometheus-client's
    Counter and Histogram take a lock per update, and the five updates of
    each call were ~5 % of a busy member's event loop (py-spy under check
    perf l)."""

    __slots__ = ("labels", "started", "received", "sent", "handled", "buckets", "seconds")

    def __init__(self, grpc_type: str, service: str, method: str) -> None:
        self.labels = (grpc_type, service, method)
        self.started = 0
        self.received = 0
        self.sent = 0
        self.handled: dict[str, int] = {}  # by Go's code name
        self.buckets = [0] * (len(GRPC_LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.seconds = 0.0

    def finish(self, code: grpc.StatusCode, t0: float) -> None:
        name = _CODE_NAMES[code]
        self.handled[name] = self.handled.get(name, 0) + 1
        took = time.perf_counter() - t0
        self.buckets[bisect.bisect_left(GRPC_LATENCY_BUCKETS, took)] += 1  # le: at most the bound
        self.seconds += took

    def count_received(self) -> None:
        self.received += 1


_CODE_NAMES = {code: grpc_code_name(code) for code in grpc.StatusCode}


class _CountingIterator:
    """A request stream that counts the messages the handler reads."""

    def __init__(self, inner: Any, counter: Callable[[], None]) -> None:
        self._inner = inner.__aiter__()
        self._counter = counter

    def __aiter__(self) -> "_CountingIterator":
        return self

    async def __anext__(self) -> Any:
        item = await self._inner.__anext__()
        self._counter()
        return item


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(exc, grpc.aio.AbortError) and isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN  # what grpc answers for an unhandled exception


def _code_after_return(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every RPC, labelled like go-grpc-prometheus (what etcd exports)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[str, _MethodMetrics] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        registry.register(self)

    # -- the collector: the counts as go-grpc-prometheus names them ---------------
    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        started, handled, received, sent, seconds = self._families()
        for m in list(self._methods.values()):
            started.add_metric(m.labels, m.started)
            for code, count in list(m.handled.items()):
                handled.add_metric(m.labels + (code,), count)
            received.add_metric(m.labels, m.received)
            sent.add_metric(m.labels, m.sent)
            cumulative, buckets = 0, []
            for bound, count in zip(_LE, m.buckets):
                cumulative += count
                buckets.append((bound, cumulative))
            seconds.add_metric(m.labels, buckets, m.seconds)
        return [started, handled, received, sent, seconds]

    @staticmethod
    def _families() -> list[Metric]:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        return [
            CounterMetricFamily("grpc_server_started", "Total number of RPCs started on the server.",
                                labels=labels),
            CounterMetricFamily("grpc_server_handled", "Total number of RPCs completed on the server, "
                                "regardless of success or failure.", labels=labels + ["grpc_code"]),
            CounterMetricFamily("grpc_server_msg_received", "Total number of RPC stream messages received on "
                                "the server.", labels=labels),
            CounterMetricFamily("grpc_server_msg_sent", "Total number of gRPC stream messages sent by the "
                                "server.", labels=labels),
            HistogramMetricFamily("grpc_server_handling_seconds", "Histogram of response latency (seconds) "
                                  "of gRPC that had been application-level handled by the server.",
                                  labels=labels),
        ]

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        # grpc asks for every call; the services hand back the same handler
        # object each time, so it is wrapped once per method.
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        try:
            wrapped = self._wrap(handler, details.method)
        except Exception:  # never let metrics break a call
            log.exception("cannot instrument %s", details.method)
            return handler
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def instrument(self, full_method: str, behavior: Callable, request_streaming: bool,
                   response_streaming: bool) -> Callable:
        """`behavior` (a servicer's async method) counted and timed as calls
        of `full_method`: for callers that are not gRPC calls but stand for
        them (the JSON gateway)."""
        grpc_type = ("bidi_stream" if request_streaming else "server_stream") if response_streaming \
            else ("client_stream" if request_streaming else "unary")
        if not (inspect.isasyncgenfunction(behavior) if response_streaming
                else inspect.iscoroutinefunction(behavior)):
            log.warning("cannot instrument %s: not an async servicer method", full_method)
            return behavior
        m = self._metrics_for(full_method, grpc_type)
        if response_streaming:
            return self._stream_response(behavior, m, request_streaming)
        return self._unary_response(behavior, m, request_streaming)

    def _metrics_for(self, full_method: str, grpc_type: str) -> _MethodMetrics:
        m = self._methods.get(full_method)
        if m is None:
            service, _, method = full_method.lstrip("/").rpartition("/")
            m = self._methods[full_method] = _MethodMetrics(grpc_type, service, method)
        return m

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        rs, ws = handler.request_streaming, handler.response_streaming
        des, ser = handler.request_deserializer, handler.response_serializer
        behavior = (handler.stream_stream if rs and ws else handler.stream_unary if rs
                    else handler.unary_stream if ws else handler.unary_unary)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler (grpc runs it in a thread): not instrumented
        if not rs and not ws:
            m = self._metrics_for(full_method, "unary")
            return grpc.unary_unary_rpc_method_handler(self._unary_response(handler.unary_unary, m, False),
                                                       request_deserializer=des, response_serializer=ser)
        if rs and not ws:
            m = self._metrics_for(full_method, "client_stream")
            return grpc.stream_unary_rpc_method_handler(self._unary_response(handler.stream_unary, m, True),
                                                        request_deserializer=des, response_serializer=ser)
        if not rs:
            m = self._metrics_for(full_method, "server_stream")
            return grpc.unary_stream_rpc_method_handler(self._stream_response(handler.unary_stream, m, False),
                                                        request_deserializer=des, response_serializer=ser)
        m = self._metrics_for(full_method, "bidi_stream")
        return grpc.stream_stream_rpc_method_handler(self._stream_response(handler.stream_stream, m, True),
                                                     request_deserializer=des, response_serializer=ser)

    @staticmethod
    def _unary_response(behavior: Callable, m: _MethodMetrics, request_streaming: bool) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            m.started += 1
            if request_streaming:
                request = _CountingIterator(request, m.count_received)
            else:
                m.received += 1
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = _code_after_return(context)
                if code is grpc.StatusCode.OK:
                    m.sent += 1
                return response
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                m.finish(code, t0)

        return wrapped

    @staticmethod
    def _stream_response(behavior: Callable, m: _MethodMetrics, request_streaming: bool) -> Callable:
        def prepare(request: Any) -> Any:
            m.started += 1
            if request_streaming:
                return _CountingIterator(request, m.count_received)
            m.received += 1
            return request

        if inspect.isasyncgenfunction(behavior):
            async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                t0 = time.perf_counter()
                responses = behavior(prepare(request), context)
                code = grpc.StatusCode.UNKNOWN
                try:
                    async for response in responses:
                        yield response
                        # Counted once the caller asks for the next one: the
                        # write went out (a reset mid-write counts nothing).
                        m.sent += len(response) if type(response) is SerializedMessages else 1
                    code = _code_after_return(context)
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    m.finish(code, t0)
                    await responses.aclose()

            return generator

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # A handler that sends with context.write(): its messages are not counted.
            t0 = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                result = await behavior(prepare(request), context)
                code = _code_after_return(context)
                return result
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                m.finish(code, t0)

        return writer


# -- leader changes ---------------------------------------------------------------
class LeaderChanges:
    """etcd_server_leader_changes_seen_total: counts each time this member
    sees a leader (not "none") that differs from the last one it saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self.seen = 0

    def observe(self, leader_id: int) -> None:
        with self._lock:
            if leader_id != 0 and leader_id != self._last:
                self.seen += 1
            self._last = leader_id


# -- the collector of values read at scrape time -------------------------------------
class _NodeCollector:
    def __init__(self, metrics: "NodeMetrics") -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # values exist only at scrape time; skip the registry's collect-to-describe

    def collect(self) -> Iterable[Metric]:
        m = self._m
        node = m.node
        st = node.raft_status()
        m.leader_changes.observe(st.leader_id)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.",
                    1 if st.leader_id else 0)
        yield gauge("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.",
                    1 if st.state == RaftRole.LEADER.value else 0)
        yield CounterMetricFamily("etcd_server_leader_changes_seen", "The number of leader changes seen.",
                                  value=m.leader_changes.seen)
        # etcd exports these two as gauges named *_total: the Raft indexes.
        yield gauge("etcd_server_proposals_committed_total", "The total number of consensus proposals committed.",
                    st.commit)
        yield gauge("etcd_server_proposals_applied_total", "The total number of consensus proposals applied.",
                    st.applied)
        yield gauge("etcd_server_proposals_pending", "The current number of pending proposals to commit.",
                    m.node.proposer.pending)
        yield CounterMetricFamily("etcd_server_proposals_failed", "The total number of failed proposals seen.",
                                  value=m.node.proposer.failed)
        yield gauge("metastore_raft_term", "The Raft term this member is in.", st.term)
        rounds = CounterMetricFamily("metastore_read_index_rounds",
                                     "Read index rounds for linearizable reads, by the way they went: between "
                                     "the members' event loops (peers) or through Raft.", labels=["via"])
        rounds.add_metric(["peers"], m.node.read_peers.confirmed)
        rounds.add_metric(["raft"], m.node.read_barrier.raft_rounds)
        yield rounds

        version = GaugeMetricFamily("etcd_server_version", "Which version is running. 1 for 'server_version' "
                                    "label with current version.", labels=["server_version"])
        version.add_metric([ETCD_COMPAT_VERSION], 1)
        yield version
        cversion = GaugeMetricFamily("etcd_cluster_version", "Which version is running. 1 for 'cluster_version' "
                                     "label with current cluster version", labels=["cluster_version"])
        cversion.add_metric([cluster_version()], 1)
        yield cversion

        store = node.store
        total, in_use = store.db_size()
        yield gauge("etcd_mvcc_db_total_size_in_bytes", "Total size of the underlying database physically "
                    "allocated in bytes.", total)
        yield gauge("etcd_mvcc_db_total_size_in_use_in_bytes", "Total size of the underlying database logically "
                    "in use in bytes.", in_use)
        yield gauge("etcd_debugging_mvcc_current_revision", "The current revision of store.", store.revision)
        yield gauge("etcd_debugging_mvcc_compact_revision", "The revision of the last compaction in store.",
                    store.compact_revision)
        keys = _key_count(store)
        if keys is not None:
            yield gauge("etcd_debugging_mvcc_keys_total", "Total number of keys.", keys)

        fsync = m.wal_fsync_from_totals()
        if fsync is not None:
            yield fsync
        yield from _placement_metrics(node)


def _placement_metrics(node: Any) -> Iterable[Metric]:
    """Drain progress and liveness, as this member's store holds them (the
    same on every member, so any member can be scraped)."""
    placement = getattr(node, "placement", None)
    if placement is None:
        return
    view = placement.view()
    remaining = view.remaining_on(view.drain.target) if view.drain is not None else (0, 0)
    yield GaugeMetricFamily("metastore_drain_in_progress", "1 while a member is being drained, else 0.",
                            value=1 if view.drain is not None else 0)
    yield GaugeMetricFamily("metastore_drain_remaining_workloads",
                            "Workloads still on the member being drained (0 when no drain runs).", value=remaining[0])
    yield GaugeMetricFamily("metastore_drain_remaining_subunits",
                            "Sub-units still reported on the member being drained (0 when no drain runs).",
                            value=remaining[1])
    names = placement.names()
    state = GaugeMetricFamily("metastore_member_liveness", "Each member's liveness: 0 ALIVE, 1 STOPPING, "
                              "2 DRAINING (the design's values).", labels=["member", "member_id"])
    online = GaugeMetricFamily("metastore_member_online", "1 while the member's session is live.",
                               labels=["member", "member_id"])
    for mid, member in sorted(view.members.items()):
        labels = [names.get(mid, ""), f"{mid:x}"]
        state.add_metric(labels, int(member.liveness))
        online.add_metric(labels, 1 if member.online else 0)
    yield state
    yield online
    owned = GaugeMetricFamily("metastore_workloads", "Workloads by owner member (\"\" = not placed) and state.",
                              labels=["member", "state"])
    counts: dict[tuple[str, str], int] = {}
    for w in view.workloads:
        key = (names.get(w.owner, f"{w.owner:x}") if w.owner else "", w.state)
        counts[key] = counts.get(key, 0) + 1
    for (member_name, st), n in sorted(counts.items()):
        owned.add_metric([member_name, st], n)
    yield owned


def _key_count(store: Any) -> int | None:
    """Live keys, when the engine counts a range without visiting it (memory);
    None where that would scan every key (RocksDB)."""
    backend = getattr(store, "backend", None)
    if getattr(backend, "count", None) is None:
        return None
    resp = store.range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", count_only=True, serializable=True))
    return resp.count


# -- the whole set ------------------------------------------------------------------
class NodeMetrics:
    """Everything /metrics reports for one Node, in a registry of its own."""

    def __init__(self, node: Any, *, leader_sample_period: float = 0.1) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.grpc = GrpcMetrics(self.registry)
        self.leader_changes = LeaderChanges()
        self._leader_sample_period = leader_sample_period
        self._sampler: asyncio.Task | None = None
        self._journal: Any = None  # the journal whose fsyncs feed _fsync_histogram
        self._fsync_histogram = Histogram(
            "etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.",
            buckets=WAL_FSYNC_BUCKETS, registry=None)
        self.registry.register(_NodeCollector(self))
        # Drains this member finished as the coordinator.
        self.drain_duration = Histogram(
            "metastore_drain_duration_seconds", "How long drains took, from start to the member STOPPING.",
            buckets=DRAIN_BUCKETS, registry=self.registry)
        placement = getattr(node, "placement", None)
        if placement is not None:
            placement.coordinator.on_drain_finished.append(self.drain_duration.observe)

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.grpc]

    def start(self) -> None:
        """After the node started (its journal exists), on its event loop."""
        journal = getattr(self.node.raft, "journal", None)
        if journal is not None and hasattr(journal, "on_fsync"):
            # A journal that reports each fsync's duration: a real histogram.
            journal.on_fsync = self._fsync_histogram.observe
            self._journal = journal
            self.registry.register(self._fsync_histogram)
        self._sampler = asyncio.get_running_loop().create_task(self._sample_leader())

    async def stop(self) -> None:
        task, self._sampler = self._sampler, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._journal is not None:
            self._journal.on_fsync = None
            self._journal = None

    async def _sample_leader(self) -> None:
        while True:
            try:
                self.leader_changes.observe(self.node.raft_status().leader_id)
            except Exception:  # noqa: BLE001 - a sampling hiccup must not end sampling
                log.debug("sampling the Raft leader failed", exc_info=True)
            await asyncio.sleep(self._leader_sample_period)

    def wal_fsync_from_totals(self) -> HistogramMetricFamily | None:
        """Without a per-fsync hook in the journal, the histogram has what
        the journal totals: count and sum (one +Inf bucket)."""
        if self._journal is not None:
            return None  # the real histogram is registered
        journal = getattr(self.node.raft, "journal", None)
        if journal is None or not hasattr(journal, "fsync_count"):
            return None
        return HistogramMetricFamily(
            "etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL "
            "(count and sum only: per-fsync durations are not recorded).",
            buckets=[("+Inf", journal.fsync_count)], sum_value=journal.fsync_seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if `accept` asks) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
