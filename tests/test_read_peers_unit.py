"""metastore.read_peers between two members' event loops, over real loopback
TCP: when a read index round is confirmed there, and every case in which it
must go to Raft instead. Raft is a fake whose view each test sets."""
from __future__ import annotations

import asyncio

import pytest

from metastore import errors
from metastore.read_peers import ReadPeers

A, B, C, D = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"


class FakeRaft:
    def __init__(self) -> None:
        self.view: tuple[int, int, frozenset[str]] | None = None
        self.current_term = 5
        self.leader: str | None = None
        self.learner = False
        self.applied = 0
        self.waiting: list = []  # (index, done) handed to when_applied

    def leader_read_view(self):
        return self.view

    def term(self) -> int:
        return self.current_term

    def leader_address(self):
        return self.leader

    def is_learner(self) -> bool:
        return self.learner

    def applied_through(self, index: int) -> bool:
        return self.applied >= index

    def when_applied(self, index: int, done) -> None:
        self.waiting.append((index, done))


class _Acceptor(asyncio.Protocol):
    """The client port, as far as this needs: the first bytes go to accept()."""

    def __init__(self, peers: ReadPeers) -> None:
        self.peers = peers

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peers.accept(self.transport, data)


class Members:
    """ReadPeers for addresses A and B (and whatever else a test adds), each
    answering on a loopback port of its own."""

    def __init__(self) -> None:
        self.raft: dict[str, FakeRaft] = {}
        self.peers: dict[str, ReadPeers] = {}
        self.ports: dict[str, int] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.redirect: dict[str, str] = {}  # Raft address -> whose port its URL reaches

    async def add(self, address: str, secret: str | None = None, timeout: float = 1.0) -> None:
        raft = FakeRaft()
        peers = ReadPeers(raft, address, self.client_url_of, secret, timeout=timeout)
        server = await asyncio.get_running_loop().create_server(lambda: _Acceptor(peers), "127.0.0.1", 0)
        self.raft[address], self.peers[address] = raft, peers
        self.ports[address] = server.sockets[0].getsockname()[1]
        self.servers.append(server)

    def client_url_of(self, address: str) -> str | None:
        target = self.redirect.get(address, address)
        return f"http://127.0.0.1:{self.ports[target]}" if target in self.ports else None

    def close(self) -> None:
        for peers in self.peers.values():
            peers.close()
        for server in self.servers:
            server.close()


class Round:
    """One round started on a member: how it ended."""

    def __init__(self) -> None:
        self.here: list = []
        self.anywhere: list = []
        self.via_raft: list = []
        self.ended = asyncio.Event()

    def done_here(self, error) -> None:
        self.here.append(error)
        self.ended.set()

    def done_anywhere(self, error) -> None:
        self.anywhere.append(error)
        self.ended.set()

    def to_raft(self, done) -> None:
        self.via_raft.append(done)
        self.ended.set()


async def start(peers: ReadPeers) -> tuple[bool, Round]:
    r = Round()
    return peers.start(r.done_here, r.done_anywhere, r.to_raft), r


async def never_taken(peers: ReadPeers, why: str, tries: int = 30) -> None:
    """Rounds started over a while (time enough to dial) all go to Raft."""
    for _ in range(tries):
        taken, _r = await start(peers)
        assert not taken, why
        await asyncio.sleep(0.02)


async def connected(peers: ReadPeers, raft: FakeRaft) -> None:
    """Start rounds until one is taken: the first ones only dial."""
    for _ in range(200):
        taken, r = await start(peers)
        if taken:
            await asyncio.wait_for(r.ended.wait(), 2)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never connected")


def run(test):
    async def main():
        members = Members()
        try:
            await test(members)
        finally:
            members.close()
            await asyncio.sleep(0)
    asyncio.run(main())


def as_follower_of_leader(members: Members, leader_term: int = 5, follower_term: int = 5,
                          voters: frozenset[str] = frozenset({B, C}), index: int = 40) -> None:
    members.raft[A].view = (leader_term, index, voters)
    follower = members.raft[B]
    follower.leader, follower.current_term = A, follower_term


async def leader_and_follower(m: Members, follower_timeout: float = 1.0) -> None:
    """A leads (term 5, read index 40), B follows and has applied up to 100."""
    await m.add(A)
    await m.add(B, timeout=follower_timeout)
    as_follower_of_leader(m)
    m.raft[B].applied = 100


