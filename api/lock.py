"""v3lockpb.Lock: Lock and Unlock, served by metastore/lock.py."""
from __future__ import annotations

import grpc

from metastore import lock
from metastore.api.errors import recipe_errors
from metastore.api.pb import v3lock_pb2, v3lock_pb2_grpc
from metastore.node import Node


class LockService(v3lock_pb2_grpc.LockServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @recipe_errors
    async def Lock(self, request: v3lock_pb2.LockRequest,
                   context: grpc.aio.ServicerContext) -> v3lock_pb2.LockResponse:
        self._node.refuse_on_learner()
        return await lock.lock(self._node, request.name, request.lease)

    @recipe_errors
    async def Unlock(self, request: v3lock_pb2.UnlockRequest,
                     context: grpc.aio.ServicerContext) -> v3lock_pb2.UnlockResponse:
        self._node.refuse_on_learner()
        return await lock.unlock(self._node, request.key)
