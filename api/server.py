"""The client-facing server: etcd's gRPC services on the client port (our
own HTTP/2 server, api/grpc_server.py), etcd's JSON gateway and /metrics,
/health, /version on the same port over HTTP/1.1, as etcd serves them, and
the HTTP listener for /metrics, /health and /version (api/http.py).

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
from metastore.api.grpc_server import GrpcServer
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


async def build_server(node: Node, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                       ) -> tuple[GrpcServer, health.aio.HealthServicer]:
    """Create (not start) the server, bound to every --listen-client-urls."""
    server = GrpcServer(interceptors, max_receive_message_length=node.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES)
    rpc_pb2_grpc.add_KVServicer_to_server(KVService(node), server)
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(MaintenanceService(node), server)
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterService(node), server)
    rpc_pb2_grpc.add_WatchServicer_to_server(WatchService(node, encoded=True), server)
    rpc_pb2_grpc.add_LeaseServicer_to_server(LeaseService(node), server)
    rpc_pb2_grpc.add_AuthServicer_to_server(AuthService(node), server)
    v3lock_pb2_grpc.add_LockServicer_to_server(LockService(node), server)
    v3election_pb2_grpc.add_ElectionServicer_to_server(ElectionService(node), server)
    metastore_pb2_grpc.add_RaftServicer_to_server(RaftStatusService(node), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for url in node.cfg.listen_client_urls:
        address = hostport(url)
        try:
            await server.bind(address)
        except OSError as exc:
            await server.stop(0)
            raise RuntimeError(f"cannot listen for clients on {address}: {exc.strerror or exc} "
                               f"(port in use or address not available)") from None
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
        self._grpc: GrpcServer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._http: HTTPServer | None = None
        self._gateway: HTTPServer | None = None
        self._client_http: HTTPServer | None = None  # HTTP/1.1 on the client port
        self._metrics_started = False

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
        # etcd's client port answers HTTP/1.1 too: the JSON gateway (grpc-
        # gateway's paths), /metrics, /health, /version (Patroni and APISIX
        # ask for /version before anything else; etcdctl check datascale
        # reads /metrics there). --listen-client-http-urls serves the same
        # on ports of their own.
        router = Router()
        add_gateway_routes(router, self.node, self.metrics.grpc.instrument)
        add_member_routes(router, self.node, self.metrics)
        # JSON carries bytes in base64: room for the largest request.
        max_body = 2 * self.node.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES
        self._client_http = HTTPServer(router, [], what="client HTTP", max_body_bytes=max_body, idle_timeout=300.0)
        self._grpc.http1 = self._client_http.serve_connection
        self._grpc.read_peers = self.node.read_peers.accept
        if self.node.cfg.listen_client_http_urls:
            self._gateway = HTTPServer(router, self.node.cfg.listen_client_http_urls, what="client HTTP",
                                       max_body_bytes=max_body, idle_timeout=300.0)
            await self._gateway.bind()
        await self.node.start()
        self.metrics.start()
        self._metrics_started = True
        await self._grpc.start()
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
        for listener in (self._http, self._gateway, self._client_http):
            if listener is not None:
                await listener.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._metrics_started:
            await self.metrics.stop()
        await self.node.stop()