def test_a_follower_ask_in_the_leaders_term_is_answered_with_the_read_index():
    async def test(m: Members):
        await m.add(A)
        await m.add(B)
        as_follower_of_leader(m, index=40)
        m.raft[B].applied = 40
        taken, r = await start(m.peers[B])
        assert not taken, "no connection yet: Raft takes this round, the leader is dialed"
        await connected(m.peers[B], m.raft[B])
        taken, r = await start(m.peers[B])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert r.here == [None] and not r.via_raft, "confirmed, and applied here already"
        # Not applied yet: the member waits for its applier.
        m.raft[A].view = (5, 41, frozenset({B, C}))
        taken, r = await start(m.peers[B])
        for _ in range(200):
            if m.raft[B].waiting:
                break
            await asyncio.sleep(0.01)
        assert not r.here and [index for index, _done in m.raft[B].waiting] == [41]
    run(test)


@pytest.mark.parametrize("case", ["follower behind", "follower ahead", "not leading", "asker not a voter",
                                  "four other voters"])
def test_the_leader_refuses_and_the_round_goes_to_raft(case):
    async def test(m: Members):
        await leader_and_follower(m)
        await connected(m.peers[B], m.raft[B])
        if case == "follower behind":
            m.raft[B].current_term = 4
        elif case == "follower ahead":
            m.raft[B].current_term = 6  # a later term: the leader may be deposed
        elif case == "not leading":
            m.raft[A].view = None
        elif case == "asker not a voter":
            m.raft[A].view = (5, 40, frozenset({C, D}))
        else:
            m.raft[A].view = (5, 40, frozenset({B, C, D, "127.0.0.1:7005"}))
        confirmed = m.peers[B].confirmed
        taken, r = await start(m.peers[B])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert not r.here and not r.anywhere and len(r.via_raft) == 1, case
        assert m.peers[B].confirmed == confirmed, "not counted as confirmed"
    run(test)


def test_the_leader_pings_a_follower_for_its_own_reads():
    async def test(m: Members):
        await m.add(A)
        await m.add(B)
        m.raft[A].view = (7, 90, frozenset({B}))
        m.raft[A].applied = 90
        m.raft[B].current_term = 7
        await connected(m.peers[A], m.raft[A])
        confirmed = m.peers[A].confirmed
        taken, r = await start(m.peers[A])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert r.here == [None] and m.peers[A].confirmed == confirmed + 1
        for their_term in (6, 8):  # behind: not ours yet; ahead: we may be deposed
            m.raft[B].current_term = their_term
            taken, r = await start(m.peers[A])
            await asyncio.wait_for(r.ended.wait(), 2)
            assert not r.here and len(r.via_raft) == 1, their_term
    run(test)


def test_more_voters_or_a_learner_never_take_this_path():
    async def test(m: Members):
        await m.add(A)
        await m.add(B)
        m.raft[A].view = (7, 90, frozenset({B, C, D}))  # a majority of 4 needs two others
        await never_taken(m.peers[A], "a majority of four needs two others", tries=20)
        m.raft[A].view = (7, 90, frozenset())  # alone: Raft answers at once
        assert not (await start(m.peers[A]))[0]
        m.raft[B].learner, m.raft[B].leader = True, A
        assert not (await start(m.peers[B]))[0]
    run(test)


def test_a_url_that_reaches_another_member_is_not_used():
    async def test(m: Members):
        await m.add(A)
        await m.add(B)
        await m.add(C)
        as_follower_of_leader(m)
        m.redirect[A] = C  # A's advertised client URL reaches C
        await never_taken(m.peers[B], "C answered as C: never taken for the leader")
    run(test)


def test_with_a_cluster_secret_only_a_member_that_has_it_is_believed():
    async def test(m: Members):
        await m.add(A, secret="s3cret")
        await m.add(B, secret="s3cret")
        await m.add(C, secret="other")
        as_follower_of_leader(m)
        m.raft[B].applied = 100
        await connected(m.peers[B], m.raft[B])  # same secret: works
        m.raft[C].leader, m.raft[C].current_term = A, 5
        await never_taken(m.peers[C], "the leader's greeting does not check out with another secret")
    run(test)


def test_no_answer_in_time_or_a_lost_connection_hands_the_round_to_raft():
    async def test(m: Members):
        await leader_and_follower(m, follower_timeout=0.3)
        await connected(m.peers[B], m.raft[B])
        # The leader stops answering: its connections stop reading.
        for protocol in list(m.peers[A]._answering):
            protocol._transport.pause_reading()
        taken, r = await start(m.peers[B])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert len(r.via_raft) == 1 and not r.here
        # A lost connection: its round goes to Raft at once.
        for protocol in list(m.peers[A]._answering):
            protocol._transport.resume_reading()
        await connected(m.peers[B], m.raft[B])
        taken, r = await start(m.peers[B])
        assert taken
        for protocol in list(m.peers[A]._answering):
            protocol._transport.abort()  # the connection breaks before the request is read
        await asyncio.wait_for(r.ended.wait(), 2)
        assert len(r.via_raft) == 1 and not r.here
    run(test)


