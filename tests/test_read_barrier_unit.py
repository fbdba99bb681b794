"""metastore.read_barrier in isolation: how linearizable reads share requests
to Raft, and what they see when Raft cannot answer. Raft is a fake that records
each request and lets the test answer it."""
from __future__ import annotations

import asyncio

import pytest

from metastore import errors
from metastore.read_barrier import ReadBarrier


class FakeRaft:
    def __init__(self) -> None:
        self.asked: list = []

    def read_barrier(self, done) -> None:
        self.asked.append(done)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make(raft: FakeRaft, timeout: float = 5.0) -> ReadBarrier:
    barrier = ReadBarrier(raft, timeout=timeout)  # type: ignore[arg-type]
    barrier.bind(asyncio.get_running_loop())
    return barrier


def test_one_request_in_flight_and_the_reads_meanwhile_share_the_next():
    async def main():
        raft = FakeRaft()
        b = make(raft)
        first = [asyncio.create_task(b.wait()) for _ in range(3)]
        await settle()
        assert len(raft.asked) == 1, "reads of one loop iteration share a request"
        later = [asyncio.create_task(b.wait()) for _ in range(4)]
        await settle()
        assert len(raft.asked) == 1, "they wait for the request in flight to finish"
        raft.asked[0](None)
        await asyncio.gather(*first)
        await settle()
        assert not any(t.done() for t in later), "the first answer predates them"
        assert len(raft.asked) == 2
        raft.asked[1](None)
        await asyncio.gather(*later)
        await settle()
        assert len(raft.asked) == 2, "nothing waits: nothing more is asked"
    asyncio.run(main())


def test_no_leader_is_asked_again_until_the_read_times_out():
    async def main():
        raft = FakeRaft()
        b = make(raft, timeout=0.5)
        read = asyncio.create_task(b.wait())
        await settle()
        raft.asked[0](errors.NO_LEADER)
        await asyncio.sleep(0.1)
        assert len(raft.asked) == 2 and not read.done(), "asked again, the read still waits"
        raft.asked[1](None)
        await read

        began = asyncio.get_running_loop().time()
        read = asyncio.create_task(b.wait())
        while not read.done():
            await asyncio.sleep(0.01)
            if raft.asked:
                raft.asked.pop()(errors.NO_LEADER)
        with pytest.raises(errors.EtcdError) as e:
            await read
        assert e.value is errors.TIMEOUT
        assert asyncio.get_running_loop().time() - began >= 0.45
        await asyncio.sleep(0.1)
        if raft.asked:
            raft.asked.pop()(errors.NO_LEADER)
        await asyncio.sleep(0.2)
        assert not raft.asked, "nobody waits any more: Raft is not asked again"

        # A client that goes away stops being asked for, too.
        read = asyncio.create_task(b.wait())
        await settle()
        read.cancel()
        raft.asked.pop()(errors.NO_LEADER)
        await asyncio.sleep(0.2)
        assert not raft.asked
        reads = [asyncio.create_task(b.wait()) for _ in range(2)]
        await settle()
        raft.asked.pop()(None)
        await asyncio.gather(*reads)
    asyncio.run(main())


def test_other_errors_reach_the_reads_and_close_fails_the_rest():
    async def main():
        raft = FakeRaft()
        b = make(raft)
        read = asyncio.create_task(b.wait())
        await settle()
        raft.asked[0](errors.NOT_CAPABLE)
        with pytest.raises(errors.EtcdError) as e:
            await read
        assert e.value is errors.NOT_CAPABLE
        read = asyncio.create_task(b.wait())
        await settle()
        b.close()
        with pytest.raises(errors.EtcdError) as e:
            await read
        assert e.value is errors.STOPPED
        with pytest.raises(errors.EtcdError) as e:
            await b.wait()
        assert e.value is errors.STOPPED
    asyncio.run(main())


def test_a_peers_round_that_fails_to_start_goes_to_raft():
    class Broken:
        def start(self, done_here, done_anywhere, via_raft):
            raise ValueError("a bad client URL, say")

    async def main():
        raft = FakeRaft()
        b = ReadBarrier(raft, timeout=5.0, peers=Broken())  # type: ignore[arg-type]
        b.bind(asyncio.get_running_loop())
        read = asyncio.create_task(b.wait())
        await settle()
        assert len(raft.asked) == 1 and b.raft_rounds == 1
        raft.asked[0](None)
        await read
        read = asyncio.create_task(b.wait())  # and the next read is asked for too
        await settle()
        assert len(raft.asked) == 2
        raft.asked[1](None)
        await read
    asyncio.run(main())
