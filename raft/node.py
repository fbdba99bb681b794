"""The Raft adapter: a pysyncobj node that replicates opaque entries.

metastore's state machine lives outside pysyncobj (in the Store); this module
only turns "submit these bytes" into "these bytes were committed, apply them
in log order", and reports the node's Raft status. Everything pysyncobj-
specific -- its configuration traps, thread rules and failure codes -- stays
in this package.
"""
from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.journal import Journal
from pysyncobj.transport import TCPTransport
from pysyncobj.utility import TcpUtility

from metastore import errors
from metastore.cluster import NOT_SUPPORTED_FOR_LEARNER, proposal_allowed_on_learner
from metastore.fsutil import fsync_path
from metastore.raft.applier import NOT_APPLIED, AppliedResult, Applier
from metastore.raft.journal import DurableJournal, holds_entries
from metastore.raft.peer_wire import deflate_only_big_messages, pickle_bytes_as_bytes
from metastore.raft.read_index import ECHO, ReadDone, ReadIndex
from metastore.types import RaftRole, RaftStatus, RaftStatusSource

log = logging.getLogger("metastore.raft")

# pysyncobj's numeric states (syncobj._RAFT_STATE) as metastore names them.
_ROLES = {0: RaftRole.FOLLOWER, 1: RaftRole.CANDIDATE, 2: RaftRole.LEADER}

# What a failed submission means to an etcd client.
_FAILURES: dict[int, errors.EtcdError] = {
    FAIL_REASON.QUEUE_FULL: errors.TOO_MANY_REQUESTS,
    FAIL_REASON.MISSING_LEADER: errors.NO_LEADER,
    FAIL_REASON.DISCARDED: errors.LEADER_CHANGED,
    # The member a follower forwarded to no longer leads: it appended nothing.
    FAIL_REASON.NOT_LEADER: errors.NO_LEADER,
    FAIL_REASON.LEADER_CHANGED: errors.LEADER_CHANGED,
    FAIL_REASON.REQUEST_DENIED: errors.NOT_CAPABLE,
    FAIL_REASON.UNKNOWN_OUTCOME: errors.TIMEOUT_LEADER_FAIL,
}

# Applies one committed entry (payload, raft index) and returns its result;
# runs on the applier thread (raft.applier), entries in log order.
ApplyFn = Callable[[bytes, int], Any]


class FrozenSnapshot(Protocol):
    """The state machine frozen for a snapshot (plus pysyncobj's raft data),
    to be written to a file later, on another thread."""

    def write(self, path: str) -> None:
        """Write the snapshot file at `path`, fsynced (and free the copy)."""


# Freezes the state machine (plus pysyncobj's raft data) for a snapshot; applier thread.
SaveSnapshotFn = Callable[[Any], FrozenSnapshot]
# Loads a snapshot file into the state machine; returns the raft data saved with it.
LoadSnapshotFn = Callable[[str], Any]
# (result, error) for one submitted entry; runs on the tick thread (a failure)
# or the applier thread (once applied).
DoneFn = Callable[[Any, "errors.EtcdError | None"], None]


# pysyncobj creates its journal with `createJournal(conf.journalFile)` and has
# no other hook; a journal object passed as journalFile is used as is.
_create_journal = pysyncobj.syncobj.createJournal


def _journal_factory(journal_file: Any) -> Journal:
    if isinstance(journal_file, Journal):
        return journal_file
    return _create_journal(journal_file)


pysyncobj.syncobj.createJournal = _journal_factory


# A snapshot that failed (a full disk, say) is asked for again after this long.
SNAPSHOT_RETRY_SECONDS = 5.0
# A tick's body sends the append_entries it gathered at once after this many
# (see _ReplicatedLog._send_wanted_appends): a deep command queue, which the
# tick drains for up to a heartbeat interval, still streams its entries out.
GATHER_AT_MOST = 16
# A follower does not repeat, within this long, a success acknowledgement it
# sent the same leader already (the same term and next index, no read round
# echoed): see _DurableAckTransport.send. Well under the heartbeat interval
# and the leader's fallback and connection timeouts, which count on replies.
REPEATED_ACK_WINDOW = 0.05


@dataclass
class RaftConfig:
    self_address: str              # 'host:port' other members know us by
    partner_addresses: list[str]   # the other voting members
    bind_address: str              # 'host:port' to listen on for peers
    journal_file: str | None       # None: in-memory log (tests only)
    password: str | None = None    # cluster secret: encrypts and authenticates peers
    fsync: bool = True             # False only for tests/benchmarks (--unsafe-no-fsync)
    snapshot_file: str | None = None  # where the state machine snapshot lives
    # Take a snapshot and drop the log before it after this many applied
    # requests (etcd's --snapshot-count; an entry carries a batch of them).
    snapshot_requests: int = 20000
    heartbeat_interval: float = 0.1
    election_timeout: float = 1.0
    # Largest Raft message; an entry must stay below it (pysyncobj's chunked
    # transfer of bigger entries is unreliable), so batches are capped below.
    max_message_bytes: int = 16 * 1024 * 1024
    # True: start as a learner, False: as a voter; None: decide at start
    # (RaftNode._decide_role: the role file, else ask the running members).
    learner: bool | None = None
    # How long start() waits for running members to say whether we vote.
    probe_timeout: float = 1.0


