"""Proposal batching, on the asyncio side of a member.

Client requests arrive on the event loop. Rather than one Raft entry (and one
round trip, one journal write, one message per peer) per request, the
proposer gathers everything that arrives while the loop is busy into one
`ProposalBatch` entry, keeping at most `max_inflight` entries in flight.
(Linearizable reads need no entry: metastore.read_barrier.)
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import Any

from metastore import errors
from metastore.api.pb import raft_entry_pb2
from metastore.errors import EtcdError
from metastore.raft import RaftNode

log = logging.getLogger("metastore.proposer")

# Errors that mean Raft could not carry a request (as opposed to a request
# the state machine refused, such as a compacted revision).
RAFT_FAILURES = (errors.TIMEOUT, errors.LEADER_CHANGED, errors.NO_LEADER, errors.TOO_MANY_REQUESTS,
                 errors.TIMEOUT_LEADER_FAIL, errors.STOPPED, errors.NOT_CAPABLE)


# A batch no leader could take (an election under way) is offered again
# after this long, while its requests still wait: pysyncobj refuses it before
# appending it anywhere, so sending it again cannot apply it twice.
NO_LEADER_RETRY = 0.05


# A committed entry waits for its apply at most this long past its own
# timeout (seconds): only a stuck applier takes so long.
APPLY_BACKSTOP = 120.0


def expire(fut: asyncio.Future) -> None:
    """A request's timer ran out: it is answered TIMEOUT."""
    if not fut.done():
        fut.set_result(errors.TIMEOUT)


def expire_unless_committed(fut: asyncio.Future, batch: "_Batch") -> None:
    """expire(), unless the request's entry is committed -- then it will be
    applied, and it waits for that (the request timeout is for getting
    committed: no leader, no quorum; a "timed out" for a request applied
    anyway only leaves its client guessing). Its client's own deadline
    still ends the wait."""
    if not batch.committed:
        expire(fut)


class _Batch:
    __slots__ = ("proposals", "futures", "size", "timer", "opened", "committed")

    def __init__(self) -> None:
        self.proposals: list[raft_entry_pb2.Proposal] = []
        self.futures: list[asyncio.Future] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        # When its first request joined (loop time): retries end a request
        # timeout after that, when its clients stop waiting.
        self.opened: float | None = None
        # Set by Raft's tick thread once the entry is committed (a plain
        # flag, read when a timer fires: no wake-up of the loop per entry).
        self.committed = False


