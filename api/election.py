"""v3electionpb.Election: Campaign, Proclaim, Leader, Observe and Resign,
served by metastore/election.py."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from metastore import election
from metastore.api.errors import recipe_errors, recipe_stream_errors
from metastore.api.pb import v3election_pb2 as pb, v3election_pb2_grpc
from metastore.node import Node


class ElectionService(v3election_pb2_grpc.ElectionServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @recipe_errors
    async def Campaign(self, request: pb.CampaignRequest,
                       context: grpc.aio.ServicerContext) -> pb.CampaignResponse:
        self._node.refuse_on_learner()
        return await election.campaign(self._node, request)

    @recipe_errors
    async def Proclaim(self, request: pb.ProclaimRequest,
                       context: grpc.aio.ServicerContext) -> pb.ProclaimResponse:
        self._node.refuse_on_learner()
        return await election.proclaim(self._node, request)

    @recipe_errors
    async def Leader(self, request: pb.LeaderRequest,
                     context: grpc.aio.ServicerContext) -> pb.LeaderResponse:
        self._node.refuse_on_learner()
        return await election.leader(self._node, request.name)

    @recipe_errors
    async def Resign(self, request: pb.ResignRequest,
                     context: grpc.aio.ServicerContext) -> pb.ResignResponse:
        self._node.refuse_on_learner()
        return await election.resign(self._node, request)

    @recipe_stream_errors
    async def Observe(self, request: pb.LeaderRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LeaderResponse]:
        """Unlike the unary calls, a failure ends the stream with its status
        (etcd's stream just ends), so the client knows to observe again."""
        self._node.refuse_on_learner()
        async with contextlib.aclosing(election.observe(self._node, request.name)) as responses:
            async for resp in responses:
                yield resp
