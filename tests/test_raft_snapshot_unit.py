"""Raft snapshots are written in the background, and a restart never loses
log entries a snapshot does not cover.

Three real pysyncobj members in this process, on loopback, with metastore's
durable journal; the state machine is a list, its snapshot a pickle of it.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any, Callable

from metastore.cluster import Membership
from metastore.raft import RaftConfig, RaftNode
from metastore.raft.journal import DurableJournal
from metastore.raft.node import align_journal_to_snapshot
from metastore.testing import free_ports, wait_for


class BlockingSnapshot:
    """A frozen snapshot whose write waits until the test lets it go."""

    def __init__(self, state: list[int], raft_data: Any, gate: threading.Event, started: threading.Event) -> None:
        self.state, self.raft_data, self.gate, self.started = list(state), raft_data, gate, started

    def write(self, path: str) -> None:
        self.started.set()
        assert self.gate.wait(30)
        with open(path, "wb") as f:
            pickle.dump((self.state, self.raft_data), f)
            f.flush()
            os.fsync(f.fileno())


Callbacks = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any], Callable[[], None] | None]


def start_members(tmp_path: Any, snapshot_requests: int, callbacks: Callable[[int], Callbacks]) -> list[RaftNode]:
    """Three members on loopback, each with callbacks(i) = (apply, save,
    load, prepare), started (stop them when done)."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    membership = Membership("t", {f"n{i}": [f"http://{a}"] for i, a in enumerate(addresses)})
    nodes = []
    for i, address in enumerate(addresses):
        cfg = RaftConfig(self_address=address, partner_addresses=[a for a in addresses if a != address],
                         bind_address=address, journal_file=str(tmp_path / f"n{i}.log"),
                         snapshot_file=str(tmp_path / f"n{i}.snapshot"), snapshot_requests=snapshot_requests,
                         heartbeat_interval=0.05, election_timeout=0.5)
        nodes.append(RaftNode(cfg, i + 1, membership.id_of_address, *callbacks(i)))
    try:
        for n in nodes:
            n.start()
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


def leader_of(nodes: list[RaftNode]) -> RaftNode:
    return wait_for(lambda: next((n for n in nodes if n.is_leader()), None), 15, "a leader")


def submit_and_wait(leader: RaftNode, count: int) -> None:
    """Propose `count` entries and wait until every one is applied."""
    done = threading.Semaphore(0)
    for k in range(count):
        leader.submit(b"e%d" % k, lambda result, error: done.release())
    for _ in range(count):
        assert done.acquire(timeout=30)


def pickled_state_loader(states: list[list[int]], i: int) -> Callable[[str], Any]:
    def load(path: str) -> Any:
        with open(path, "rb") as f:
            state, raft_data = pickle.load(f)
        states[i][:] = state
        return raft_data
    return load


def test_snapshot_is_written_while_raft_goes_on(tmp_path):
    gate, started = threading.Event(), threading.Event()
    states: list[list[int]] = [[] for _ in range(3)]
    # Log length when each member was told a snapshot is near, and when it froze.
    prepared: list[list[int]] = [[] for _ in range(3)]
    frozen: list[list[int]] = [[] for _ in range(3)]

    def callbacks(i: int) -> Callbacks:
        def apply(payload: bytes, index: int) -> int:
            states[i].append(index)
            return index

        def save(raft_data: Any) -> BlockingSnapshot:
            frozen[i].append(len(states[i]))
            return BlockingSnapshot(states[i], raft_data, gate, started)

        def prepare() -> None:
            prepared[i].append(len(states[i]))

        return apply, save, pickled_state_loader(states, i), prepare

    nodes = start_members(tmp_path, 50, callbacks)
    try:
        leader = leader_of(nodes)
        # Within a tenth of snapshot_requests of a snapshot, every member tells
        # its state machine (once), before anything is frozen.
        submit_and_wait(leader, 40)
        assert not any(prepared) and not any(frozen), (prepared, frozen)
        submit_and_wait(leader, 6)
        wait_for(lambda: all(prepared), 15, "every member to be told a snapshot is near")
        assert not any(frozen), frozen
        submit_and_wait(leader, 34)  # past snapshot_requests: every member starts a snapshot
        assert started.wait(15)
        wait_for(lambda: all(frozen), 15, "every member to freeze")
        assert all(len(p) == 1 for p in prepared), prepared
        term = leader.raft_status().term
        # The writes block; Raft does not: entries commit and apply meanwhile.
        submit_and_wait(leader, 200)
        assert leader.is_leader() and leader.raft_status().term == term, "an election happened"
        assert not any(os.path.exists(tmp_path / f"n{i}.snapshot") for i in range(3))
        # The log is kept whole until the file exists.
        assert all(n.journal[0][1] == 1 for n in nodes), [n.journal[0][1] for n in nodes]
        gate.set()
        wait_for(lambda: all(os.path.exists(tmp_path / f"n{i}.snapshot") for i in range(3)), 15, "snapshot files")
        wait_for(lambda: all(n.journal[0][1] > 50 for n in nodes), 15, "the log to be trimmed")
        # The 200 entries after the first snapshot may start a second one
        # right away; once every snapshot is in place, no temporary file is left.
        wait_for(lambda: not any(os.path.exists(tmp_path / f"n{i}.snapshot.writing") for i in range(3)), 15,
                 "the temporary snapshot files to be renamed")
        for i in range(3):
            with open(tmp_path / f"n{i}.snapshot", "rb") as f:
                state, raft_data = pickle.load(f)
            # Frozen right after the entry at the snapshot's index, not later.
            assert state[-1] == raft_data[0][1], (i, state[-1], raft_data[0][1])
    finally:
        gate.set()
        for n in nodes:
            n.stop()


