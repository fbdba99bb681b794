"""Linearizable reads without a log entry: Raft's ReadIndex.

A linearizable read must see every write committed before it began. Committing
an entry for it would cost a journal write and an fsync on every member and an
apply everywhere. Instead the leader takes its commit index when the read
arrives (the read index) and then proves it still leads. After it has proved
that, nothing can have been committed before the read that the read index does
not cover. The member that serves the read then waits until it has applied the
read index.

The proof is a heartbeat round, carried on messages pysyncobj sends anyway:
- The leader numbers rounds, and while reads wait it tags every
  append_entries it sends with the current round ('ms_read').
- A follower that accepts such a message (its sender's term is at least its
  own) echoes the round and the term in its reply ('next_node_idx').
- Once a majority of the voters (the leader included) has echoed a round
  started after the read arrived, in the term the read was taken in, no leader
  of a later term existed when the read began. A later leader would have needed
  votes from that majority.
Reads that arrive in the same tick share a round, and the leader sends the
round at once rather than at the next heartbeat.

A follower asks the leader for the read index with a message of its own
('ms_read_index'), answered by 'ms_read_index_resp', and waits for its own
applier. A request whose leader changes, or that finds no leader, fails with
NO_LEADER. The asyncio side (metastore.read_barrier) asks again until the
read's deadline.

The ask carries the follower's term when it sent it, after its reads
arrived. If that is the leader's term, the ask itself counts as that
follower's echo, for the reads it carries only: the follower had voted in
no later term by then, so no later leader can have been elected before
those reads began without a majority that leaves out both the follower and
this leader. In a cluster of three that is a majority already -- the leader
answers at once, without a round (two messages per follower read instead
of six); in a larger one the round needs one echo fewer. The ask says
nothing about reads that reached the leader after it was sent, so it
counts for no other read. (An older member sends no term; its asks wait for
a round, as before.)

Everything below runs on pysyncobj's tick thread except request(). Whatever
pysyncobj-specific access this needs goes through `ReadIndexHost`, which
raft.node implements.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

from metastore import errors
from metastore.errors import EtcdError

# done(error): None once this member has applied everything committed before
# the read began; else why the read index could not be had.
ReadDone = Callable[[EtcdError | None], None]
# reply(index, error): the read index, or why there is none.
_Reply = Callable[[int, EtcdError | None], None]

# Message types and fields this module adds to pysyncobj's peer protocol.
ASK = "ms_read_index"
ANSWER = "ms_read_index_resp"
ROUND = "ms_read"  # on append_entries: the leader's round
ECHO = "ms_read_echo"  # on next_node_idx: (term, round) last accepted from that leader


class ReadIndexHost(Protocol):
    """What ReadIndex needs from the Raft node (tick thread only)."""

    def leading_term(self) -> int | None:
        """The current term if this node leads, else None."""

    def term(self) -> int: ...

    def read_index(self) -> int:
        """The leader's commit index, but at least its own first entry of the
        term: until that commits, earlier terms' entries may be committed
        without the commit index showing it yet."""

    def voters(self) -> list[Hashable]:
        """The other voting members (pysyncobj nodes)."""

    def leader(self) -> Hashable | None:
        """The node this follower takes as leader."""

    def send(self, node: Hashable, message: dict) -> bool:
        """False if `node` is not connected (nothing was sent)."""

    def send_heartbeats_now(self) -> None: ...

    def last_applied(self) -> int:
        """Index up to which pysyncobj has applied or handed entries over."""

    def after_applied(self, job: Callable[[], None]) -> None:
        """Run job() once every entry handed to the applier so far is applied."""

    def wake(self) -> None:
        """Make the tick thread run soon (called from other threads)."""


@dataclass
class _Pending:
    """A read waiting on the leader for its round to be echoed by a majority."""

    round: int
    term: int
    index: int
    reply: _Reply
    # The follower whose ask, sent in `term`, counts as its echo for this read.
    voucher: Hashable | None = None


@dataclass
class _Asked:
    """A follower's read index request, sent to `leader` at `sent` (monotonic)."""

    leader: Hashable
    sent: float
    reply: _Reply


