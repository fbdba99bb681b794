"""metastorepb.Raft: GetRaftStatus over gRPC, for `metastore ctl` and tests."""
from __future__ import annotations

import grpc

from metastore import liveness
from metastore.api.errors import etcd_errors
from metastore.api.pb import metastore_pb2, metastore_pb2_grpc
from metastore.node import Node


class RaftStatusService(metastore_pb2_grpc.RaftServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def GetRaftStatus(self, request: metastore_pb2.GetRaftStatusRequest,
                            context: grpc.aio.ServicerContext) -> metastore_pb2.GetRaftStatusResponse:
        st = self._node.raft_status()
        return metastore_pb2.GetRaftStatusResponse(
            node_id=st.node_id, term=st.term, leader_id=st.leader_id, state=st.state,
            applied=st.applied, commit=st.commit,
            liveness=liveness.read(self._node.store, self._node.member_id).state.name,
            http_urls=self._node.cfg.listen_metrics_urls or [])
