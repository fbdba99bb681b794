"""etcdserverpb.Cluster: MemberList, MemberAdd, MemberRemove (membership
changes run on the leader, one at a time; see Node.member_add)."""
from __future__ import annotations

import grpc

from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.cluster import member_pb
from metastore.errors import EtcdError
from metastore.node import Node

_NO_LEARNERS = EtcdError(grpc.StatusCode.UNIMPLEMENTED, "etcdserver: learner members are not supported yet")
_NO_UPDATE = EtcdError(grpc.StatusCode.UNIMPLEMENTED,
                       "etcdserver: changing a member's peer URLs is not supported yet; remove and add it")


class ClusterService(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def MemberList(self, request: rpc_pb2.MemberListRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.MemberListResponse:
        if request.linearizable:
            await self._node.proposer.barrier()
        return rpc_pb2.MemberListResponse(header=self._node.header(),
                                          members=[member_pb(m) for m in self._node.members()])

    @etcd_errors
    async def MemberAdd(self, request: rpc_pb2.MemberAddRequest,
                        context: grpc.aio.ServicerContext) -> rpc_pb2.MemberAddResponse:
        return await self._node.member_add(request)

    @etcd_errors
    async def MemberRemove(self, request: rpc_pb2.MemberRemoveRequest,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.MemberRemoveResponse:
        return await self._node.member_remove(request)

    @etcd_errors
    async def MemberUpdate(self, request: rpc_pb2.MemberUpdateRequest,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.MemberUpdateResponse:
        if self._node.membership.get(request.ID) is None:
            raise EtcdError(grpc.StatusCode.NOT_FOUND, "etcdserver: member not found")
        raise _NO_UPDATE

    @etcd_errors
    async def MemberPromote(self, request: rpc_pb2.MemberPromoteRequest,
                            context: grpc.aio.ServicerContext) -> rpc_pb2.MemberPromoteResponse:
        if self._node.membership.get(request.ID) is None:
            raise EtcdError(grpc.StatusCode.NOT_FOUND, "etcdserver: member not found")
        raise _NO_LEARNERS
