"""The Raft adapter: a pysyncobj node that replicates opaque entries.

metastore's state machine lives outside pysyncobj (in the Store); this module
only turns "submit these bytes" into "these bytes were committed, apply them
in log order", and reports the node's Raft status. Everything pysyncobj-
specific -- its configuration traps, thread rules and failure codes -- stays
in this package.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.journal import Journal
from pysyncobj.transport import TCPTransport

from metastore import errors
from metastore.raft.journal import DurableJournal
from metastore.types import RaftRole, RaftStatus, RaftStatusSource

log = logging.getLogger("metastore.raft")

# pysyncobj's numeric states (syncobj._RAFT_STATE) as metastore names them.
_ROLES = {0: RaftRole.FOLLOWER, 1: RaftRole.CANDIDATE, 2: RaftRole.LEADER}

# What a failed submission means to an etcd client.
_FAILURES: dict[int, errors.EtcdError] = {
    FAIL_REASON.QUEUE_FULL: errors.TOO_MANY_REQUESTS,
    FAIL_REASON.MISSING_LEADER: errors.NO_LEADER,
    FAIL_REASON.DISCARDED: errors.LEADER_CHANGED,
    FAIL_REASON.NOT_LEADER: errors.LEADER_CHANGED,
    FAIL_REASON.LEADER_CHANGED: errors.LEADER_CHANGED,
    FAIL_REASON.REQUEST_DENIED: errors.NOT_CAPABLE,
    FAIL_REASON.UNKNOWN_OUTCOME: errors.TIMEOUT_LEADER_FAIL,
}

# Applies one committed entry (payload, raft index) and returns its result;
# runs on the tick thread.
ApplyFn = Callable[[bytes, int], Any]
# Writes the state machine (plus pysyncobj's raft data) to a snapshot file.
SaveSnapshotFn = Callable[[str, Any], None]
# Loads a snapshot file into the state machine; returns the raft data saved with it.
LoadSnapshotFn = Callable[[str], Any]
# (result, error) for one submitted entry; runs on the tick thread.
DoneFn = Callable[[Any, "errors.EtcdError | None"], None]


# pysyncobj creates its journal with `createJournal(conf.journalFile)` and has
# no other hook; a journal object passed as journalFile is used as is.
_create_journal = pysyncobj.syncobj.createJournal


def _journal_factory(journal_file: Any) -> Journal:
    if isinstance(journal_file, Journal):
        return journal_file
    return _create_journal(journal_file)


pysyncobj.syncobj.createJournal = _journal_factory


@dataclass
class RaftConfig:
    self_address: str              # 'host:port' other members know us by
    partner_addresses: list[str]   # the other voting members
    bind_address: str              # 'host:port' to listen on for peers
    journal_file: str | None       # None: in-memory log (tests only)
    password: str | None = None    # cluster secret: encrypts and authenticates peers
    fsync: bool = True             # False only for tests/benchmarks (--unsafe-no-fsync)
    snapshot_file: str | None = None  # where the state machine snapshot lives
    # Take a snapshot and drop the log before it after this many entries.
    snapshot_entries: int = 20000
    heartbeat_interval: float = 0.1
    election_timeout: float = 1.0
    # Largest Raft message; an entry must stay below it (pysyncobj's chunked
    # transfer of bigger entries is unreliable), so batches are capped below.
    max_message_bytes: int = 16 * 1024 * 1024


class _DurableAckTransport(TCPTransport):
    """Peer transport that makes the log durable before acknowledging it.

    A follower tells the leader which entries it holds with 'next_node_idx'
    right after appending them; fsyncing the journal here (once for all the
    entries of that message) means the leader only ever counts entries that
    are on this member's disk."""

    def send(self, node: Any, message: Any) -> bool:
        if message.get("type") == "next_node_idx" and message.get("success"):
            journal = getattr(self._syncObj, "_durable_journal", None)
            if journal is not None and journal.needs_sync():
                journal.sync()
        return super().send(node, message)


class _ReplicatedLog(SyncObj):
    """The pysyncobj object: one replicated method that hands each committed
    entry, with its index, to metastore's state machine."""

    def __init__(self, cfg: RaftConfig, conf: SyncObjConf, apply: ApplyFn,
                 journal: DurableJournal | None) -> None:
        self._apply = apply
        self._durable_journal = journal
        super().__init__(cfg.self_address, cfg.partner_addresses, conf,
                         transportClass=_DurableAckTransport)

    @replicated
    def apply_entry(self, payload: bytes) -> Any:
        # pysyncobj advances raftLastApplied after each entry: this one is +1.
        return self._apply(payload, self.raftLastApplied + 1)