class Proposer:
    def __init__(self, raft: RaftNode, origin: int, *, timeout: float = 5.0,
                 max_batch_bytes: int = 4 * 1024 * 1024, max_inflight: int = 4) -> None:
        self._raft = raft
        self._origin = origin
        self._timeout = timeout
        self._max_batch_bytes = max_batch_bytes
        self._max_inflight = max_inflight
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = _Batch()
        # Full batches waiting for a free in-flight slot, oldest first.
        self._ready: collections.deque[_Batch] = collections.deque()
        self._flush_scheduled = False
        self._inflight = 0
        self._closed = False
        self._paused = 0  # nested pause() calls not yet resumed
        # For metrics (etcd_server_proposals_pending / _failed_total):
        # requests waiting for their entry, and those Raft failed (timeout,
        # leader lost, stopped, the client gone) -- not request errors.
        self.pending = 0
        self.failed = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def propose(self, proposal: raft_entry_pb2.Proposal) -> Any:
        """Replicate one request; returns its apply result (raises its error)."""
        if self._closed:
            raise errors.STOPPED
        proposal.request_id = next(self._ids)
        size = proposal.ByteSize()
        if self._open.size + size > self._max_batch_bytes and self._open.proposals:
            # Keep every entry under the Raft message limit; the full batch
            # waits its turn like any other (max_inflight still holds).
            self._ready.append(self._open)
            self._open = _Batch()
        fut = self._join_open_batch()
        batch = self._open
        batch.proposals.append(proposal)
        batch.futures.append(fut)
        batch.size += size
        self._schedule_flush()
        self.pending += 1
        try:
            result = await self._wait(fut, batch)
        except BaseException:  # timed out, or the client went away
            self.failed += 1
            raise
        finally:
            self.pending -= 1
        if isinstance(result, EtcdError):
            if result in RAFT_FAILURES:
                self.failed += 1
            raise result
        return result

    def _join_open_batch(self) -> asyncio.Future:
        """A future for one more request in the open batch (noting when the
        batch's first request joined)."""
        if self._open.opened is None:
            self._open.opened = self._loop.time()
        return self._loop.create_future()

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def pause(self) -> None:
        """Hold new entries back (they keep gathering) so that a leadership
        transfer target can catch up with a log that stops growing. Pairs
        with resume(); pauses nest."""
        self._paused += 1

    @property
    def paused(self) -> bool:
        return self._paused > 0

    def resume(self) -> None:
        self._paused = max(0, self._paused - 1)
        if not self._paused:
            self._schedule_flush()

    # -- batching ------------------------------------------------------------
    async def _wait(self, fut: asyncio.Future, batch: _Batch) -> Any:
        """The request's result, or TIMEOUT. The future is the request's own:
        a client that goes away cancels it, and whoever finishes the batch
        skips it. (A timer rather than wait_for(shield()): a third of the
        cost, for every request.)"""
        timer = self._loop.call_later(self._timeout, expire_unless_committed, fut, batch)
        try:
            return await fut
        finally:
            timer.cancel()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon: everything that arrives in this loop iteration joins.
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._paused:
            return  # resume() flushes
        while self._inflight < self._max_inflight and self._ready:
            self._submit(self._ready.popleft())
        if self._inflight < self._max_inflight and self._open.proposals:
            batch, self._open = self._open, _Batch()
            self._submit(batch)
        # else: a finishing entry calls _flush again

    def _submit(self, batch: _Batch) -> None:
        payload = raft_entry_pb2.ProposalBatch(origin=self._origin, proposals=batch.proposals).SerializeToString()
        self._inflight += 1
        loop = self._loop
        batch.timer = loop.call_later(self._timeout * 2, self._timed_out, batch)

        def done(result: Any, error: EtcdError | None) -> None:  # Raft's tick or applier thread
            try:
                loop.call_soon_threadsafe(self._finish, batch, result, error)
            except RuntimeError:
                pass  # the loop is closed: the server stopped, nobody waits

        def committed() -> None:  # Raft's tick thread
            batch.committed = True

        self._raft.submit(payload, done, committed)

    def _timed_out(self, batch: _Batch) -> None:
        """No answer from Raft for twice the request timeout: the batch
        fails with TIMEOUT and frees its in-flight slot -- unless it is
        committed (see expire_unless_committed): then it waits up to APPLY_BACKSTOP more."""
        if batch.committed and batch.timer is not None:
            batch.timer = self._loop.call_later(APPLY_BACKSTOP, self._finish, batch, None, errors.TIMEOUT)
            return
        self._finish(batch, None, errors.TIMEOUT)

    def _retry(self, batch: _Batch) -> None:
        if self._closed:
            self._resolve(batch, None, errors.STOPPED)
            return
        self._ready.appendleft(batch)
        self._flush()

    def _finish(self, batch: _Batch, results: Any, error: EtcdError | None) -> None:
        if batch.timer is None:
            return  # already finished (result after timeout, or vice versa)
        batch.timer.cancel()
        batch.timer = None
        self._inflight -= 1
        if error is errors.NO_LEADER and not self._closed \
                and batch.opened is not None and self._loop.time() + NO_LEADER_RETRY < batch.opened + self._timeout:
            self._loop.call_later(NO_LEADER_RETRY, self._retry, batch)
            self._flush()
            return
        self._resolve(batch, results, error)
        self._flush()

    def _resolve(self, batch: _Batch, results: Any, error: EtcdError | None) -> None:
        """Hand each waiter its result, or the error."""
        if error is None and results is not None and len(results) != len(batch.futures):
            log.error("entry returned %d results for %d proposals", len(results), len(batch.futures))
            error = errors.EtcdError(errors.STOPPED.code, "etcdserver: internal error: result mismatch")
        for i, fut in enumerate(batch.futures):
            if not fut.done():
                fut.set_result(error if error is not None else results[i])
