"""Proposer logic in isolation: batching, the in-flight limit, timeouts,
retries. The Raft node is a fake that records submissions and lets the test
decide when each entry is applied."""
from __future__ import annotations

import asyncio

import pytest

from metastore import errors
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.proposer import Proposer


class FakeRaft:
    def __init__(self) -> None:
        self.submitted: list[tuple[bytes, object]] = []
        self.committed: list = []

    def submit(self, payload: bytes, done, committed=None) -> None:
        self.submitted.append((payload, done))
        self.committed.append(committed)

    def commit(self, i: int) -> None:
        """Submission i is committed (its apply still to come)."""
        self.committed[i]()

    def apply(self, i: int, error=None) -> None:
        """Apply submission i: one result per proposal, its key."""
        payload, done = self.submitted[i]
        batch = raft_entry_pb2.ProposalBatch.FromString(payload)
        done(None if error else [p.put.key for p in batch.proposals], error)


def put(key: bytes, value: bytes = b"") -> raft_entry_pb2.Proposal:
    return raft_entry_pb2.Proposal(put=rpc_pb2.PutRequest(key=key, value=value))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def make(raft: FakeRaft, **kw) -> Proposer:
    p = Proposer(raft, origin=7, **kw)  # type: ignore[arg-type]
    p.bind(asyncio.get_running_loop())
    return p


def test_requests_of_one_loop_iteration_share_one_entry():
    async def main():
        raft = FakeRaft()
        p = make(raft)
        tasks = [asyncio.create_task(p.propose(put(b"k%d" % i))) for i in range(10)]
        await settle()
        assert len(raft.submitted) == 1
        batch = raft_entry_pb2.ProposalBatch.FromString(raft.submitted[0][0])
        assert batch.origin == 7 and len(batch.proposals) == 10
        raft.apply(0)
        assert await asyncio.gather(*tasks) == [b"k%d" % i for i in range(10)]
    run(main())


def test_in_flight_limit_holds_for_full_batches_too():
    async def main():
        raft = FakeRaft()
        p = make(raft, max_inflight=2, max_batch_bytes=1000)
        # 10 proposals of ~300 bytes: several full batches at once.
        tasks = [asyncio.create_task(p.propose(put(b"k%d" % i, b"x" * 300))) for i in range(10)]
        await settle()
        assert len(raft.submitted) == 2, "more entries in flight than max_inflight"
        for payload, _ in raft.submitted:
            assert len(payload) <= 1000
        done = 0
        while done < len(raft.submitted):
            raft.apply(done)
            done += 1
            await settle()
            assert len(raft.submitted) - done <= 2
        results = await asyncio.gather(*tasks)
        assert results == [b"k%d" % i for i in range(10)]
    run(main())


def test_errors_and_timeouts_reach_every_waiter():
    async def main():
        raft = FakeRaft()
        p = make(raft, timeout=0.2)
        t1 = asyncio.create_task(p.propose(put(b"a")))
        t2 = asyncio.create_task(p.propose(put(b"a2")))
        await settle()
        raft.submitted[0][1](None, errors.LEADER_CHANGED)
        for t in (t1, t2):
            with pytest.raises(errors.EtcdError) as e:
                await t
            assert e.value is errors.LEADER_CHANGED
        t3 = asyncio.create_task(p.propose(put(b"b")))
        with pytest.raises(errors.EtcdError) as e:
            await t3  # never applied
        assert e.value is errors.TIMEOUT
        p.close()
        with pytest.raises(errors.EtcdError) as e:
            await p.propose(put(b"c"))
        assert e.value is errors.STOPPED
    run(main())


def test_a_committed_request_waits_for_its_apply_past_the_timeout():
    """The timeout is for getting committed; once committed a request is
    answered with what its apply returns, however long that takes."""
    async def main():
        raft = FakeRaft()
        p = make(raft, timeout=0.1)
        slow = asyncio.create_task(p.propose(put(b"big")))
        await settle()
        raft.commit(0)
        lost = asyncio.create_task(p.propose(put(b"never")))
        await asyncio.sleep(0.35)  # past both the request's and the entry's timeout
        assert not slow.done()
        with pytest.raises(errors.EtcdError) as e:
            await lost  # never committed: times out as before
        assert e.value is errors.TIMEOUT
        raft.apply(0)
        assert await slow == b"big"
    run(main())


def test_a_committed_entry_never_applied_frees_its_slot_after_the_backstop(monkeypatch):
    """A stuck applier must not stop the member from proposing for good."""
    import metastore.proposer as proposer_module

    monkeypatch.setattr(proposer_module, "APPLY_BACKSTOP", 0.2)

    async def main():
        raft = FakeRaft()
        p = make(raft, timeout=0.1, max_inflight=1)
        stuck = asyncio.create_task(p.propose(put(b"stuck")))
        await settle()
        raft.commit(0)
        with pytest.raises(errors.EtcdError) as e:
            await asyncio.wait_for(stuck, 5)  # 2 x 0.1 s, then the 0.2 s backstop
        assert e.value is errors.TIMEOUT
        later = asyncio.create_task(p.propose(put(b"later")))
        await settle()
        assert len(raft.submitted) == 2  # the one slot was freed
        raft.apply(1)
        assert await later == b"later"
    run(main())


def test_pending_and_failed_counts_for_metrics():
    async def main():
        raft = FakeRaft()
        p = make(raft, timeout=0.2)
        t1 = asyncio.create_task(p.propose(put(b"a")))
        t2 = asyncio.create_task(p.propose(put(b"b")))
        await settle()
        assert p.pending == 2 and p.failed == 0
        raft.apply(0)
        await asyncio.gather(t1, t2)
        assert p.pending == 0 and p.failed == 0
        t3 = asyncio.create_task(p.propose(put(b"c")))
        await settle()
        raft.submitted[1][1](None, errors.LEADER_CHANGED)  # Raft could not carry it
        with pytest.raises(errors.EtcdError):
            await t3
        assert p.pending == 0 and p.failed == 1
    run(main())


def test_no_leader_is_offered_again_while_the_request_waits():
    """An entry refused for want of a leader (an election, a hand-over) was
    appended nowhere: the same batch goes again, and its requests succeed
    once a leader takes it. Only when no leader turns up in time does the
    request fail, with etcd's "no leader"."""
    async def main():
        raft = FakeRaft()
        p = make(raft, timeout=0.5)
        t1 = asyncio.create_task(p.propose(put(b"a")))
        t2 = asyncio.create_task(p.propose(put(b"a2")))
        await settle()
        raft.submitted[0][1](None, errors.NO_LEADER)
        await asyncio.sleep(0.1)
        assert len(raft.submitted) == 2 and raft.submitted[1][0] == raft.submitted[0][0]
        assert not t1.done() and not t2.done()
        raft.apply(1)
        assert await t1 == b"a"
        assert await t2 == b"a2"
        t3 = asyncio.create_task(p.propose(put(b"b")))
        began = asyncio.get_running_loop().time()
        while not t3.done():
            await asyncio.sleep(0.01)
            if len(raft.submitted) > 2:
                raft.submitted.pop()[1](None, errors.NO_LEADER)
        with pytest.raises(errors.EtcdError) as e:
            await t3
        assert e.value in (errors.NO_LEADER, errors.TIMEOUT)
        assert asyncio.get_running_loop().time() - began >= 0.4
    run(main())
