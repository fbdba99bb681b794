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
waited (its lease ended) is told so rather than told it leads, and Observe
keeps following the election when the history under its watch is compacted
(etcd's stream just ends; here the values proclaimed in that gap are
skipped and the current one is sent).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from grpc import StatusCode

from metastore.api.pb import kv_pb2, rpc_pb2, v3election_pb2 as pb
from metastore.errors import EtcdError
from metastore.key_wait import created_at, detach, first_created, get_op, put_op, session_lease, wait_deletes, watch
from metastore.keys import prefix_range_end
from metastore.node import Node

NO_LEADER = EtcdError(StatusCode.UNKNOWN, "election: no leader")
NOT_LEADER = EtcdError(StatusCode.UNKNOWN, "election: not leader")
SESSION_EXPIRED = EtcdError(StatusCode.UNKNOWN, "election: session expired")
MISSING_LEADER_KEY = EtcdError(StatusCode.UNKNOWN, '"leader" field must be provided')


async def campaign(node: Node, req: pb.CampaignRequest) -> pb.CampaignResponse:
    """One transaction joins the queue (puts the campaigner's key unless its
    lease already has one); then wait for every key created before it to go.
    Campaigning again with the same lease keeps the place in the queue and
    proclaims the new value if it differs."""
    lease = await session_lease(node, req.lease)
    prefix = req.name + b"/"
    key = prefix + b"%x" % lease
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(key, 0)],
        success=[put_op(key, req.value, lease)],
        failure=[get_op(rpc_pb2.RangeRequest(key=key))]))
    mine = pb.LeaderKey(name=req.name, key=key, rev=resp.header.revision, lease=lease)
    if not resp.succeeded:
        existing = resp.responses[0].response_range.kvs[0]
        mine.rev = existing.create_revision
        if existing.value != req.value:
            try:
                await proclaim(node, pb.ProclaimRequest(leader=mine, value=req.value))
            except EtcdError:
                await resign(node, pb.ResignRequest(leader=mine))
                raise
    try:
        await wait_deletes(node, prefix, mine.rev - 1)
        still = await node.range(rpc_pb2.RangeRequest(key=key))
    except asyncio.CancelledError:
        # The caller gave up: leave the queue. After any other failure the
        # key stays, as etcd's does: campaigning again with the same lease
        # takes up the same place.
        detach(f"resign {key!r}", resign(node, pb.ResignRequest(leader=mine)))
        raise
    if not still.kvs or still.kvs[0].create_revision != mine.rev:
        raise SESSION_EXPIRED
    return pb.CampaignResponse(header=resp.header, leader=mine)


async def proclaim(node: Node, req: pb.ProclaimRequest) -> pb.ProclaimResponse:
    """Put the new value only while the leader's key is the one it created
    (same creation revision). The put names the LeaderKey's lease, as
    etcd's does (lease 0 gets a new one: key_wait.session_lease)."""
    if not req.HasField("leader"):
        raise MISSING_LEADER_KEY
    held = req.leader
    lease = await session_lease(node, held.lease)
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(held.key, held.rev)],
        success=[put_op(held.key, req.value, lease)]))
    if not resp.succeeded:
        raise NOT_LEADER
    return pb.ProclaimResponse(header=resp.header)


async def resign(node: Node, req: pb.ResignRequest) -> pb.ResignResponse:
    """Delete the leader's key if it is still that leadership's; answering
    success either way, as etcd does (there is nothing left to give up)."""
    if not req.HasField("leader"):
        raise MISSING_LEADER_KEY
    held = req.leader
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(held.key, held.rev)],
        success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=held.key))]))
    return pb.ResignResponse(header=resp.header)


async def leader(node: Node, name: bytes) -> pb.LeaderResponse:
    """The key under the election's prefix created first, with its value."""
    resp = await node.range(first_created(name + b"/"))
    if not resp.kvs:
        raise NO_LEADER
    return pb.LeaderResponse(header=resp.header, kv=resp.kvs[0])


async def observe(node: Node, name: bytes) -> AsyncIterator[pb.LeaderResponse]:
    """Each leader's key-value when it is first seen and each time it is
    proclaimed again, until the caller stops listening. Between leaders
    nothing is sent."""
    prefix = name + b"/"
    last_sent: tuple[bytes, int] | None = None  # (key, mod_revision)
    while True:
        current = await _current_leader(node, prefix)
        if current is None:
            continue  # history compacted under the wait: read again
        header, kv = current
        if last_sent != (kv.key, kv.mod_revision):
            last_sent = (kv.key, kv.mod_revision)
            yield pb.LeaderResponse(header=header, kv=kv)
        async with contextlib.aclosing(_leader_updates(node, kv.key, header.revision + 1)) as updates:
            async for update in updates:
                last_sent = (update.kv.key, update.kv.mod_revision)
                yield update


async def _current_leader(node: Node, prefix: bytes
                          ) -> tuple[rpc_pb2.ResponseHeader, kv_pb2.KeyValue] | None:
    """The leader now, or else the first key put under `prefix` from now on
    (its header at that put's revision); None if the watch's history was
    compacted before one came."""
    resp = await node.range(first_created(prefix))
    if resp.kvs:
        return resp.header, resp.kvs[0]
    watching = watch(node, prefix, resp.header.revision, range_end=prefix_range_end(prefix))
    async with contextlib.aclosing(watching) as responses:
        async for wresp in responses:
            for ev in wresp.events:
                if ev.type == kv_pb2.Event.PUT:
                    header = rpc_pb2.ResponseHeader()
                    header.CopyFrom(wresp.header)
                    header.revision = ev.kv.mod_revision
                    return header, ev.kv
    return None


async def _leader_updates(node: Node, key: bytes, revision: int) -> AsyncIterator[pb.LeaderResponse]:
    """The leader's new values from `revision` on, until its key is deleted
    (leadership passes on) or the watch's history is compacted."""
    async with contextlib.aclosing(watch(node, key, revision)) as responses:
        async for wresp in responses:
            for ev in wresp.events:
                if ev.type == kv_pb2.Event.DELETE:
                    return
                yield pb.LeaderResponse(header=wresp.header, kv=ev.kv)
