"""Leader elections served by the member (etcd's v3election service).

An election `name` is the prefix `name/`. A campaigner puts its key
`name/<lease in hex>` with its value, bound to its lease, and leads once every
key created before its own is gone; the leader is always the key under the
prefix created first. The LeaderKey it gets back (key, creation revision,
lease) is its proof of leadership: Proclaim and Resign act only while that key
still has that creation revision, so a leader whose lease ran out cannot
overwrite its successor. Observe follows the leader's values as they change,
from one leader to the next.

Answers follow etcd 3.4's server, which runs the same recipes through an
in-process client: errors reach the client with code UNKNOWN and etcd's
message. Unlike etcd 3.4, a campaigner whose own key disappeared while it
waited (its lease ended) is told so rather than told it leads.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from grpc import StatusCode

from metastore.api.pb import kv_pb2, rpc_pb2, v3election_pb2 as pb
from metastore.errors import EtcdError
from metastore.key_wait import created_at, detach, first_created, get_op, put_op, wait_deletes, watch
from metastore.lock import session_lease
from metastore.node import Node

NO_LEADER = EtcdError(StatusCode.UNKNOWN, "election: no leader")
NOT_LEADER = EtcdError(StatusCode.UNKNOWN, "election: not leader")
SESSION_EXPIRED = EtcdError(StatusCode.UNKNOWN, "election: session expired")
MISSING_LEADER_KEY = EtcdError(StatusCode.UNKNOWN, '"leader" field must be provided')


async def campaign(node: Node, req: pb.CampaignRequest) -> pb.CampaignResponse:
    lease = await session_lease(node, req.lease)
    prefix = req.name + b"/"
    key = prefix + b"%x" % lease
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(key, 0)],
        success=[put_op(key, req.value, lease)],
        failure=[get_op(rpc_pb2.RangeRequest(key=key))]))
    leader = pb.LeaderKey(name=req.name, key=key, rev=resp.header.revision, lease=lease)
    if not resp.succeeded:  # campaigning again with the same lease
        mine = resp.responses[0].response_range.kvs[0]
        leader.rev = mine.create_revision
        if mine.value != req.value:
            try:
                await proclaim(node, pb.ProclaimRequest(leader=leader, value=req.value))
            except EtcdError:
                await resign(node, pb.ResignRequest(leader=leader))
                raise
    try:
        await wait_deletes(node, prefix, leader.rev - 1)
        still = await node.range(rpc_pb2.RangeRequest(key=key))
    except asyncio.CancelledError:
        detach(f"resign {key!r}", resign(node, pb.ResignRequest(leader=leader)))
        raise
    if not still.kvs or still.kvs[0].create_revision != leader.rev:
        raise SESSION_EXPIRED
    return pb.CampaignResponse(header=resp.header, leader=leader)


async def proclaim(node: Node, req: pb.ProclaimRequest) -> pb.ProclaimResponse:
    if not req.HasField("leader"):
        raise MISSING_LEADER_KEY
    leader = req.leader
    lease = await session_lease(node, leader.lease)
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(leader.key, leader.rev)],
        success=[put_op(leader.key, req.value, lease)]))
    if not resp.succeeded:
        raise NOT_LEADER
    return pb.ProclaimResponse(header=resp.header)


async def resign(node: Node, req: pb.ResignRequest) -> pb.ResignResponse:
    """Delete the leader's key if it is still that leadership's; answering
    success either way, as etcd does (there is nothing left to give up)."""
    if not req.HasField("leader"):
        raise MISSING_LEADER_KEY
    leader = req.leader
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(leader.key, leader.rev)],
        success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=leader.key))]))
    return pb.ResignResponse(header=resp.header)


async def leader(node: Node, name: bytes) -> pb.LeaderResponse:
    resp = await node.range(first_created(name + b"/"))
    if not resp.kvs:
        raise NO_LEADER
    return pb.LeaderResponse(header=resp.header, kv=resp.kvs[0])


async def observe(node: Node, name: bytes) -> AsyncIterator[pb.LeaderResponse]:
    """Each leader's key-value as it is first seen and every time it is
    proclaimed again, until the caller stops listening. Between leaders
    nothing is sent; a leader that changes while no one leads is sent once
    its key is put."""
    prefix = name + b"/"
    sent: tuple[bytes, int] | None = None  # (key, mod_revision) last sent
    while True:
        resp = await node.range(first_created(prefix))
        if resp.kvs:
            header, kv = resp.header, resp.kvs[0]
        else:
            found = await _first_put(node, prefix, resp.header.revision)
            if found is None:
                continue  # history compacted under the wait: read again
            header, kv = found
        if sent != (kv.key, kv.mod_revision):
            sent = (kv.key, kv.mod_revision)
            yield pb.LeaderResponse(header=header, kv=kv)
        async for wresp in watch(node, kv.key, header.revision + 1):
            for ev in wresp.events:
                if ev.type == kv_pb2.Event.DELETE:
                    break
                sent = (ev.kv.key, ev.kv.mod_revision)
                yield pb.LeaderResponse(header=wresp.header, kv=ev.kv)
            else:
                continue
            break  # the leader's key is gone: find the next leader


async def _first_put(node: Node, prefix: bytes, revision: int
                     ) -> tuple[rpc_pb2.ResponseHeader, kv_pb2.KeyValue] | None:
    """The first key put under `prefix` from `revision` on, with a header at
    its revision (None if the watch's history was compacted first)."""
    async for wresp in watch(node, prefix, revision, range_end=first_created(prefix).range_end):
        for ev in wresp.events:
            if ev.type == kv_pb2.Event.PUT:
                header = rpc_pb2.ResponseHeader()
                header.CopyFrom(wresp.header)
                header.revision = ev.kv.mod_revision
                return header, ev.kv
    return None
