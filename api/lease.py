"""etcdserverpb.Lease: grant, revoke, keep-alive stream, time-to-live, list."""
from __future__ import annotations

from typing import AsyncIterator

import grpc

from metastore.api.errors import etcd_errors, etcd_stream_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.node import Node


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def LeaseGrant(self, request: rpc_pb2.LeaseGrantRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.LeaseGrantResponse:
        return await self._node.lease_grant(request)

    @etcd_errors
    async def LeaseRevoke(self, request: rpc_pb2.LeaseRevokeRequest,
                          context: grpc.aio.ServicerContext) -> rpc_pb2.LeaseRevokeResponse:
        return await self._node.lease_revoke(request)

    @etcd_stream_errors
    async def LeaseKeepAlive(self, request_iterator: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.LeaseKeepAliveResponse]:
        """One answer per request, in order. An error (no leader, server
        stopping) ends the stream with etcd's code; the client reconnects.
        A learner refuses the stream, as etcd 3.4's refuses every stream."""
        self._node.refuse_on_learner()
        async for req in request_iterator:
            yield await self._node.lease_keepalive(req.ID)

    @etcd_errors
    async def LeaseTimeToLive(self, request: rpc_pb2.LeaseTimeToLiveRequest,
                              context: grpc.aio.ServicerContext) -> rpc_pb2.LeaseTimeToLiveResponse:
        return await self._node.lease_time_to_live(request)

    @etcd_errors
    async def LeaseLeases(self, request: rpc_pb2.LeaseLeasesRequest,
                          context: grpc.aio.ServicerContext) -> rpc_pb2.LeaseLeasesResponse:
        return await self._node.lease_leases()
