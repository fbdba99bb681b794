"""The client-facing gRPC server (grpc.aio) with etcd's services registered,
and the HTTP listener for /metrics, /health and /version (api/http.py).

One asyncio event loop serves every client stream and HTTP request; thousands
of idle streams cost a coroutine each, not a thread.
"""
from __future__ import annotations

from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from metastore.api.auth import AuthService
from metastore.api.cluster import ClusterService
from metastore.api.election import ElectionService
from metastore.api.gateway import add_gateway_routes
from metastore.api.http import HTTPServer, Router, add_member_routes
from metastore.api.placement_http import add_placement_routes
from metastore.api.kv import KVService
from metastore.api.lease import LeaseService
from metastore.api.lock import LockService
from metastore.api.maintenance import MaintenanceService
from metastore.api.pb import metastore_pb2_grpc, rpc_pb2_grpc, v3election_pb2_grpc, v3lock_pb2_grpc
from metastore.api.raft_status import RaftStatusService
from metastore.api.watch import WatchService
from metastore.cluster import hostport
from metastore.metrics import NodeMetrics
from metastore.node import Node

# etcd accepts this much on top of --max-request-bytes at the gRPC layer, so a
# request just over the limit gets etcd's "request is too large" rather than
# a transport error.
GRPC_OVERHEAD_BYTES = 512 * 1024


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_request_bytes + GRPC_OVERHEAD_BYTES),
        ("grpc.max_send_message_length", 2**31 - 1),
        # etcdctl and the Go client ping every 2 s even on idle streams; gRPC's
        # defaults answer that with GOAWAY too_many_pings and cut watches.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # A port clash must fail loudly, not silently share the port.
        ("grpc.so_reuseport", 0),
    ]


class _GenericHandlersOnly:
    """What the generated `add_*Servicer_to_server` functions see of the
    server: they add each service as a generic handler and also register
    every method with it. grpc.aio's server keeps one pending request per
    registered method and waits on all of them (asyncio.wait) for every
    call it accepts; with etcd's ~50 methods that wait costs ~27 us against
    ~7 us for one (measured here on uvloop), on the event loop, for every
    RPC. Only the generic handlers are passed on: the server finds each
    method through them, with one pending request for all calls."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """Not passed on (see the class docstring)."""


async def build_server(node: Node, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                       ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Create (not start) the server, bound to every --listen-client-urls."""
    server = grpc.aio.server(interceptors=list(interceptors), options=server_options(node.cfg.max_request_bytes))
    services = _GenericHandlersOnly(server)
    rpc_pb2_grpc.add_KVServicer_to_server(KVService(node), services)
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(MaintenanceService(node), services)
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterService(node), services)
    rpc_pb2_grpc.add_WatchServicer_to_server(WatchService(node), services)
    rpc_pb2_grpc.add_LeaseServicer_to_server(LeaseService(node), services)
    rpc_pb2_grpc.add_AuthServicer_to_server(AuthService(node), services)
    v3lock_pb2_grpc.add_LockServicer_to_server(LockService(node), services)
    v3election_pb2_grpc.add_ElectionServicer_to_server(ElectionService(node), services)
    metastore_pb2_grpc.add_RaftServicer_to_server(RaftStatusService(node), services)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    for url in node.cfg.listen_client_urls:
        address = hostport(url)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for clients on {address}: {exc}") from None
        if port == 0:
            raise RuntimeError(f"cannot listen for clients on {address}: port in use or address not available")
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer


class Server:
    """A running member: the Node plus its client listener and its HTTP
    listener (--listen-metrics-urls; none when that is empty). Used by
    `metastore serve`, and by anything that wants a member in-process.

    `metrics` is the member's own registry and collectors; `router` takes
    more HTTP routes (async handlers on the node's loop) before `start`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.metrics = NodeMetrics(node)
        self.router = Router()
        add_member_routes(self.router, node, self.metrics)
        add_placement_routes(self.router, node.placement)
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._http: HTTPServer | None = None
        self._gateway: HTTPServer | None = None
        self._metrics_started = False
        self._grpc_started = False

    @property
    def http(self) -> HTTPServer | None:
        """The HTTP listener once started (its `addresses` say where it is bound)."""
        return self._http

    @property
    def gateway(self) -> HTTPServer | None:
        """The JSON gateway's listener once started (--listen-client-http-urls)."""
        return self._gateway

    async def start(self) -> None:
        self._grpc, self._health = await build_server(self.node, self.metrics.interceptors)
        if self.node.cfg.listen_metrics_urls:
            # Bound now so that a busy port fails the start before the node
            # runs; it answers only once the node has started.
            self._http = HTTPServer(self.router, self.node.cfg.listen_metrics_urls, what="metrics")
            await self._http.bind()
        if self.node.cfg.listen_client_http_urls:
            router = Router()
            add_gateway_routes(router, self.node)
            # etcd's client port answers these too; Patroni and APISIX ask
            # for /version before anything else.
            add_member_routes(router, self.node, self.metrics)
            # JSON carries bytes in base64: room for the largest request.
            self._gateway = HTTPServer(router, self.node.cfg.listen_client_http_urls, what="client HTTP",
                                       max_body_bytes=2 * self.node.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES,
                                       idle_timeout=300.0)
            await self._gateway.bind()
        await self.node.start()
        self.metrics.start()
        self._metrics_started = True
        await self._grpc.start()
        self._grpc_started = True
        if self._http is not None:
            await self._http.start()
        if self._gateway is not None:
            await self._gateway.start()

    async def stop(self, grace: float = 1.0) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # End watch streams now rather than after the grace period: their
        # clients reconnect to another member at once.
        self.node.watch_hub.stop()
        for listener in (self._http, self._gateway):
            if listener is not None:
                await listener.stop()
        if self._grpc is not None:
            if not self._grpc_started:
                # grpc releases the ports it bound only when a started
                # server shuts down (grpc/grpc#14917): an embedding process
                # must get its port back after a failed start.
                await self._grpc.start()
            await self._grpc.stop(grace)
        if self._metrics_started:
            await self.metrics.stop()
        await self.node.stop()
