"""Waiting on keys, for the lock and election services: who holds a prefix
first, and when the keys ahead of a waiter are gone.

Both services queue waiters by creation revision under a prefix (etcd's
concurrency recipes, served inside the server as etcd 3.4 does): the holder
is the key created first, and a waiter holds once every key created before
its own has been deleted. The reads here are linearizable Range calls on the
node; the waits are watches on the node's own WatchHub, started at the read's
revision so that no delete in between is missed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable

from metastore import errors
from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.keys import prefix_range_end
from metastore.node import Node

log = logging.getLogger("metastore.key_wait")

# etcd's session TTL when a lock or election request names no lease
# (clientv3/concurrency's default, which etcd's server uses for lease 0).
DEFAULT_SESSION_TTL = 60

# Tasks that outlive the request that started them (a waiter's clean-up
# after its client went away); kept here so they are not garbage-collected.
_detached: set[asyncio.Task] = set()


async def session_lease(node: Node, lease: int) -> int:
    """The request's lease, or for lease 0 a new one of DEFAULT_SESSION_TTL
    that nobody keeps alive (etcd's server does the same)."""
    if lease:
        return lease
    resp = await node.lease_grant(rpc_pb2.LeaseGrantRequest(TTL=DEFAULT_SESSION_TTL))
    return resp.ID


def first_created(prefix: bytes, max_create_revision: int = 0, last: bool = False) -> rpc_pb2.RangeRequest:
    """The key under `prefix` created first (or, with `last`, the one created
    last), optionally among those created at or before `max_create_revision`."""
    order = rpc_pb2.RangeRequest.DESCEND if last else rpc_pb2.RangeRequest.ASCEND
    return rpc_pb2.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), limit=1,
                                sort_order=order, sort_target=rpc_pb2.RangeRequest.CREATE,
                                max_create_revision=max_create_revision)


def put_op(key: bytes, value: bytes, lease: int) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def get_op(req: rpc_pb2.RangeRequest) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=req)


def created_at(key: bytes, revision: int) -> rpc_pb2.Compare:
    """Compare: `key` was created at `revision` (0: it does not exist)."""
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL,
                           create_revision=revision)


async def watch(node: Node, key: bytes, start_revision: int,
                range_end: bytes = b"") -> AsyncIterator[rpc_pb2.WatchResponse]:
    """The node's watch responses with events for `key` (or the range) from
    `start_revision`. Ends when the watch is cancelled (its history was
    compacted away); raises STOPPED when the member stops. Iterate it inside
    `contextlib.aclosing` so the watch ends as soon as the caller stops."""
    stream = node.watch_hub.open_stream(fill_header=node.fill_header_at)
    try:
        stream.create(rpc_pb2.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision))
        while True:
            resp = await stream.next_response()
            if resp is None:
                raise errors.STOPPED
            if resp.canceled:
                return
            if resp.events:
                yield resp
    finally:
        stream.close()


async def wait_deleted(node: Node, key: bytes, revision: int) -> None:
    """Until `key` is deleted at or after `revision` (or the watch's history is
    compacted, after which the caller reads again)."""
    async with contextlib.aclosing(watch(node, key, revision)) as responses:
        async for resp in responses:
            if any(ev.type == kv_pb2.Event.DELETE for ev in resp.events):
                return


async def wait_deletes(node: Node, prefix: bytes, max_create_revision: int) -> rpc_pb2.ResponseHeader:
    """Until no key under `prefix` created at or before `max_create_revision`
    is left; the header of the read that found none. Waits on the newest of
    them first: once it is gone, a read shows what else is left."""
    while True:
        resp = await node.range(first_created(prefix, max_create_revision, last=True))
        if not resp.kvs:
            return resp.header
        await wait_deleted(node, resp.kvs[0].key, resp.header.revision)


def detach(what: str, coro: Awaitable[object]) -> None:
    """Run `coro` to its end even though the request that wants it is being
    cancelled (a waiter's clean-up); failures are logged."""
    async def run() -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)

    task = asyncio.ensure_future(run())
    _detached.add(task)
    task.add_done_callback(_detached.discard)
