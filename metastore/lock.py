"""Distributed locks served by the member (etcd's v3lock service).

A lock `name` is the prefix `name/`; a caller queues by putting its own key
`name/<lease in hex>` bound to its lease, and holds the lock once every key
created before its own is gone. The lease is the caller's: when it is revoked
or expires, the key goes and the next waiter holds the lock. Unlock deletes
the key. Asking again with the same lease answers the same key.

As in etcd 3.4, the server does not keep the lease alive -- the client does;
lease 0 gets a new lease that nobody keeps alive (key_wait.session_lease).
Unlike etcd 3.4, a waiter whose own key disappeared while it waited (its
lease ended) is told so ("mutex: session is expired", etcd 3.5's answer)
rather than told it holds a lock it does not.
"""
from __future__ import annotations

import asyncio

from grpc import StatusCode

from metastore.api.pb import rpc_pb2, v3lock_pb2
from metastore.errors import EtcdError
from metastore.key_wait import created_at, detach, first_created, get_op, put_op, session_lease, wait_deletes
from metastore.node import Node

SESSION_EXPIRED = EtcdError(StatusCode.UNKNOWN, "mutex: session is expired")


async def lock(node: Node, name: bytes, lease: int) -> v3lock_pb2.LockResponse:
    """One transaction queues the caller (puts its key unless that lease
    already has one) and reads the holder; if the holder is someone else,
    wait for every key created before ours to go."""
    lease = await session_lease(node, lease)
    prefix = name + b"/"
    key = prefix + b"%x" % lease
    holder = get_op(first_created(prefix))
    resp = await node.txn(rpc_pb2.TxnRequest(
        compare=[created_at(key, 0)],
        success=[put_op(key, b"", lease), holder],
        failure=[get_op(rpc_pb2.RangeRequest(key=key)), holder]))
    mine = resp.header.revision if resp.succeeded else resp.responses[0].response_range.kvs[0].create_revision
    first = resp.responses[1].response_range.kvs
    if not first or first[0].create_revision == mine:
        return v3lock_pb2.LockResponse(header=resp.header, key=key)
    try:
        header = await wait_deletes(node, prefix, mine - 1)
        still = await node.range(rpc_pb2.RangeRequest(key=key))
    except (asyncio.CancelledError, EtcdError):
        # The caller gave up, or the wait failed: leave the queue, as etcd's
        # Mutex does, so the key does not hold up everyone behind it.
        detach(f"unlock {key!r}", unlock(node, key))
        raise
    if not still.kvs or still.kvs[0].create_revision != mine:
        # Our key went while we waited (the lease ended, or an unlock by
        # another call with the same lease); one put since then is a new
        # place at the back of the queue, not ours.
        raise SESSION_EXPIRED
    return v3lock_pb2.LockResponse(header=header, key=key)


async def unlock(node: Node, key: bytes) -> v3lock_pb2.UnlockResponse:
    resp = await node.delete_range(rpc_pb2.DeleteRangeRequest(key=key))
    return v3lock_pb2.UnlockResponse(header=resp.header)
