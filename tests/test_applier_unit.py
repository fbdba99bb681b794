"""raft.applier in isolation: entries applied in order off the caller's
thread, jobs run exactly between the entries around them, waiters answered,
and a stop that answers what it drops."""
from __future__ import annotations

import threading

from metastore.raft.applier import NOT_APPLIED, Applier


def test_entries_apply_in_order_and_jobs_run_between_them():
    applied: list[int] = []
    gate = threading.Event()

    def apply(payload: bytes, index: int) -> str:
        if payload == b"slow":
            assert gate.wait(10)
        applied.append(index)
        return f"r{index}"

    applier = Applier(apply, lambda seconds: None)
    try:
        results = [applier.enqueue(b"slow" if i == 1 else b"x", i) for i in range(1, 4)]
        seen_by_job: list[list[int]] = []
        applier.run_in_order(lambda: seen_by_job.append(list(applied)))
        later = applier.enqueue(b"x", 4)
        got: dict[int, object] = {}
        for i, r in enumerate(results + [later], start=1):
            r.when_applied(lambda value, i=i: got.__setitem__(i, value))
        assert applier.backlog == 4 and not got  # the first entry is still being applied
        assert applier.last_index == 0  # what RaftNode.raft_status reports as applied meanwhile
        gate.set()
        applier.drain()
        assert applied == [1, 2, 3, 4]
        assert seen_by_job == [[1, 2, 3]]  # after entry 3, before entry 4
        assert got == {1: "r1", 2: "r2", 3: "r3", 4: "r4"}
        assert applier.backlog == 0 and applier.last_index == 4
        late: list[object] = []
        results[0].when_applied(late.append)  # already applied: answered at once
        assert late == ["r1"]
    finally:
        gate.set()
        applier.stop()


def test_long_applies_are_reported_and_stop_answers_what_it_drops():
    long_applies: list[float] = []
    started, gate = threading.Event(), threading.Event()

    def apply(payload: bytes, index: int) -> int:
        started.set()
        assert gate.wait(10)
        return index

    applier = Applier(apply, long_applies.append)
    first = applier.enqueue(b"a", 1)
    dropped = applier.enqueue(b"b", 2)
    assert started.wait(10)
    threading.Timer(0.2, gate.set).start()
    applier.stop()  # finishes the entry being applied, drops the next
    answers: list[object] = []
    first.when_applied(answers.append)
    dropped.when_applied(answers.append)
    assert answers == [1, NOT_APPLIED]
    assert len(long_applies) == 1 and long_applies[0] >= 0.15


def test_applied_index_counts_what_came_before_the_queue():
    """Entries pysyncobj applies itself (a leader's no-op, configuration
    changes) never reach the applier; while the first entries it does get
    are still queued, what came before them counts as applied (etcdctl
    endpoint status showed raftAppliedIndex 0 on a member just started)."""
    gate = threading.Event()

    def apply(payload: bytes, index: int) -> str:
        assert gate.wait(10)
        return "ok"

    applier = Applier(apply, lambda seconds: None)
    try:
        applier.enqueue(b"x", 10)
        applier.enqueue(b"x", 11)
        assert applier.backlog == 2 and applier.last_index == 9
        gate.set()
        applier.drain()
        assert applier.last_index == 11
        applier.enqueue(b"x", 15)  # 12-14 applied by pysyncobj meanwhile
        applier.drain()
        assert applier.last_index == 15
    finally:
        gate.set()
        applier.stop()