class RaftNode(RaftStatusSource):
    """One member's Raft participation.

    `member_id_of` maps a pysyncobj address to the etcd member id, so the
    status speaks in etcd's u64 ids.
    """

    def __init__(self, cfg: RaftConfig, node_id: int, member_id_of: Callable[[str | None], int],
                 apply: ApplyFn, save_snapshot: SaveSnapshotFn | None = None,
                 load_snapshot: LoadSnapshotFn | None = None) -> None:
        self._cfg = cfg
        self._node_id = node_id
        self._member_id_of = member_id_of
        self._apply = apply
        self._save_snapshot = save_snapshot
        self._load_snapshot = load_snapshot
        self.journal: DurableJournal | None = None
        self._role = RaftRole.FOLLOWER
        self._role_listeners: list[Callable[[RaftRole], None]] = []
        self._obj: _ReplicatedLog | None = None
        # Leadership transfers asked for, run on the tick thread:
        # (target address or None, deadline, done callback).
        self._transfers: list[tuple[str | None, float, Callable[[bool], None]]] = []
        self._transfers_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        cfg = self._cfg
        if cfg.journal_file is not None:
            self.journal = DurableJournal(cfg.journal_file, fsync=cfg.fsync)
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
            deserializer=self._deserialize if snapshots else None,
            logCompactionMinEntries=cfg.snapshot_entries if snapshots else 2**62,
            logCompactionMinTime=3600 if snapshots else 10**12,
            # With no leader a proposal fails at once ("no leader") instead of
            # waiting in pysyncobj's queue with no deadline, where it could be
            # applied long after its client was told it timed out.
            commandsWaitLeader=False,
            # The leader advances its commit index at the start of a tick; a
            # lone member has no peer reply to wake it, so it ticks faster.
            autoTickPeriod=0.05 if cfg.partner_addresses else 0.002,
            onStateChanged=self._on_state_changed,
            dynamicMembershipChange=True,
        )
        self._obj = _ReplicatedLog(self._cfg, conf, self._apply, self.journal)
        if self.journal is not None:
            # The leader's own entries reach disk before the next tick counts
            # them toward commit (commit is computed at the start of a tick;
            # tick callbacks run after new entries were appended).
            self._obj.addOnTickCallback(self._sync_journal)
        self._obj.addOnTickCallback(self._run_transfers)
        try:
            self._obj.waitBinded()
        except Exception as exc:
            self._obj.destroy()
            raise RuntimeError(f"cannot listen for peers on {cfg.bind_address}: port in use or address "
                               f"not available") from exc
        log.info("raft node %s listening on %s, partners %s", cfg.self_address, cfg.bind_address,
                 ",".join(cfg.partner_addresses) or "(none)")

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

    # -- leadership transfer -------------------------------------------------
    def transfer_leadership(self, target: str | None, timeout: float, done: Callable[[bool], None]) -> None:
        """Ask the leader to hand over to `target` (a peer address; None: the
        most caught-up follower). pysyncobj only sends the "timeout now" when
        the target holds the whole log, so the request is retried every tick
        until it is sent or `timeout` passes; done(True) once sent, done(False)
        if not. Whether the target then leads must be checked by the caller."""
        with self._transfers_lock:
            self._transfers.append((target, time.monotonic() + timeout, done))

    def _run_transfers(self) -> None:  # tick thread
        if not self._transfers:
            return
        with self._transfers_lock:
            pending, self._transfers = self._transfers, []
        obj = self._obj
        keep = []
        for target, deadline, done in pending:
            outcome: list[int] = []
            if obj is not None:
                obj.transferLeadership(target, callback=lambda _res, reason: outcome.append(reason))
            if outcome and outcome[0] == FAIL_REASON.SUCCESS:
                done(True)
            elif obj is None or time.monotonic() >= deadline or (outcome and outcome[0] == FAIL_REASON.NOT_LEADER):
                done(False)
            else:
                keep.append((target, deadline, done))  # target not caught up yet: next tick
        if keep:
            with self._transfers_lock:
                self._transfers[:0] = keep

    def _sync_journal(self) -> None:
        if self.journal.needs_sync():
            self.journal.sync()

    def _serialize(self, path: str, raft_data: Any) -> None:
        t0 = time.monotonic()
        self._save_snapshot(path, raft_data)
        log.info("snapshot at raft index %d written in %.0f ms", raft_data[0][1],
                 (time.monotonic() - t0) * 1000)

    def _deserialize(self, path: str) -> Any:
        t0 = time.monotonic()
        raft_data = self._load_snapshot(path)
        log.info("snapshot at raft index %d loaded in %.0f ms", raft_data[0][1],
                 (time.monotonic() - t0) * 1000)
        return raft_data

    def stop(self) -> None:
        obj, self._obj = self._obj, None
        if obj is not None:
            obj.destroy_synchronous()

    # -- proposals -----------------------------------------------------------
    def submit(self, payload: bytes, done: DoneFn) -> None:
        """Propose `payload`; `done(result, None)` after this member applied it,
        or `done(None, error)`. Followers forward to the leader. Thread-safe."""
        obj = self._obj
        if obj is None:
            done(None, errors.STOPPED)
            return

        def callback(result: Any, reason: int) -> None:
            if reason == FAIL_REASON.SUCCESS:
                done(result, None)
            else:
                done(None, _FAILURES.get(reason, errors.LEADER_CHANGED))

        obj.apply_entry(payload, callback=callback)

    # -- status --------------------------------------------------------------
    def on_role_change(self, listener: Callable[[RaftRole], None]) -> None:
        self._role_listeners.append(listener)

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
        return self._role is RaftRole.LEADER

    def raft_status(self) -> RaftStatus:
        """A consistent-enough snapshot read without touching pysyncobj's dicts
        (getStatus() iterates dicts the tick thread mutates)."""
        obj = self._obj
        if obj is None:
            return RaftStatus(self._node_id, 0, 0, RaftRole.UNKNOWN.value, 0, 0)
        applied = obj.raftLastApplied
        commit = obj.raftCommitIndex
        return RaftStatus(
            node_id=self._node_id,
            term=obj.raftCurrentTerm,
            leader_id=self._member_id_of(self.leader_address()),
            state=self._role.value,
            applied=applied,
            commit=max(commit, applied),
        )
