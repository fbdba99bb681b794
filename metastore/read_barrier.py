"""Linearizable reads, on the asyncio side of a member.

A linearizable read (Range without `serializable`, a read-only Txn, lease
lookups, placement reads) first waits for this member to have applied every
entry committed before the read began. Raft confirms that without a log entry
(raft.read_index: the leader's commit index, confirmed by a heartbeat round).

Reads that arrive in the same event-loop iteration share one request to Raft.
The tick thread then puts every request that arrived since its last tick into
one round, so a burst of reads costs one round, not one per read.

A round goes between the members' event loops when it can
(metastore.read_peers: a cluster of two or three voters, connected), and
through Raft otherwise.

Raft answers NO_LEADER when there is no leader, or the leader changed while
it was being asked. Nothing was read yet, so the request is made again every
NO_LEADER_RETRY until the read's timeout. Clients see no error during an
election or a leadership hand-over, as with writes (metastore.proposer).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from metastore import errors
from metastore.errors import EtcdError
from metastore.proposer import NO_LEADER_RETRY, expire
from metastore.read_peers import ReadPeers


log = logging.getLogger("metastore.read_barrier")

DoneFn = Callable[[EtcdError | None], None]


class ReadIndexSource(Protocol):
    def read_barrier(self, done: DoneFn) -> None:
        """done(None) once everything committed before the call is applied
        here, done(error) otherwise; from any thread (raft.RaftNode)."""


class ReadBarrier:
    def __init__(self, raft: ReadIndexSource, *, timeout: float = 5.0, peers: ReadPeers | None = None) -> None:
        self._raft = raft
        self._peers = peers
        self.raft_rounds = 0  # requests made to Raft (the others: peers.confirmed)
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        # Reads waiting for the next request to Raft; one request is in
        # flight at a time, and whatever arrives meanwhile shares the next.
        self._gathering: list[asyncio.Future] = []
        self._asking = False  # a request is in flight or about to be made
        self._waiting: set[asyncio.Future] = set()  # every read not answered yet
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def wait(self) -> None:
        """Return once this member has applied every entry committed before
        the call (raises TIMEOUT, STOPPED or NOT_SUPPORTED_FOR_LEARNER)."""
        if self._closed:
            raise errors.STOPPED
        fut = self._loop.create_future()
        self._gathering.append(fut)
        self._waiting.add(fut)
        if not self._asking:
            self._asking = True
            self._loop.call_soon(self._ask)  # reads of this loop iteration join
        timer = self._loop.call_later(self._timeout, expire, fut)
        try:
            error = await fut  # a client that goes away cancels it: it drops out
        finally:
            timer.cancel()
            self._waiting.discard(fut)
        if error is not None:
            raise error

    def close(self) -> None:
        """Fail the reads still waiting (the member stops)."""
        self._closed = True
        for fut in self._waiting:
            if not fut.done():
                fut.set_result(errors.STOPPED)

    def _ask(self) -> None:
        group = [fut for fut in self._gathering if not fut.done()]  # reads given up drop out
        self._gathering = []
        if self._closed:
            self._answer(group, errors.STOPPED)
        if self._closed or not group:
            self._asking = False
            return
        loop = self._loop

        def done(error: EtcdError | None) -> None:  # tick or applier thread
            try:
                loop.call_soon_threadsafe(self._answered, group, error)
            except RuntimeError:
                pass  # the loop is closed: the server stopped, nobody waits

        def here(error: EtcdError | None) -> None:  # on the loop
            self._answered(group, error)

        try:
            taken = self._peers is not None and self._peers.start(here, done, self._via_raft)
        except Exception:  # never leave the reads without a round
            log.exception("a read index round between members failed to start; asking Raft")
            taken = False
        if not taken:
            self._via_raft(done)

    def _via_raft(self, done: DoneFn) -> None:
        self.raft_rounds += 1
        self._raft.read_barrier(done)

    def _answered(self, group: list[asyncio.Future], error: EtcdError | None) -> None:
        if error is errors.NO_LEADER and not self._closed:
            # Nothing was read: ask again shortly, with whatever joined since.
            # A read that waits too long ends with TIMEOUT (wait()); once
            # every read has, nobody is left to ask for.
            self._gathering[:0] = [fut for fut in group if not fut.done()]
            if self._gathering:
                self._loop.call_later(NO_LEADER_RETRY, self._ask)
            else:
                self._asking = False
            return
        self._answer(group, error)
        if self._gathering:
            self._ask()
        else:
            self._asking = False

    @staticmethod
    def _answer(group: list[asyncio.Future], error: EtcdError | None) -> None:
        for fut in group:
            if not fut.done():
                fut.set_result(error)
