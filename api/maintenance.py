"""etcdserverpb.Maintenance: Status, HashKV (the rest arrives with later work)."""
from __future__ import annotations

import grpc

from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.node import Node


class MaintenanceService(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def Status(self, request: rpc_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> rpc_pb2.StatusResponse:
        return self._node.status()

    @etcd_errors
    async def HashKV(self, request: rpc_pb2.HashKVRequest,
                     context: grpc.aio.ServicerContext) -> rpc_pb2.HashKVResponse:
        return await self._node.hash_kv(request.revision)
