"""etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact."""
from __future__ import annotations

import grpc

from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.node import Node


class KVService(rpc_pb2_grpc.KVServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def Range(self, request: rpc_pb2.RangeRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.RangeResponse:
        return await self._node.range(request)

    @etcd_errors
    async def Put(self, request: rpc_pb2.PutRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.PutResponse:
        return await self._node.put(request)

    @etcd_errors
    async def DeleteRange(self, request: rpc_pb2.DeleteRangeRequest,
                          context: grpc.aio.ServicerContext) -> rpc_pb2.DeleteRangeResponse:
        return await self._node.delete_range(request)

    @etcd_errors
    async def Txn(self, request: rpc_pb2.TxnRequest, context: grpc.aio.ServicerContext) -> rpc_pb2.TxnResponse:
        return await self._node.txn(request)

    @etcd_errors
    async def Compact(self, request: rpc_pb2.CompactionRequest,
                      context: grpc.aio.ServicerContext) -> rpc_pb2.CompactionResponse:
        return await self._node.compact(request)
