"""etcdserverpb.Cluster: MemberList, MemberAdd, MemberRemove, MemberUpdate,
MemberPromote (membership changes run on the leader, one at a time; see
Node.member_add).

As in etcd 3.4, a learner answers none of them: it serves only Status and
serializable reads, and a client (etcdctl with several endpoints) retries
another member on its UNAVAILABLE "rpc not supported for learner".
"""
from __future__ import annotations

import grpc

from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.cluster import member_pb
from metastore.node import Node


class ClusterService(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def MemberList(self, request: rpc_pb2.MemberListRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.MemberListResponse:
        self._node.refuse_on_learner()
        if request.linearizable:
            await self._node.read_barrier.wait()
        return rpc_pb2.MemberListResponse(header=self._node.header(with_revision=False),
                                          members=[member_pb(m) for m in self._node.members()])

    @etcd_errors
    async def MemberAdd(self, request: rpc_pb2.MemberAddRequest,
                        context: grpc.aio.ServicerContext) -> rpc_pb2.MemberAddResponse:
        self._node.refuse_on_learner()
        return await self._node.member_add(request)

    @etcd_errors
    async def MemberRemove(self, request: rpc_pb2.MemberRemoveRequest,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.MemberRemoveResponse:
        self._node.refuse_on_learner()
        return await self._node.member_remove(request)

    @etcd_errors
    async def MemberUpdate(self, request: rpc_pb2.MemberUpdateRequest,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.MemberUpdateResponse:
        self._node.refuse_on_learner()
        return await self._node.member_update(request)

    @etcd_errors
    async def MemberPromote(self, request: rpc_pb2.MemberPromoteRequest,
                            context: grpc.aio.ServicerContext) -> rpc_pb2.MemberPromoteResponse:
        self._node.refuse_on_learner()
        return await self._node.member_promote(request)
