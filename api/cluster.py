"""etcdserverpb.Cluster: MemberList (membership changes arrive with later work)."""
from __future__ import annotations

import grpc

from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.cluster import Member
from metastore.node import Node


def member_pb(m: Member) -> rpc_pb2.Member:
    return rpc_pb2.Member(ID=m.id, name=m.name, peerURLs=m.peer_urls, clientURLs=m.client_urls,
                          isLearner=m.is_learner)


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
