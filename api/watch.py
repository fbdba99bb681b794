"""etcdserverpb.Watch: the bidi Watch stream, served by the node's WatchHub.

Each call gets one `WatchStream` from the hub. A reader task applies the
client's requests (create / cancel / progress) as they arrive; the handler
itself sends whatever the stream queues, in order. Like etcd, a client that
half-closes its side keeps its watches until it cancels the call.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterable, AsyncIterator

import grpc

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.api.errors import etcd_stream_errors
from metastore.api.grpc_server import SerializedMessages
from metastore.node import Node
from metastore.watch_hub import WatchStream

log = logging.getLogger("metastore.api.watch")

# An encoded stream sends what its queue holds in one write, up to about this
# much (a stream never holds the loop for long, and a write stays a few frames).
SEND_BATCH_BYTES = 256 * 1024


class WatchService(rpc_pb2_grpc.WatchServicer):
    def __init__(self, node: Node, encoded: bool = False) -> None:
        """`encoded`: the handler yields the stream's queued responses
        serialized, several at a time (SerializedMessages), which the gRPC
        server sends as they are in one write (the hub encodes an event once
        for all its watchers); the JSON gateway wants messages."""
        self._node = node
        self._encoded = encoded

    @etcd_stream_errors
    async def Watch(self, request_iterator: AsyncIterable[rpc_pb2.WatchRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[rpc_pb2.WatchResponse | SerializedMessages]:
        self._node.refuse_on_learner()  # etcd 3.4's learner refuses every stream
        stream = self._node.watch_hub.open_stream(
            max_response_bytes=self._node.cfg.max_request_bytes, fill_header=self._node.fill_header_at,
            encoded=self._encoded)
        reader = asyncio.ensure_future(self._read(request_iterator, stream))
        try:
            if self._encoded:
                while True:
                    batch = await stream.next_responses(SEND_BATCH_BYTES)
                    if batch is None:
                        return
                    yield SerializedMessages(m if type(m) is bytes else m.SerializeToString()  # type: ignore[union-attr]
                                             for m in batch)
            while True:
                resp = await stream.next_response()
                if resp is None:
                    return
                yield resp
        finally:
            reader.cancel()
            stream.close()

    @staticmethod
    async def _read(request_iterator: AsyncIterable[rpc_pb2.WatchRequest], stream: WatchStream) -> None:
        """Apply requests until the client half-closes (watches stay) or the
        call breaks (the stream ends). A request that trips a bug is logged
        and skipped: bad input must not take the server or the stream down."""
        try:
            async for req in request_iterator:
                await stream.wait_for_room()
                try:
                    stream.handle(req)
                except Exception:
                    log.exception("watch request failed: %s", req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call broke (client gone, reset, ...)
            log.debug("watch stream receive ended: %r", exc)
            stream.close()