def test_garbage_on_the_connection_closes_it_and_nothing_else():
    async def test(m: Members):
        await leader_and_follower(m)
        greeting = 2 + len(A) + 16 + 16  # address, nonce, MAC (zeros without a secret)
        for junk, answered in ((b"\x00not the magic at all, sorry\n", 0),
                               (b"\x00metastore-read-index/1\n\xff\xff", 0),  # an address too long
                               # greeted, then a message of a kind nobody asks
                               (b"\x00metastore-read-index/1\n\x00\x01B" + bytes(16) + b"\x09" + bytes(16),
                                greeting)):
            reader, writer = await asyncio.open_connection("127.0.0.1", m.ports[A])
            writer.write(junk)
            data = await asyncio.wait_for(reader.read(), 2)  # the member closes it
            assert len(data) == answered, junk
            writer.close()
        await connected(m.peers[B], m.raft[B])  # the member still answers members
    run(test)


def test_reads_confirmed_elsewhere_wait_for_the_applier_in_raft_read_index():
    """raft.read_index takes indexes confirmed by this module and answers them
    once applied, like its own; closing fails them."""
    from metastore.raft.read_index import ReadIndex

    class Host:
        applied = 10

        def leading_term(self):
            return None

        def term(self):
            return 1

        def leader(self):
            return None

        def last_applied(self):
            return self.applied

        def after_applied(self, job):
            job()

        def wake(self):
            pass

    host = Host()
    reads = ReadIndex(host, ask_timeout=1.0)  # type: ignore[arg-type]
    answered: list = []
    reads.request_applied(12, answered.append)
    reads.before_tick()
    reads.after_tick()
    assert answered == [], "index 12 is not applied yet"
    host.applied = 12
    reads.after_tick()
    assert answered == [None]
    reads.request_applied(99, answered.append)
    reads.close()
    assert answered == [None, errors.STOPPED]


def test_a_stalled_follower_costs_the_leader_one_round_then_it_asks_the_other():
    async def test(m: Members):
        await m.add(A, timeout=0.3)
        await m.add(B)
        await m.add(C)
        m.raft[A].view = (7, 90, frozenset({B, C}))
        m.raft[A].applied = 90
        m.raft[B].current_term = m.raft[C].current_term = 7
        await connected(m.peers[A], m.raft[A])
        for _ in range(100):  # both dialed by now or soon
            if all(conn.ready for conn in m.peers[A]._dialed.values()) and len(m.peers[A]._dialed) == 2:
                break
            await asyncio.sleep(0.01)
        stalled = B  # sorted first: the one asked
        for protocol in list(m.peers[stalled]._answering):
            protocol._transport.pause_reading()
        taken, r = await start(m.peers[A])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert len(r.via_raft) == 1, "no answer in time: Raft takes the round"
        confirmed = m.peers[A].confirmed
        taken, r = await start(m.peers[A])
        assert taken
        await asyncio.wait_for(r.ended.wait(), 2)
        assert r.here == [None] and m.peers[A].confirmed == confirmed + 1, "the other follower answered"
    run(test)