class ReadIndex:
    def __init__(self, host: ReadIndexHost, ask_timeout: float) -> None:
        self._host = host
        # A follower gives up on the leader's answer after this long (lost
        # with a connection) and fails the read with NO_LEADER, to be asked again.
        self._ask_timeout = ask_timeout
        self._lock = threading.Lock()
        self._requests: list[ReadDone] = []  # from any thread, taken by the tick thread
        self._confirmed_elsewhere: list[tuple[int, ReadDone]] = []  # (read index, done), likewise
        self._closed = False
        # Leader.
        self._round = 0
        self._round_wanted = False  # a read joined round self._round + 1
        self._pending: list[_Pending] = []
        self._echoed: dict[Hashable, int] = {}  # voter -> highest round echoed in this term
        self._echo_term = 0
        # Follower.
        self._ids = itertools.count(1)
        self._asked: dict[int, _Asked] = {}
        # Leader -> (term, round) of its message being handled, for the reply.
        self._accepted: dict[Hashable, tuple[int, int]] = {}
        # Both: read indexes known, waiting for this member to apply them.
        self._applying: list[tuple[int, ReadDone]] = []

    # -- any thread ------------------------------------------------------------
    def request(self, done: ReadDone) -> None:
        """done(None) once this member has applied everything committed
        before this call; done(error) if the leader could not be confirmed."""
        self._submit(self._requests, done, done)

    def request_applied(self, index: int, done: ReadDone) -> None:
        """done(None) once this member has applied `index`, a read index
        confirmed some other way (metastore.read_peers). Thread-safe."""
        self._submit(self._confirmed_elsewhere, (index, done), done)

    def _submit(self, queue: list, item: Any, done: ReadDone) -> None:
        """Hand `item` to the tick thread (done(STOPPED) once closed)."""
        with self._lock:
            stopped = self._closed
            if not stopped:
                queue.append(item)
        if stopped:
            done(errors.STOPPED)
            return
        self._host.wake()

    def close(self, error: EtcdError = errors.STOPPED) -> None:
        """Fail every read not answered yet with `error`: STOPPED when the
        node stops, NO_LEADER (to be asked again) when it is replaced."""
        with self._lock:
            self._closed = True
            requests, self._requests = self._requests, []
            requests += [done for _index, done in self._confirmed_elsewhere]
            self._confirmed_elsewhere = []
        waiting = [done for _index, done in self._applying]
        self._applying = []
        for done in requests + waiting:
            done(error)
        replies = [asked.reply for asked in self._asked.values()] + [p.reply for p in self._pending]
        self._asked.clear()
        self._pending.clear()
        for reply in replies:
            try:
                reply(0, error)
            except Exception:  # a follower's ask: its connection is gone with the node
                pass

    # -- tick thread: once per tick, before pysyncobj's own work ---------------
    def before_tick(self) -> None:
        if self._requests:  # a request added meanwhile wakes the next tick
            with self._lock:
                requests, self._requests = self._requests, []
            for done in requests:
                self._start(self._local_reply(done))
        if self._confirmed_elsewhere:
            with self._lock:
                confirmed, self._confirmed_elsewhere = self._confirmed_elsewhere, []
            self._applying += confirmed
        if not (self._pending or self._asked):
            return  # the common tick: no read in progress
        term = self._host.leading_term()
        if term is None:
            self._fail_pending(errors.NO_LEADER)
        else:
            self._fail_pending(errors.NO_LEADER, unless_term=term)  # a term of ours that ended
            if self._round_wanted:
                self._round += 1
                self._round_wanted = False
                self._host.send_heartbeats_now()
            if not self._host.voters():
                self._confirm(term)  # a cluster of one: nobody to ask
        if self._asked:
            self._expire_asked()

    def after_tick(self) -> None:
        """Answer reads whose read index this member has applied by now."""
        if self._applying:
            self._check_applied()

    # -- tick thread: messages -------------------------------------------------
    def tag_outgoing(self, node: Hashable, message: dict) -> None:
        """Add our part to a pysyncobj message about to be sent."""
        if self._pending:
            if message.get("type") == "append_entries":
                message[ROUND] = self._round
        elif self._accepted and message.get("type") == "next_node_idx":
            accepted = self._accepted.pop(node, None)
            if accepted is not None:
                message[ECHO] = accepted

    def on_message(self, node: Hashable, message: dict) -> bool:
        """Handle our own message types; True if `message` was one of them."""
        kind = message.get("type")
        if kind == ASK:
            self._on_ask(node, message["id"], message.get("term"))
            return True
        if kind == ANSWER:
            asked = self._asked.pop(message["id"], None)
            if asked is not None:
                # Refused (no longer leading, stopping): nothing was read, ask again.
                asked.reply(message.get("index", 0), errors.NO_LEADER if message.get("refused") else None)
            return True
        return False

    def before_message(self, node: Hashable, message: dict) -> None:
        """Note a leader's round before pysyncobj handles its append_entries,
        so that the reply pysyncobj sends while handling it carries the round.
        pysyncobj takes the sender as leader exactly when its term is not
        behind ours; a stale leader's round is not echoed. (Only messages of
        a round in progress carry one, and only their replies an echo: the
        steady stream of replication messages stays as pysyncobj makes it.)"""
        if message.get("type") == "append_entries" and ROUND in message \
                and message.get("term", -1) >= self._host.term():
            self._accepted[node] = (message["term"], message[ROUND])

    def after_message(self, node: Hashable, message: dict) -> None:
        """Count a follower's echo once pysyncobj has handled its reply."""
        if message.get("type") == "next_node_idx" and ECHO in message:
            term = self._host.leading_term()
            echo_term, echo_round = message[ECHO]
            if term is None or echo_term != term:
                return
            if self._echo_term != term:
                self._echoed.clear()
                self._echo_term = term
            if echo_round > self._echoed.get(node, 0):
                self._echoed[node] = echo_round
                if self._pending:
                    self._confirm(term)

    # -- leader ----------------------------------------------------------------
    def _start(self, reply: _Reply, voucher: Hashable | None = None) -> None:
        term = self._host.leading_term()
        if term is not None:
            pending = _Pending(self._round + 1, term, self._host.read_index(), reply, voucher)
            if voucher is not None and self._confirmed(pending, self._host.voters()):
                reply(pending.index, None)  # the ask alone made a majority
                return
            self._pending.append(pending)
            self._round_wanted = True
            return
        leader = self._host.leader()
        if leader is None:
            reply(0, errors.NO_LEADER)
            return
        ask_id = next(self._ids)
        # Our term now, after the reads this ask carries arrived (see the module docstring).
        if not self._host.send(leader, {"type": ASK, "id": ask_id, "term": self._host.term()}):
            reply(0, errors.NO_LEADER)  # not connected to it (yet): ask again shortly
            return
        self._asked[ask_id] = _Asked(leader, time.monotonic(), reply)

    def _on_ask(self, node: Hashable, ask_id: int, ask_term: int | None) -> None:
        def answer(index: int, error: EtcdError | None) -> None:
            message: dict[str, Any] = {"type": ANSWER, "id": ask_id}
            if error is None:
                message["index"] = index
            else:
                message["refused"] = True
            self._host.send(node, message)

        term = self._host.leading_term()
        if term is None:
            answer(0, errors.NO_LEADER)
        else:
            vouches = ask_term == term and node in self._host.voters()
            self._start(answer, voucher=node if vouches else None)

    def _confirm(self, term: int) -> None:
        """Answer the pending reads whose round a majority has echoed."""
        voters = self._host.voters()
        keep = []
        for pending in self._pending:
            if pending.term == term and self._confirmed(pending, voters):
                pending.reply(pending.index, None)
            else:
                keep.append(pending)
        self._pending = keep

    def _confirmed(self, pending: _Pending, voters: list[Hashable]) -> bool:
        """Whether enough followers echoed `pending`'s round (or vouched for
        it by asking) to make a majority with this leader."""
        needed = (len(voters) + 1) // 2  # followers' echoes; with ours, a majority
        # Only voters count, the asker too: one the configuration dropped meanwhile does not.
        echoes = 1 if pending.voucher is not None and pending.voucher in voters else 0
        if echoes >= needed:
            return True
        echoed = self._echoed if self._echo_term == pending.term else {}
        for voter in voters:
            if voter != pending.voucher and echoed.get(voter, 0) >= pending.round:
                echoes += 1
                if echoes >= needed:
                    return True
        return False

    def _fail_pending(self, error: EtcdError, unless_term: int | None = None) -> None:
        failed = [p for p in self._pending if p.term != unless_term]
        if failed:
            self._pending = [p for p in self._pending if p.term == unless_term]
            for p in failed:
                p.reply(0, error)

    # -- follower --------------------------------------------------------------
    def _expire_asked(self) -> None:
        leader = self._host.leader()
        now = time.monotonic()
        for ask_id, asked in list(self._asked.items()):
            if asked.leader != leader or now - asked.sent > self._ask_timeout:
                del self._asked[ask_id]
                asked.reply(0, errors.NO_LEADER)

    # -- both ------------------------------------------------------------------
    def _local_reply(self, done: ReadDone) -> _Reply:
        def reply(index: int, error: EtcdError | None) -> None:
            if error is not None:
                done(error)
            else:
                self._applying.append((index, done))
                self._check_applied()
        return reply

    def _check_applied(self) -> None:
        applied = self._host.last_applied()
        ready = [done for index, done in self._applying if index <= applied]
        if not ready:
            return
        self._applying = [(index, done) for index, done in self._applying if index > applied]

        def answer() -> None:
            for done in ready:
                done(None)
        self._host.after_applied(answer)