class PickledState:
    def __init__(self, state: list[int], raft_data: Any) -> None:
        self.state, self.raft_data = list(state), raft_data

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            pickle.dump((self.state, self.raft_data), f)


def test_snapshots_are_due_by_requests_not_entries(tmp_path):
    """etcd's --snapshot-count counts requests; an entry carrying ten of them
    (a batch) counts ten, so the log is trimmed after a tenth of the entries."""
    states: list[list[int]] = [[] for _ in range(3)]
    frozen: list[list[int]] = [[] for _ in range(3)]

    def callbacks(i: int) -> Callbacks:
        def apply(payload: bytes, index: int) -> list[int]:
            states[i].append(index)
            return [index] * 10  # one result per request, as StateMachine.apply answers a batch

        def save(raft_data: Any) -> PickledState:
            frozen[i].append(len(states[i]))
            return PickledState(states[i], raft_data)

        return apply, save, pickled_state_loader(states, i), None

    nodes = start_members(tmp_path, 200, callbacks)
    try:
        leader = leader_of(nodes)
        submit_and_wait(leader, 15)  # 150 requests: not due yet
        assert not any(frozen), frozen
        submit_and_wait(leader, 15)  # 300 requests in 30 entries: past 200
        wait_for(lambda: all(frozen), 15, "every member to snapshot")
        # Due at 200 requests (20 entries), long before pysyncobj's own count
        # of 200 entries; a tick may pass before it is taken.
        assert all(20 <= f[0] <= 30 for f in frozen), frozen
        wait_for(lambda: all(n.journal[0][1] > 15 for n in nodes), 15, "the log to be trimmed")
        # Once taken, the count starts again: no second snapshot for the same requests.
        assert all(len(f) == 1 for f in frozen), frozen
    finally:
        for n in nodes:
            n.stop()


def test_a_log_still_holding_a_snapshots_entries_is_trimmed_not_cleared(tmp_path):
    """A member stopped after its new snapshot file was in place but before the
    log before it was dropped: the entries after the snapshot must survive."""
    path = str(tmp_path / "raft.log")
    j = DurableJournal(path)
    for i in range(1, 21):
        j.add(b"cmd%d" % i, i, 1)
    j.sync()
    raft_data = ((b"cmd12", 12, 1), (b"cmd11", 11, 1), set())  # last, prev, nodes
    align_journal_to_snapshot(j, raft_data)
    assert [e[1] for e in j] == list(range(11, 21))
    align_journal_to_snapshot(j, raft_data)  # already aligned: nothing to do
    assert [e[1] for e in j] == list(range(11, 21))
    # A snapshot the log does not match (other term) is left to pysyncobj.
    align_journal_to_snapshot(j, ((b"x", 15, 2), (b"cmd14", 14, 1), set()))
    assert [e[1] for e in j] == list(range(11, 21))
    j._destroy()
    assert [e[1] for e in DurableJournal(path)] == list(range(11, 21))


def test_a_failed_snapshot_is_retried(tmp_path):
    """A snapshot that cannot be made (a full disk, say) must not stop the
    next one: pysyncobj only asks again once it has been told the outcome."""
    attempts = [0, 0, 0]
    gate, started = threading.Event(), threading.Event()
    gate.set()

    def callbacks(i: int) -> Callbacks:
        def save(raft_data: Any) -> BlockingSnapshot:
            attempts[i] += 1
            if attempts[i] == 1:
                raise OSError(28, "No space left on device")
            return BlockingSnapshot([], raft_data, gate, started)

        return (lambda p, idx: idx), save, (lambda path: None), None

    nodes = start_members(tmp_path, 50, callbacks)
    try:
        submit_and_wait(leader_of(nodes), 120)
        wait_for(lambda: all(os.path.exists(tmp_path / f"n{i}.snapshot") for i in range(3)), 15,
                 "a snapshot after the failed one")
        assert all(a >= 2 for a in attempts), attempts
    finally:
        for n in nodes:
            n.stop()