class _DurableAckTransport(TCPTransport):
    """Peer transport that makes the log durable before acknowledging it.

    A follower tells the leader which entries it holds with 'next_node_idx'
    right after appending them. Those acknowledgements are held back until
    the journal is fsynced, so the leader only ever counts entries that are
    on this member's disk -- and one fsync covers every append_entries read
    in one go (the leader pipelines them), as etcd's follower syncs once per
    batch of messages: with an fsync per message, a busy follower spent
    more on fsyncs than on anything else in the Raft loop.

    Held acknowledgements go out (after one fsync) at the start of the next
    tick, and before anything else is sent (messages to a peer keep their
    order). Only entries that extend the log past every held
    acknowledgement, from the same leader in the same term, are taken in
    while they wait: anything else -- a resend that overlaps them (pysyncobj
    cuts and re-appends the tail), a snapshot, another term or peer -- could
    cut the entries an acknowledgement covers, so they go out first. As a
    last guard, one claiming more than the journal holds after the fsync is
    dropped (the leader learns from the next one).

    An acknowledgement that repeats what the last one sent to that leader
    said -- the same term and next index, no read round echoed, within
    REPEATED_ACK_WINDOW -- is not sent: it answers an append_entries that
    carried no entry (the leader's new commit index, which it sends right
    after each commit, or a heartbeat), and tells the leader nothing it does
    not know. For one client writing in sequence that is every second
    acknowledgement: two messages fewer a write for the leader to wake for
    and read. Heartbeats still get replies (they come further apart)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held_acks: list[tuple[Any, dict]] = []
        self._held_term = 0  # the follower's term when they were held
        # peer -> (term, next index, time) of the last success acknowledgement sent to it
        self._last_ack: dict[Any, tuple[int, int, float]] = {}
        super().__init__(*args, **kwargs)

    def send(self, node: Any, message: Any) -> bool:
        self._syncObj.read_index.tag_outgoing(node, message)
        if message.get("type") == "next_node_idx" and message.get("success"):
            journal = self._syncObj._durable_journal
            if journal is not None and journal.needs_sync():
                # (The term cannot differ from the held ones': whatever
                # changes it made them go out first, see on_message.)
                self._held_acks.append((node, message))
                self._held_term = self._syncObj.raftCurrentTerm
                return True
            if not self._held_acks and self._repeats_last_ack(node, message):
                return True
        self.send_held_acks()
        return self._send_now(node, message)

    def _repeats_last_ack(self, node: Any, message: dict) -> bool:
        last = self._last_ack.get(node)
        return (last is not None and ECHO not in message and not message.get("reset")
                and last[0] == self._syncObj.raftCurrentTerm and last[1] == message["next_node_idx"]
                and time.monotonic() - last[2] < REPEATED_ACK_WINDOW)

    def _send_now(self, node: Any, message: Any) -> bool:
        sent = super().send(node, message)
        if sent and message.get("type") == "next_node_idx" and message.get("success"):
            self._last_ack[node] = (self._syncObj.raftCurrentTerm, message["next_node_idx"], time.monotonic())
        return sent

    def send_held_acks(self) -> None:
        """fsync the journal once, then send the acknowledgements waiting for it."""
        if not self._held_acks:
            return
        journal = self._syncObj._durable_journal
        if journal.needs_sync():
            journal.sync()
        last = journal[-1][1] if len(journal) else 0
        held, self._held_acks = self._held_acks, []
        # One acknowledgement per peer says all that the held ones say:
        # each is a success from the same term, for entries that extend the
        # log (on_message sends them first otherwise), so the furthest one
        # the journal holds covers the others. It carries the latest read
        # round any of them echoed. Under load a follower reads several
        # append_entries in one go (check perf l: 2-10): this sent over a
        # third fewer acknowledgements there, each one less for the leader.
        furthest: dict[Any, dict] = {}
        for node, message in held:
            if message["next_node_idx"] - 1 > last:
                continue
            kept = furthest.get(node)
            if kept is not None:
                echoes = [m[ECHO] for m in (kept, message) if ECHO in m]
                if kept["next_node_idx"] > message["next_node_idx"]:
                    message = kept
                if echoes:
                    message[ECHO] = max(echoes)
            furthest[node] = message
        for node, message in furthest.items():
            self._send_now(node, message)

    def _must_send_held_acks_before(self, node: Any, message: dict) -> bool:
        """Whether taking `message` in could cut entries a held
        acknowledgement covers (see the class docstring)."""
        if not self._held_acks:
            return False
        if message.get("type") != "append_entries" or "transmission" in message or "serialized" in message:
            return True
        if message.get("term") != self._held_term or any(held != node for held, _ in self._held_acks):
            return True
        claimed = max(m["next_node_idx"] for _, m in self._held_acks) - 1
        return message.get("prevLogIdx", -1) < claimed

    def setOnMessageReceivedCallback(self, callback: Callable[[Any, Any], None]) -> None:
        """Keep a follower's acknowledgement from rewinding the leader.

        The leader sends entries as they are appended and moves its next
        index for the follower past them at once (pipelining), but on every
        successful acknowledgement pysyncobj sets that next index back to
        just after the acknowledged entry -- behind the entries still in
        flight. The next send then repeats them all; the follower, holding
        them already, truncates its log there and appends them again (logged
        as CRITICAL 'truncating already-applied log entries'), and its
        acknowledgement rewinds the leader once more. Under steady load that
        multiplies the traffic, the journal rewrites and fsyncs. Raft only
        ever moves the next index back on a rejection ('reset'), which
        pysyncobj still handles: a success here never lowers it."""

        reads: ReadIndex = self._syncObj.read_index

        def on_message(node: Any, message: Any) -> None:
            if not isinstance(message, dict):
                self.send_held_acks()
                callback(node, message)
                return
            if self._must_send_held_acks_before(node, message):
                self.send_held_acks()
            if reads.on_message(node, message):
                return  # a read index request or answer: not pysyncobj's
            if message.get("type") == "apply_command" and self._syncObj.refuses_forwarded_proposals():
                if "request_id" in message:
                    # The follower's proposer offers it again (NO_LEADER_RETRY)
                    # and reaches the new leader once the hand-over is done.
                    self.send(node, {
                        "type": "apply_command_response", "request_id": message["request_id"],
                        "error": FAIL_REASON.NOT_LEADER})
                return
            next_index = None
            if message.get("type") == "next_node_idx" and message.get("success") and not message.get("reset"):
                next_index = getattr(self._syncObj, "_SyncObj__raftNextIndex", None)
            before = next_index.get(node) if next_index is not None else None
            reads.before_message(node, message)
            callback(node, message)
            if before is not None and next_index.get(node, before) < before:
                next_index[node] = before
            reads.after_message(node, message)

        super().setOnMessageReceivedCallback(on_message)


class TransferOutcome(enum.Enum):
    """What became of a leadership transfer request (transfer_leadership)."""

    SENT = "sent"  # the target was told to start an election now
    NOT_LEADER = "not leader"  # this node no longer leads (perhaps the target won)
    FAILED = "failed"  # no target to hand over to, or none caught up in time


class _ReplicatedLog(SyncObj):
    """The pysyncobj object: one replicated method that hands each committed
    entry, with its index, to the Applier (which applies it on its own
    thread, see raft.applier)."""

    def __init__(self, self_address: str | None, partners: list[str], conf: SyncObjConf,
                 applier: Applier, journal: DurableJournal | None) -> None:
        # self_address None: pysyncobj's read-only node (a learner).
        self._enqueue = applier.enqueue
        self._durable_journal = journal
        # Before the transport is created: it hooks into the peer messages.
        self.read_index = ReadIndex(_ReadIndexHost(self, applier), ask_timeout=conf.raftMinTimeout)
        # A leadership transfer needs a log that stops growing, or the target
        # can be one entry behind when it asks for votes and lose. The local
        # proposer pauses; proposals followers forward through pysyncobj are
        # answered "not leader" until this time (they appended nothing, so
        # the follower sends them again, in the end to the new leader).
        self.refuse_forwarded_until = 0.0
        # The last term in which this node led with its no-op committed, for
        # RaftNode.leader_read_view on other threads (set by note_ready_term).
        self.ready_term = 0
        # While the body of a tick runs, the append_entries pysyncobj would
        # send are counted, and sent once at its end (_send_wanted_appends).
        self._gathering_appends = False
        self._appends_gathered = 0  # sends wanted and not made yet
        super().__init__(self_address, partners, conf, transportClass=_DurableAckTransport)

    def note_ready_term(self) -> None:  # tick thread, after each tick
        """Once a leader's no-op is committed, its commit index covers every
        entry of earlier terms. pysyncobj makes a node leader first and then
        appends the no-op: another thread that saw the state alone could
        take an older term's no-op index for this one's."""
        if self._isLeader():
            noop = self._SyncObj__noopIDx
            if noop is not None and self.raftCommitIndex >= noop:
                self.ready_term = self.raftCurrentTerm

    def refuses_forwarded_proposals(self) -> bool:  # tick thread
        return time.monotonic() < self.refuse_forwarded_until

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._durable_journal is not None and self._durable_journal.failed:
            # The log failed and the member is stopping (RaftNode.on_log_failure).
            # No more ticks: a leader counts its own entries toward commit
            # whether or not they reached its disk, so one more tick could
            # commit, and acknowledge, an entry that is on no disk at all
            # (alone) or on one fewer than a majority.
            time.sleep(timeToWait)
            return
        # Acknowledgements of the entries the last poll took in: one fsync.
        self._SyncObj__transport.send_held_acks()
        # Before the tick counts this leader's own entries toward commit,
        # they are on disk. Normally the last tick's callbacks synced them;
        # this catches what a tick that ended early (an exception) left.
        journal = self._durable_journal
        if journal is not None and journal.needs_sync():
            journal.sync()
        # Reads asked for since the last tick join a round sent in this one.
        self.read_index.before_tick()
        self._gathering_appends = True
        try:
            super()._onTick(timeToWait)
        finally:
            try:
                self._send_wanted_appends()  # a tick that ended before its commands
            except Exception:  # never instead of what the tick raised
                log.exception("sending this tick's append_entries failed")

    # -- one append_entries per follower and tick -------------------------------
    # pysyncobj sends each follower an append_entries for every command it
    # appends, and one more after each tick that applied entries (the new
    # commit index), even when the commands that arrive in the same tick
    # are about to go out anyway. Within a tick's body, up to the commands,
    # those sends are noted and made once, after the commands: the new
    # entries and the commit index in one message (or every GATHER_AT_MOST
    # commands). Everything else (a vote won, a message handled in the poll)
    # still sends at once.

    def _SyncObj__sendAppendEntries(self) -> None:  # pysyncobj's private name
        if self._gathering_appends:
            self._appends_gathered += 1
            if self._appends_gathered < GATHER_AT_MOST:
                return
            self._appends_gathered = 0
        SyncObj._SyncObj__sendAppendEntries(self)

    def _checkCommandsToApply(self) -> None:
        try:
            super()._checkCommandsToApply()
        finally:
            self._send_wanted_appends()

    def _send_wanted_appends(self) -> None:
        self._gathering_appends = False
        if self._appends_gathered:
            self._appends_gathered = 0
            if self._isLeader():  # whoever wanted it did as leader, in this tick
                SyncObj._SyncObj__sendAppendEntries(self)

    @replicated
    def apply_entry(self, payload: bytes) -> AppliedResult:
        # pysyncobj advances raftLastApplied after each entry: this one is +1.
        return self._enqueue(payload, self.raftLastApplied + 1)


class _ReadIndexHost:
    """pysyncobj's side of raft.read_index (tick thread, except wake)."""

    def __init__(self, obj: _ReplicatedLog, applier: Applier) -> None:
        self._obj = obj
        self._applier = applier

    def leading_term(self) -> int | None:
        obj = self._obj
        return obj.raftCurrentTerm if obj._isLeader() else None

    def term(self) -> int:
        return self._obj.raftCurrentTerm

    def read_index(self) -> int:
        # The no-op a new leader appends is its first entry of the term.
        return max(self._obj.raftCommitIndex, self._obj._SyncObj__noopIDx or 0)

    def voters(self) -> list[Any]:
        return list(self._obj._SyncObj__otherNodes)

    def leader(self) -> Any:
        return self._obj._getLeader()

    def send(self, node: Any, message: dict) -> bool:
        return bool(self._obj._SyncObj__transport.send(node, message))

    def send_heartbeats_now(self) -> None:
        self._obj._SyncObj__newAppendEntriesTime = 0.0

    def last_applied(self) -> int:
        return self._obj.raftLastApplied

    def after_applied(self, job: Callable[[], None]) -> None:
        # No backlog: every entry handed over is applied (only this thread
        # hands entries over), so the job need not wait its turn.
        if self._applier.backlog == 0:
            job()
        else:
            self._applier.run_in_order(job)

    def wake(self) -> None:
        notifier = getattr(self._obj, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()


# The member's Raft role and voting peers, kept next to the journal (its
# path plus this suffix, like the journal's '.meta') so that a restart
# resumes as what the member last was (RaftNode._decide_role).
ROLE_SUFFIX = ".role"
# getStatus() names each voting peer of a pysyncobj node with this prefix.
_PARTNER_KEY = "partner_node_status_server_"


class RaftNode(RaftStatusSource):
    """One member's Raft participation, as a voter or as a learner.

    `member_id_of` maps a pysyncobj address to the etcd member id, so the
    status speaks in etcd's u64 ids.

    A learner is pysyncobj's read-only node, `SyncObj(None, voters)`: it
    dials the voters and announces itself as 'readonly'; the leader sends it
    every entry and snapshot like to a follower but counts it neither toward
    commit nor toward its own liveness, and it never campaigns (nor binds a
    peer port). pysyncobj cannot turn a read-only node into a voter, so
    promotion -- the leader's addNodeToCluster for our address, which the
    learner sees in its copy of the configuration as soon as the entry is
    appended -- replaces the read-only SyncObj with a voting one over the
    same journal and snapshot files. The store keeps what it has applied:
    when the new SyncObj replays the log, StateMachine.apply skips it.
    """

    def __init__(self, cfg: RaftConfig, node_id: int, member_id_of: Callable[[str | None], int],
                 apply: ApplyFn, save_snapshot: SaveSnapshotFn | None = None,
                 load_snapshot: LoadSnapshotFn | None = None,
                 prepare_snapshot: Callable[[], None] | None = None) -> None:
        self._cfg = cfg
        self._node_id = node_id
        self._member_id_of = member_id_of
        self._apply = apply
        self._save_snapshot = save_snapshot
        self._load_snapshot = load_snapshot
        self._prepare_snapshot = prepare_snapshot
        # First log index when the state machine was last told a snapshot is
        # near: told again once the log has been compacted (it starts later).
        self._snapshot_prepared_for: int | None = None
        # Applier.requests_applied at the last snapshot (written here or
        # installed from the leader), and when one that failed may be asked
        # for again.
        self._requests_at_snapshot = 0
        self._snapshot_retry_at = 0.0
        self._snapshot_job: _SnapshotJob | None = None
        self.journal: DurableJournal | None = None
        # Called once (from the thread that hit it) when the Raft log can no
        # longer be written: the member must stop (metastore.node).
        self.on_log_failure: Callable[[OSError], None] | None = None
        self._role = RaftRole.FOLLOWER
        self._role_listeners: list[Callable[[RaftRole], None]] = []
        self._long_apply_listeners: list[Callable[[float], None]] = []
        self._obj: _ReplicatedLog | None = None
        # Applies committed entries off the tick thread; one for the node's
        # life (a promoted learner's new SyncObj feeds the same one).
        self._applier: Applier | None = None
        # Leadership transfers asked for, run on the tick thread:
        # (target address or None, deadline, done callback).
        self._transfers: list[tuple[str | None, float, Callable[[TransferOutcome], None]]] = []
        self._transfers_lock = threading.Lock()
        self._learner = False
        # The voting peers (addresses, without ours) as pysyncobj's
        # configuration last stood; persisted in the role file.
        self._peers: frozenset[str] = frozenset()
        # start/stop and the learner -> voter switch exclude each other.
        self._lifecycle = threading.Lock()
        self._promoted = threading.Event()  # tick thread: our address became a voter
        self._stopping = threading.Event()
        self._released = threading.Event()  # stop() has destroyed the SyncObj
        self._supervisor: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        learner, partners = self._decide_role()
        with self._lifecycle:
            if self._applier is None:
                self._applier = Applier(self._apply, self._long_apply)
            self._open(learner, partners)
        if learner:
            self._supervisor = threading.Thread(target=self._await_promotion, name="raft-learner", daemon=True)
            self._supervisor.start()

    def _open(self, learner: bool, partners: list[str]) -> None:
        """Create the pysyncobj node (voter or read-only) over this member's
        journal and snapshot files."""
        cfg = self._cfg
        deflate_only_big_messages()  # raft.peer_wire: deflating every peer message costs more than it saves
        pickle_bytes_as_bytes()  # raft.peer_wire: protocol 2 turns every bytes object into a str and back
        if cfg.journal_file is not None:
            self.journal = DurableJournal(cfg.journal_file, fsync=cfg.fsync)
            self.journal.on_failure = self._log_failed
        snapshots = cfg.snapshot_file is not None and self._save_snapshot is not None
        conf = SyncObjConf(
            bindAddress=cfg.bind_address,
            password=cfg.password,
            journalFile=self.journal,
            # Fail loudly on a busy peer port instead of retrying forever.
            maxBindRetries=3,
            bindRetryTime=0.2,
            # Send each entry as soon as it is appended (the default batches for
            # 100 ms, which would make every write take 100 ms); metastore
            # batches proposals itself before they reach Raft.
            appendEntriesUseBatch=False,
            appendEntriesPeriod=cfg.heartbeat_interval,
            appendEntriesBatchSizeBytes=cfg.max_message_bytes,
            raftMinTimeout=cfg.election_timeout,
            raftMaxTimeout=cfg.election_timeout * 2,
            # A leader that hears from no majority for this long steps down.
            leaderFallbackTimeout=max(cfg.election_timeout * 3, cfg.heartbeat_interval * 4),
            connectionTimeout=max(3.5, cfg.election_timeout * 2.5),
            connectionRetryTime=0.5,
            # Snapshots are metastore's own (the Store's contents), written on
            # the tick thread; without them the log is kept whole.
            fullDumpFile=cfg.snapshot_file if snapshots else None,
            serializer=self._serialize if snapshots else None,
            serializeChecker=self._snapshot_state if snapshots else None,
            deserializer=self._deserialize if snapshots else None,
            # RaftNode._snapshot_when_due asks for snapshots by requests;
            # pysyncobj's count of entries (never more than the requests in
            # them, bar empty ones) stays as a backstop.
            logCompactionMinEntries=cfg.snapshot_requests if snapshots else 2**62,
            logCompactionMinTime=3600 if snapshots else 10**12,
            # With no leader a proposal fails at once ("no leader") instead of
            # waiting in pysyncobj's queue with no deadline, where it could be
            # applied long after its client was told it timed out.
            commandsWaitLeader=False,
            # The leader advances its commit index at the start of a tick; a
            # lone member has no peer reply to wake it, so it ticks faster.
            autoTickPeriod=0.05 if partners else 0.002,
            onStateChanged=self._on_state_changed,
            dynamicMembershipChange=True,
        )
        self._learner = learner
        self._peers = frozenset(partners)
        self._save_role()  # durable before the node acts as what it records
        assert self._applier is not None
        obj = _ReplicatedLog(None if learner else cfg.self_address, partners, conf, self._applier,
                             self.journal)
        self._obj = obj
        if self.journal is not None:
            # The leader's own entries reach disk before the next tick counts
            # them toward commit (commit is computed at the start of a tick;
            # tick callbacks run after new entries were appended).
            obj.addOnTickCallback(self._sync_journal)
        if snapshots and self.journal is not None:
            obj.addOnTickCallback(self._snapshot_when_due)
        obj.addOnTickCallback(self._run_transfers)
        obj.addOnTickCallback(obj.read_index.after_tick)
        obj.addOnTickCallback(obj.note_ready_term)
        obj.addOnTickCallback(lambda: self._watch_configuration(obj))
        if learner:
            # A read-only node binds nothing (waitBinded would wait forever).
            log.info("raft node %s started as a learner (read-only), voters %s", cfg.self_address,
                     ",".join(partners) or "(none)")
            return
        try:
            obj.waitBinded()
        except Exception as exc:
            self._obj = None
            obj.destroy()
            raise RuntimeError(f"cannot listen for peers on {cfg.bind_address}: port in use or address "
                               f"not available") from exc
        log.info("raft node %s listening on %s, partners %s", cfg.self_address, cfg.bind_address,
                 ",".join(partners) or "(none)")

    def is_learner(self) -> bool:
        """True while this node is a (non-voting) learner."""
        return self._learner

    # -- role: learner or voter ----------------------------------------------
    def _decide_role(self) -> tuple[bool, list[str]]:
        """(learner?, the voters to talk to) for this start.

        A member that has voted once always votes: the role file says so,
        and its peers there are the configuration it last saw (the
        --initial-cluster of a restart may list learners, which must not be
        counted as voters). A data dir from before role files was a voter's.
        A new member -- or a learner, which may have been promoted while it
        was down -- cannot tell from its flags (etcd's `member add` prints the
        same --initial-cluster for a learner as for a voter), so it asks the
        running members, as etcd's `--initial-cluster-state existing` does:
        a voter if their Raft configuration has its address, else a learner.
        If nobody answers, a new member is founding a cluster (a voter) and a
        learner stays one.
        """
        cfg = self._cfg
        me = cfg.self_address
        if cfg.learner is not None:
            return cfg.learner, list(cfg.partner_addresses)
        state = self._load_role()
        if state is not None and state["role"] == "voter":
            return False, [p for p in state["peers"] if p != me]
        fresh = cfg.journal_file is None or not holds_entries(cfg.journal_file)
        if state is None and not fresh:
            return False, list(cfg.partner_addresses)
        known = set(cfg.partner_addresses) | set(state["peers"] if state is not None else ())
        answer = self._ask_members(sorted(known - {me}))
        if answer is None:
            if state is not None:
                log.warning("no member answered at %s; starting as the learner this member was",
                            ",".join(sorted(known)))
                return True, sorted(known - {me})
            return False, list(cfg.partner_addresses)
        listed, voters = answer
        log.info("running members report voters %s: this member starts as a %s", ",".join(sorted(voters)),
                 "voter" if listed else "learner")
        return not listed, sorted(voters - {me})

    def _ask_members(self, addresses: list[str]) -> tuple[bool, set[str]] | None:
        """Ask each member at `addresses` for its Raft configuration
        (pysyncobj's 'status' utility command, over the peer port with the
        cluster secret). None if none answered in time; else (is our address
        a voter there?, the voters, preferring the leader's view)."""
        answers: list[dict] = []
        lock = threading.Lock()

        def ask(address: str) -> None:
            try:
                utility = TcpUtility(password=self._cfg.password, timeout=self._cfg.probe_timeout)
                status = utility.executeCommand(address, ["status"])
            except Exception:  # down, refusing, or not a pysyncobj node
                return
            if isinstance(status, dict):
                with lock:
                    answers.append(status)

        threads = [threading.Thread(target=ask, args=(a,), name="raft-probe", daemon=True) for a in addresses]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self._cfg.probe_timeout + 1.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with lock:
            answers = list(answers)
        if not answers:
            return None

        def voters_of(status: dict) -> set[str]:
            found = {k[len(_PARTNER_KEY):] for k in status if isinstance(k, str) and k.startswith(_PARTNER_KEY)}
            own = getattr(status.get("self"), "address", None)
            return found | ({own} if own else set())

        configs = [(status.get("state") == 2, voters_of(status)) for status in answers]
        listed = any(self._cfg.self_address in voters for _, voters in configs)
        leader_views = [voters for is_leader, voters in configs if is_leader]
        return listed, leader_views[0] if leader_views else max((v for _, v in configs), key=len)

    def _role_path(self) -> str | None:
        if self._cfg.journal_file is None:
            return None
        return self._cfg.journal_file + ROLE_SUFFIX

    def _load_role(self) -> dict | None:
        path = self._role_path()
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            state = json.load(f)
        if state.get("role") not in ("learner", "voter") or not isinstance(state.get("peers"), list):
            raise RuntimeError(f"{path} is not a Raft role file; refusing to guess this member's role")
        return state

    def _save_role(self) -> None:
        path = self._role_path()
        if path is None:
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"role": "learner" if self._learner else "voter", "peers": sorted(self._peers)}, f)
            f.flush()
            if self._cfg.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self._cfg.fsync:
            fsync_path(os.path.dirname(path))

    def _watch_configuration(self, obj: "_ReplicatedLog") -> None:  # tick thread
        """Keep the role file's peers current, and notice our promotion."""
        if obj is not self._obj:
            return  # being replaced or stopped
        addresses = {node.address for node in obj.otherNodes}
        peers = frozenset(addresses - {self._cfg.self_address})
        if peers != self._peers:
            self._peers = peers
            try:
                self._save_role()
            except OSError:
                log.exception("could not record the Raft configuration")
        if self._learner and self._cfg.self_address in addresses:
            self._promoted.set()

    def _await_promotion(self) -> None:
        """The learner's supervisor thread: when the leader makes our
        address a voter, restart Raft as a voter. The voting SyncObj is
        created here, and pysyncobj's tick thread stops when the thread that
        created its SyncObj ends, so this thread then lives until stop()."""
        while not (self._promoted.is_set() or self._stopping.is_set()):
            self._promoted.wait(0.1)
        with self._lifecycle:
            if self._stopping.is_set():
                return
            old, self._obj = self._obj, None
            partners = sorted(self._peers)
            log.info("this member was promoted: Raft restarts as a voter (peers %s)", ",".join(partners))
            if old is not None:
                old.destroy_synchronous()
                old.read_index.close(errors.NO_LEADER)  # asked again of the voting node
            try:
                self._open(False, partners)
            except Exception:
                log.critical("Raft could not restart as a voter after the promotion", exc_info=True)
                return
        self._released.wait()

    def stop(self) -> None:
        self._stopping.set()
        with self._lifecycle:
            obj, self._obj = self._obj, None
            if obj is not None:
                obj.destroy_synchronous()
                obj.read_index.close()
            applier, self._applier = self._applier, None
        if applier is not None:
            applier.stop()
        job = self._snapshot_job
        if job is not None and not job.started and not job.done.is_set():
            job.fail(RuntimeError("stopped before the snapshot was frozen"))  # its freeze was dropped
        self._released.set()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=10)

    # -- membership ----------------------------------------------------------
    def change_membership(self, address: str, add: bool, done: DoneFn) -> None:
        """Add or remove a voting peer through pysyncobj's one-server change
        (a log entry of its own); done(None, None) once committed here, or
        done(None, error). The caller serializes changes: pysyncobj does not."""
        obj = self._obj
        if obj is None:
            done(None, errors.STOPPED)
            return

        def callback(_result: Any, reason: int) -> None:
            done(None, None if reason == FAIL_REASON.SUCCESS else _FAILURES.get(reason, errors.LEADER_CHANGED))

        if add:
            obj.addNodeToCluster(address, callback=callback)
        else:
            obj.removeNodeFromCluster(address, callback=callback)

    def is_voter(self, address: str) -> bool:
        """Whether `address` votes in this node's view of the Raft
        configuration (a change counts from when it is appended)."""
        obj = self._obj
        if obj is None:
            return False
        if address == self._cfg.self_address:
            return not self._learner
        for _ in range(10):
            try:  # the tick thread may be changing the set being copied
                return address in {node.address for node in obj.otherNodes}
            except RuntimeError:
                time.sleep(0.001)
        return address in self._peers

    # -- leadership transfer -------------------------------------------------
    def transfer_leadership(self, target: str | None, timeout: float,
                            done: Callable[[TransferOutcome], None]) -> None:
        """Ask the leader to hand over to `target` (a peer address; None: the
        most caught-up follower). pysyncobj only sends the "timeout now" when
        the target holds the whole log, so the request is retried every tick
        until it is sent or `timeout` passes; done(outcome) says which. Whether
        the target then leads must be checked by the caller, who calls
        end_transfer() when done waiting: until then (at most `timeout`)
        proposals forwarded by followers are refused, to be sent again."""
        deadline = time.monotonic() + timeout
        obj = self._obj
        if obj is not None:
            obj.refuse_forwarded_until = deadline
        with self._transfers_lock:
            self._transfers.append((target, deadline, done))

    def end_transfer(self) -> None:
        """Take proposals forwarded by followers again."""
        obj = self._obj
        if obj is not None:
            obj.refuse_forwarded_until = 0.0

    def _run_transfers(self) -> None:  # tick thread
        if not self._transfers:
            return
        with self._transfers_lock:
            pending, self._transfers = self._transfers, []
        obj = self._obj
        if obj is None or not obj._isLeader():
            for _target, _deadline, done in pending:
                done(TransferOutcome.NOT_LEADER)
            return
        voters = {node.address for node in obj.otherNodes}
        if not obj._SyncObj__connectedNodes & set(obj.otherNodes):
            voters = set()  # no voter reachable: as etcd, give up at once
        keep = []
        for target, deadline, done in pending:
            if not voters or (target is not None and target not in voters):
                done(TransferOutcome.FAILED)  # nobody (or a learner) to hand over to
                continue
            outcome: list[int] = []
            obj.transferLeadership(target, callback=lambda _res, reason: outcome.append(reason))
            if outcome and outcome[0] == FAIL_REASON.SUCCESS:
                done(TransferOutcome.SENT)
            elif outcome and outcome[0] == FAIL_REASON.NOT_LEADER:
                done(TransferOutcome.NOT_LEADER)
            elif time.monotonic() >= deadline:
                done(TransferOutcome.FAILED)
            else:
                keep.append((target, deadline, done))  # target not caught up yet: next tick
        if keep:
            with self._transfers_lock:
                self._transfers[:0] = keep

    def _log_failed(self, exc: OSError) -> None:
        if self.on_log_failure is not None:
            self.on_log_failure(exc)

    def _sync_journal(self) -> None:
        if self.journal.needs_sync():
            self.journal.sync()

    # -- snapshots -------------------------------------------------------------
    # pysyncobj asks for a snapshot on the tick thread and, with a custom
    # serializer, would wait for the whole file -- seconds for a big store,
    # during which this member neither replicates nor answers heartbeats (and
    # all members snapshot at the same index, so all stall at once). Here
    # the state is only frozen (PendingSnapshot: copy-on-write rows or a
    # RocksDB checkpoint) on the applier thread, right after the entry at
    # the snapshot's index, the file is written by a background thread,
    # and pysyncobj learns the outcome through its serializeChecker:
    # it keeps the whole log until then. The finished file is renamed into
    # place on the tick thread (in the checker), so it can never race a
    # snapshot received from the leader, which is also installed there.
    def _serialize(self, path: str, raft_data: Any) -> None:
        t0 = time.monotonic()
        previous, self._snapshot_job = self._snapshot_job, None
        if previous is not None:
            # Only a SyncObj replaced meanwhile (a promoted learner) can ask
            # again before the last job was reported; the new one supersedes it.
            previous.done.wait()
            previous.remove_output()
        job = _SnapshotJob(raft_data[0][1], self._cfg.snapshot_file or path)
        self._snapshot_job = job
        data = _without_readonly_self(raft_data)

        def freeze() -> None:  # applier thread, once every entry up to job.index is applied
            t1 = time.monotonic()
            assert self._applier is not None
            job.requests = self._applier.requests_applied
            try:
                job.start(self._save_snapshot(data))
            except Exception as exc:  # reported as FAILED by the checker, once
                job.fail(exc)
            else:
                log.info("snapshot at raft index %d frozen in %.0f ms (%.0f ms after it was asked for); "
                         "writing it in the background", job.index, (time.monotonic() - t1) * 1000,
                         (t1 - t0) * 1000)

        assert self._applier is not None
        self._applier.run_in_order(freeze)
        # pysyncobj now renames `path` (its temporary name) over the snapshot
        # file; the job writes elsewhere, so `path` must not exist -- that
        # rename fails, which pysyncobj only notes (it then holds back
        # sending snapshots to followers until told the outcome: see
        # _release_serializer).
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def _snapshot_when_due(self) -> None:
        """Tick callback. etcd's --snapshot-count counts committed requests,
        and here one entry carries a whole batch of them (ten or more under
        load), so pysyncobj's count of entries would let the log -- held in
        memory -- grow that many times larger than etcd's: the snapshot is
        asked for here, once snapshot_requests requests were applied since
        the last one. A tenth before that, the state machine is told, once
        per log start, so that freezing it (which holds the applier) is
        quick; on a thread of its own, as RocksDB may make even a flush it
        does not wait for wait behind one running."""
        applier, obj = self._applier, self._obj
        if applier is None or obj is None or self._snapshot_job is not None:
            return  # none while one is being frozen or written
        applied = applier.requests_applied
        since = applied - self._requests_at_snapshot
        due = self._cfg.snapshot_requests
        if since < due - max(1, due // 10):
            return
        journal = self.journal
        start = journal[0][1] if journal is not None and len(journal) else None
        if self._prepare_snapshot is not None and start != self._snapshot_prepared_for:
            self._snapshot_prepared_for = start
            threading.Thread(target=self._run_prepare_snapshot, name="raft-snapshot-prepare", daemon=True).start()
        if since >= due and time.monotonic() >= self._snapshot_retry_at:
            # Until pysyncobj starts it (next tick), asking again only sets
            # the same flag; once started, the job above stops the asking.
            obj.forceLogCompaction()

    def _run_prepare_snapshot(self) -> None:
        try:
            self._prepare_snapshot()
        except Exception as exc:  # only a slower freeze is at stake (or the store closed)
            log.warning("preparing the state machine for a snapshot failed: %s", exc)

    def _release_serializer(self, new_file: bool = False) -> None:
        """Let pysyncobj's serializer send the snapshot file to followers
        while our own job runs; after a new file replaced it (`new_file`),
        restart transfers that were reading the old one."""
        obj = self._obj
        serializer = getattr(obj, "_SyncObj__serializer", None) if obj is not None else None
        if serializer is None:
            return
        serializer._Serializer__pid = 0
        if new_file:
            transfers = getattr(serializer, "_Serializer__transmissions", {})
            for transfer in transfers.values():
                handle = transfer.get("file")
                if handle is not None:
                    handle.close()
            transfers.clear()

    def _snapshot_state(self) -> int:
        """pysyncobj's serializeChecker (tick thread, every tick)."""
        job = self._snapshot_job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if not job.done.is_set():
            # The current file still matches the log (kept whole until the
            # new one is in place): followers may go on receiving it.
            self._release_serializer()
            return SERIALIZER_STATE.SERIALIZING
        self._snapshot_job = None
        if job.superseded:
            # The leader's snapshot was installed meanwhile: it is newer and
            # covers this index too, so the log before it may go.
            job.remove_output()
            log.info("snapshot at raft index %d dropped: a newer one was installed", job.index)
            return SERIALIZER_STATE.SUCCESS
        error = job.error
        if error is None:
            try:
                os.replace(job.output, job.final_path)
                fsync_path(os.path.dirname(os.path.abspath(job.final_path)))
            except OSError as exc:
                error = exc
        if error is not None:
            job.remove_output()
            log.error("writing the snapshot at raft index %d failed: %s", job.index, error)
            # Still due: asked for again once SNAPSHOT_RETRY_SECONDS passed.
            self._snapshot_retry_at = time.monotonic() + SNAPSHOT_RETRY_SECONDS
            return SERIALIZER_STATE.FAILED
        if job.requests is not None:
            self._requests_at_snapshot = job.requests
        self._release_serializer(new_file=True)
        log.info("snapshot at raft index %d written in %.0f ms", job.index, job.seconds * 1000)
        return SERIALIZER_STATE.SUCCESS

    def _deserialize(self, path: str) -> Any:
        t0 = time.monotonic()
        job = self._snapshot_job
        if job is not None:
            job.superseded = True  # must not replace what is loaded now
        if self._applier is not None:
            # Entries still queued are older than the snapshot; they (and a
            # queued freeze) go first, so nothing is applied over what it loads.
            self._applier.drain()
        raft_data = _without_readonly_self(self._load_snapshot(path))
        if self._applier is not None:
            # The count of requests since a snapshot starts again from this one.
            self._requests_at_snapshot = self._applier.requests_applied
            self._applier.loaded(raft_data[0][1])
        if self.journal is not None:
            align_journal_to_snapshot(self.journal, raft_data)
        blocked = time.monotonic() - t0
        obj = self._obj
        deadline = getattr(obj, "_SyncObj__raftElectionDeadline", None) if obj is not None else None
        if deadline is not None:
            # The tick thread waited for the applier and the load: heartbeats
            # that queued meanwhile must be read before this member campaigns.
            obj._SyncObj__raftElectionDeadline = max(deadline, time.monotonic()) + blocked
        log.info("snapshot at raft index %d loaded in %.0f ms", raft_data[0][1], blocked * 1000)
        return raft_data

    # -- proposals -----------------------------------------------------------
    def submit(self, payload: bytes, done: DoneFn, committed: Callable[[], None] | None = None) -> None:
        """Propose `payload`; `done(result, None)` after this member applied it,
        or `done(None, error)`. `committed()` (tick thread), if given, as
        soon as it is committed and queued here for applying: from then on
        it will be applied. Followers forward to the leader. Thread-safe."""
        obj = self._obj
        if obj is None:
            done(None, errors.STOPPED)
            return
        if self._learner and not proposal_allowed_on_learner(payload):
            # pysyncobj would forward it to the leader; etcd's learners refuse writes.
            done(None, NOT_SUPPORTED_FOR_LEARNER)
            return

        def applied(value: Any) -> None:  # applier thread (or tick thread, if already applied)
            if value is NOT_APPLIED:
                done(None, errors.STOPPED)
            else:
                done(value, None)

        def callback(result: Any, reason: int) -> None:  # tick thread
            if reason == FAIL_REASON.SUCCESS:
                if committed is not None:
                    committed()
                result.when_applied(applied)  # committed and queued: answer once applied
            else:
                done(None, _FAILURES.get(reason, errors.LEADER_CHANGED))

        obj.apply_entry(payload, callback=callback)

    def read_barrier(self, done: ReadDone) -> None:
        """done(None) once this member has applied everything committed
        before the call, confirmed by the leader without a log entry
        (raft.read_index); done(error) if it could not be. Thread-safe."""
        obj = self._obj
        if obj is None:
            # Between the learner's and the voter's node at a promotion, no
            # leader is known for a moment; after stop(), there is none.
            done(errors.STOPPED if self._stopping.is_set() else errors.NO_LEADER)
        elif self._learner:
            done(NOT_SUPPORTED_FOR_LEARNER)  # etcd's learners serve serializable reads only
        else:
            obj.read_index.request(done)

    # -- read index rounds between event loops (metastore.read_peers) -----------
    def leader_read_view(self) -> tuple[int, int, frozenset[str]] | None:
        """(term, read index, the other voters' addresses) while this node
        leads a term whose no-op is committed; else None. Any thread.

        pysyncobj's tick thread changes these fields as it goes; each read
        here is atomic, but together they could mix two moments. The term
        is read first and last: if it did not move, every field read in
        between belongs to that term, and a node leads a term at most once."""
        obj = self._obj
        if obj is None or self._learner:
            return None
        term = obj.raftCurrentTerm
        if obj.ready_term != term or not obj._isLeader():
            return None
        index = obj.raftCommitIndex
        nodes = tuple(obj._SyncObj__otherNodes)  # one C call: safe while the tick thread changes the set
        if obj.raftCurrentTerm != term:
            return None
        return term, index, frozenset(node.address for node in nodes)

    def applied_through(self, index: int) -> bool:
        """Whether every entry up to `index` is applied here. Any thread:
        pysyncobj counts an entry as applied once handed to the applier
        (raftLastApplied is raised after the hand-over), so an empty backlog
        read after it means they are all applied; else the applier's own
        last index says (under writes the backlog is seldom empty)."""
        obj, applier = self._obj, self._applier
        return obj is not None and applier is not None and obj.raftLastApplied >= index \
            and (applier.backlog == 0 or applier.last_index >= index)

    def when_applied(self, index: int, done: ReadDone) -> None:
        """done(None) once every entry up to `index` is applied here;
        done(error) if the node stops first. Thread-safe."""
        obj = self._obj
        if obj is None:
            done(errors.STOPPED if self._stopping.is_set() else errors.NO_LEADER)
        else:
            obj.read_index.request_applied(index, done)

    # -- status --------------------------------------------------------------
    def on_role_change(self, listener: Callable[[RaftRole], None]) -> None:
        self._role_listeners.append(listener)

    def on_long_apply(self, listener: Callable[[float], None]) -> None:
        """listener(seconds) after an entry took longer than applier.LONG_APPLY
        to apply (applier thread): whatever queued behind it waited that long."""
        self._long_apply_listeners.append(listener)

    def _long_apply(self, seconds: float) -> None:
        for listener in self._long_apply_listeners:
            try:
                listener(seconds)
            except Exception:  # a listener must not break the apply loop
                log.exception("long-apply listener failed")

    def _on_state_changed(self, old: int, new: int) -> None:
        self._role = _ROLES.get(new, RaftRole.UNKNOWN)
        obj = self._obj
        term = obj.raftCurrentTerm if obj is not None else 0
        log.info("raft state %s -> %s (term %d)", _ROLES.get(old, old).value, self._role.value, term,
                 extra={"term": term, "role": self._role.value})
        if self._role is RaftRole.LEADER:
            log.info("%x elected leader at term %d", self._node_id, term,
                     extra={"term": term, "leader": f"{self._node_id:x}"})
        for listener in self._role_listeners:
            try:
                listener(self._role)
            except Exception:  # must not escape into pysyncobj's tick
                log.exception("raft role listener failed")

    def leader_address(self) -> str | None:
        obj = self._obj
        leader = obj._getLeader() if obj is not None else None
        return leader.id if leader is not None else None

    def term(self) -> int:
        obj = self._obj
        return obj.raftCurrentTerm if obj is not None else 0

    def is_leader(self) -> bool:
        """Leading, and able to: a node whose log failed ticks no more."""
        return self._role is RaftRole.LEADER and not self.log_failed()

    def log_failed(self) -> bool:
        return self.journal is not None and self.journal.failed

    def applying_for(self) -> float:
        """Seconds the entry being applied right now has taken so far (0
        when none is): a long apply holds back everything queued behind it."""
        applier = self._applier
        return applier.applying_for() if applier is not None else 0.0

    def raft_status(self) -> RaftStatus:
        """A consistent-enough snapshot read without touching pysyncobj's dicts
        (getStatus() iterates dicts the tick thread mutates)."""
        obj = self._obj
        if obj is None:
            return RaftStatus(self._node_id, 0, 0, RaftRole.UNKNOWN.value, 0, 0)
        # pysyncobj counts an entry applied once it is queued for the applier.
        # Read before the backlog: an entry queued in between shows as backlog.
        # Entries pysyncobj applies itself (a leader's no-op, configuration
        # changes) never reach the applier: with no backlog, all is applied.
        applied = obj.raftLastApplied
        applier = self._applier
        if applier is not None and applier.backlog:
            applied = applier.last_index
        commit = obj.raftCommitIndex
        return RaftStatus(
            node_id=self._node_id,
            term=obj.raftCurrentTerm,
            leader_id=self._member_id_of(self.leader_address()),
            state=self._role.value,
            applied=applied,
            commit=max(commit, applied),
        )


class _SnapshotJob:
    """One snapshot file being written by a background thread."""

    def __init__(self, index: int, final_path: str) -> None:
        self.index = index
        self.final_path = final_path
        self.output = final_path + ".writing"
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.superseded = False  # set on the tick thread
        self.seconds = 0.0
        self.requests: int | None = None  # Applier.requests_applied when frozen
        self.started = False  # frozen, and being written

    def start(self, frozen: FrozenSnapshot) -> None:
        self.started = True
        threading.Thread(target=self._run, args=(frozen,), name="metastore-snapshot", daemon=True).start()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def _run(self, frozen: FrozenSnapshot) -> None:
        t0 = time.monotonic()
        try:
            frozen.write(self.output)
        except BaseException as exc:  # reported on the tick thread
            self.error = exc
        finally:
            self.seconds = time.monotonic() - t0
            self.done.set()

    def remove_output(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.output)


def align_journal_to_snapshot(journal: DurableJournal, raft_data: Any) -> None:
    """Drop the log entries a snapshot covers, if the log still has them.

    pysyncobj expects the log to begin with the snapshot's last two entries
    and otherwise clears it down to them -- everything after the snapshot
    included. A member that stopped after its new snapshot file was in
    place but before the log before it was dropped would lose the entries
    it had acknowledged since; trimming here, before pysyncobj looks, keeps
    them."""
    last, prev = raft_data[0], raft_data[1]
    if len(journal) < 2:
        return
    pos = prev[1] - journal[0][1]
    if pos <= 0 or pos + 1 >= len(journal):
        return
    if tuple(journal[pos]) == tuple(prev) and tuple(journal[pos + 1]) == tuple(last):
        journal.deleteEntriesTo(pos)


def _without_readonly_self(raft_data: Any) -> Any:
    """pysyncobj's snapshot raft data with the configuration's `None`
    dropped: a read-only node records itself as None among the nodes, and a
    voter loading that snapshot (a promoted learner) would fail on it."""
    last, prev, nodes = raft_data
    return last, prev, {node for node in nodes if node is not None}
