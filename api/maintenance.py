"""etcdserverpb.Maintenance: Alarm, Status, Defragment, Hash, HashKV,
Snapshot, MoveLeader. A learner answers only Status, as etcd 3.4's does.

The work is in `metastore.maintenance` (one member's side of each call) and
`Node.move_leader`; this layer only maps requests and errors.
"""
from __future__ import annotations

from typing import AsyncIterator

import grpc

from metastore.api.errors import etcd_errors, etcd_stream_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.node import Node


class MaintenanceService(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def Alarm(self, request: rpc_pb2.AlarmRequest,
                    context: grpc.aio.ServicerContext) -> rpc_pb2.AlarmResponse:
        self._node.refuse_on_learner()
        return await self._node.maintenance.alarm(request)

    @etcd_errors
    async def Status(self, request: rpc_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> rpc_pb2.StatusResponse:
        resp = self._node.status()
        # etcd 3.4 lists the active alarms among the errors (ERRORS column of
        # `etcdctl endpoint status`).
        resp.errors.extend(self._node.maintenance.alarm_errors())
        return resp

    @etcd_errors
    async def Defragment(self, request: rpc_pb2.DefragmentRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.DefragmentResponse:
        self._node.refuse_on_learner()
        return await self._node.maintenance.defragment()

    @etcd_errors
    async def Hash(self, request: rpc_pb2.HashRequest,
                   context: grpc.aio.ServicerContext) -> rpc_pb2.HashResponse:
        self._node.refuse_on_learner()
        return await self._node.maintenance.hash()

    @etcd_errors
    async def HashKV(self, request: rpc_pb2.HashKVRequest,
                     context: grpc.aio.ServicerContext) -> rpc_pb2.HashKVResponse:
        self._node.refuse_on_learner()
        return await self._node.hash_kv(request.revision)

    @etcd_errors
    async def MoveLeader(self, request: rpc_pb2.MoveLeaderRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.MoveLeaderResponse:
        self._node.refuse_on_learner()
        # As in etcd, the hand-over may take as long as the client waits
        # (etcdctl: its --command-timeout), within the server's own limit.
        remaining = context.time_remaining()
        timeout = None if remaining is None else max(0.0, remaining - 0.05)
        return await self._node.move_leader(request.targetID, timeout)

    @etcd_stream_errors
    async def Snapshot(self, request: rpc_pb2.SnapshotRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.SnapshotResponse]:
        self._node.refuse_on_learner()
        async for resp in self._node.maintenance.snapshot():
            yield resp