@pytest.mark.parametrize("attack", ["replay to the leader", "leader's own greeting"])
def test_with_a_secret_a_man_in_the_middle_cannot_turn_the_leaders_own_answer_around(attack):
    """The leader L (A here, term 7) pings B, which has moved on to term 8;
    in between sits someone without the secret, who wants L to hear its own
    term back, signed by L:
    - replay: B's greeting passes unchanged, and each of L's requests is
      replayed to L itself, over a connection of the attacker's;
    - own greeting: L's greeting to B is passed to L's own answering side
      (claiming to be B), and L's answer to it comes back as B's greeting.
    Either way the round is never confirmed: L answers no request signed for
    another connection, and a greeting signed for other roles is refused."""
    from metastore.read_peers import MAGIC, MAC_BYTES, NONCE_BYTES

    async def test(m: Members):
        await m.add(A, secret="s3cret", timeout=0.5)
        await m.add(B, secret="s3cret")
        m.raft[A].view = (7, 90, frozenset({B}))
        m.raft[A].current_term = 7  # what A answers to a ping: a reflected answer would confirm
        m.raft[A].applied = 90
        m.raft[B].current_term = 8
        answers: list[int] = []

        async def pipe(reader, writer):
            try:
                while data := await reader.read(4096):
                    writer.write(data)
            except ConnectionError:
                pass
            writer.close()

        async def middle(reader, writer):
            head = await reader.readexactly(len(MAGIC) + 2)
            rest = await reader.readexactly(int.from_bytes(head[-2:], "big") + NONCE_BYTES)
            nonce = rest[-NONCE_BYTES:]
            own_r, own_w = await asyncio.open_connection("127.0.0.1", m.ports[A])
            own_w.write(MAGIC + len(B).to_bytes(2, "big") + B.encode() + nonce)
            own_greeting = await own_r.readexactly(2 + len(A) + NONCE_BYTES + MAC_BYTES)
            if attack == "leader's own greeting":
                writer.write(len(B).to_bytes(2, "big") + B.encode() + own_greeting[2 + len(A):])
                await asyncio.gather(pipe(reader, own_w), pipe(own_r, writer))
                return
            real_r, real_w = await asyncio.open_connection("127.0.0.1", m.ports[B])
            real_w.write(head + rest)
            writer.write(await real_r.readexactly(2 + len(B) + NONCE_BYTES + MAC_BYTES))
            try:
                while True:
                    own_w.write(await reader.readexactly(17 + MAC_BYTES))
                    answer = await own_r.read(17 + MAC_BYTES)
                    answers.append(len(answer))
                    writer.write(answer)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
        server = await asyncio.start_server(middle, "127.0.0.1", 0)
        m.servers.append(server)
        m.ports["middle"] = server.sockets[0].getsockname()[1]
        m.redirect[B] = "middle"
        rounds = []
        for _ in range(60):
            taken, r = await start(m.peers[A])
            if taken:
                await asyncio.wait_for(r.ended.wait(), 3)
                rounds.append(r)
            await asyncio.sleep(0.02)
        assert all(r.here == [] for r in rounds), "a round was confirmed through the man in the middle"
        assert m.peers[A].confirmed == 0
        if attack == "replay to the leader":
            assert rounds and all(len(r.via_raft) == 1 for r in rounds), "taken, then handed to Raft"
            assert answers and set(answers) == {0}, "L closed the attacker's connection without answering"
        else:
            assert not rounds, "the greeting never checks out: the connection is never used"
    run(test)


def test_connections_that_do_not_greet_in_time_or_one_too_many_are_closed(monkeypatch):
    import metastore.read_peers as read_peers
    monkeypatch.setattr(read_peers, "GREETING_TIMEOUT", 0.2)
    monkeypatch.setattr(read_peers, "MAX_ANSWERING", 2)

    async def test(m: Members):
        await m.add(A)
        reader, writer = await asyncio.open_connection("127.0.0.1", m.ports[A])
        writer.write(b"\x00metastore")  # and nothing more
        assert await asyncio.wait_for(reader.read(), 2) == b"", "closed once the greeting is late"
        writer.close()
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", m.ports[A])
            writer.write(read_peers.MAGIC + b"\x00\x01B" + bytes(16))
            await reader.readexactly(2 + len(A) + 32)  # greeted
            held.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", m.ports[A])
        writer.write(read_peers.MAGIC + b"\x00\x01B" + bytes(16))
        assert await asyncio.wait_for(reader.read(), 2) == b"", "a third one is refused"
        for w in held + [writer]:
            w.close()
    run(test)


def test_without_a_secret_only_members_on_loopback_are_asked(monkeypatch):
    dialed: list = []

    async def test(m: Members):
        await leader_and_follower(m)
        loop = asyncio.get_running_loop()
        real_connect = loop.create_connection

        def recording_connect(factory, host, port, **kwargs):
            dialed.append(host)
            return real_connect(factory, host, port, **kwargs)
        monkeypatch.setattr(loop, "create_connection", recording_connect)
        m.peers[B]._client_url_of = lambda address: "http://192.0.2.1:2379"  # not this machine
        await never_taken(m.peers[B], "a remote URL without a secret", tries=10)
        assert dialed == [], "never dialed"
        m.peers[B]._client_url_of = m.client_url_of  # on loopback: dialed and used
        m.peers[B]._redial_at.clear()  # (not after the 30 s a refused URL waits)
        await connected(m.peers[B], m.raft[B])
        assert dialed == ["127.0.0.1"]
    run(test)


def test_a_member_that_never_answers_is_dialed_less_and_less_often(monkeypatch):
    import metastore.read_peers as read_peers
    monkeypatch.setattr(read_peers, "REDIAL_AFTER", 0.05)

    async def test(m: Members):
        await m.add(B, timeout=0.1)
        m.raft[B].leader = A
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never greets
        m.servers.append(server)
        m.peers[B]._client_url_of = lambda address: f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        loop = asyncio.get_running_loop()
        waits = []
        while len(waits) < 3:
            assert not (await start(m.peers[B]))[0]
            if A not in m.peers[B]._dialed and A in m.peers[B]._redial_at:
                wait = m.peers[B]._redial_at[A] - loop.time()
                if wait > 0 and (not waits or wait > waits[-1] * 1.5):
                    waits.append(wait)
            await asyncio.sleep(0.01)
        assert waits[1] > waits[0] * 1.5 and waits[2] > waits[1] * 1.5, waits
    run(test)
