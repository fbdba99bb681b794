"""raft.read_index in isolation: when a read index may be handed out.

The host is a fake standing in for pysyncobj (its state, its peers, the
messages it sends); the test drives ticks and messages by hand, playing the
followers and the leader. What it pins down is the safety rule: a read is
answered only after a majority echoed a round started after the read, in the
read's term -- where a follower's ask, sent in the leader's term after its
reads arrived, counts as that follower's echo for those reads -- and only
once this member applied the read index."""
from __future__ import annotations

from metastore import errors
from metastore.raft.read_index import ANSWER, ASK, ECHO, ROUND, ReadIndex


class FakeHost:
    def __init__(self, *, leading: bool, voters: list[str], term: int = 3) -> None:
        self.leading = leading
        self.current_term = term
        self.voter_list = voters
        self.leader_node: str | None = None
        self.commit = 10
        self.applied = 10
        self.sent: list[tuple[str, dict]] = []
        self.heartbeats = 0
        self.deferred: list = []  # jobs waiting for the applier
        self.woken = 0
        self.disconnected: set[str] = set()

    def leading_term(self):
        return self.current_term if self.leading else None

    def term(self):
        return self.current_term

    def read_index(self):
        return self.commit

    def voters(self):
        return list(self.voter_list)

    def leader(self):
        return self.leader_node

    def send(self, node, message):
        self.sent.append((node, message))
        return node not in self.disconnected

    def send_heartbeats_now(self):
        self.heartbeats += 1

    def last_applied(self):
        return self.applied

    def after_applied(self, job):
        self.deferred.append(job)

    def wake(self):
        self.woken += 1

    def run_applier(self):
        jobs, self.deferred = self.deferred, []
        for job in jobs:
            job()


def heartbeat(reads: ReadIndex, node: str) -> dict:
    """The append_entries the leader would send `node` now, as tagged."""
    message = {"type": "append_entries", "term": 3}
    reads.tag_outgoing(node, message)
    return message


def echo(reads: ReadIndex, node: str, term: int, round_: int) -> None:
    message = {"type": "next_node_idx", "success": True, ECHO: (term, round_)}
    reads.before_message(node, message)
    reads.after_message(node, message)


def test_leader_answers_after_a_majority_echoes_a_later_round():
    host = FakeHost(leading=True, voters=["b", "c", "d", "e"])  # five voters: two echoes needed
    reads = ReadIndex(host, ask_timeout=1.0)
    assert ROUND not in heartbeat(reads, "b"), "no read waits: replication messages stay untagged"
    first: list = []
    reads.request(first.append)
    assert host.woken == 1
    reads.before_tick()
    assert host.heartbeats == 1, "the round is sent at once, not at the next heartbeat"
    old_round = heartbeat(reads, "b")[ROUND]
    answers: list = []
    reads.request(answers.append)
    reads.before_tick()
    new_round = heartbeat(reads, "b")[ROUND]
    assert new_round == old_round + 1 and host.heartbeats == 2

    echo(reads, "b", 3, old_round)
    echo(reads, "c", 3, old_round)
    host.run_applier()
    assert first == [None], "two echoes and the leader: a majority of five"
    assert not answers, "a round sent before the read proves nothing about it"
    echo(reads, "b", 3, new_round)
    assert not answers, "one echo of five voters is no majority"
    echo(reads, "c", 2, new_round)
    assert not answers, "an echo of another term does not count"
    echo(reads, "c", 3, new_round)
    host.run_applier()
    assert answers == [None]
    assert ROUND not in heartbeat(reads, "b"), "no read waits any more"


def test_answer_waits_until_the_read_index_is_applied_here():
    host = FakeHost(leading=True, voters=["b", "c"])
    host.commit, host.applied = 15, 12
    reads = ReadIndex(host, ask_timeout=1.0)
    answers: list = []
    reads.request(answers.append)
    reads.before_tick()
    echo(reads, "b", 3, heartbeat(reads, "b")[ROUND])
    reads.after_tick()
    host.run_applier()
    assert not answers, "entries up to the read index are not applied yet"
    host.applied = 15
    reads.after_tick()
    assert not answers, "the answer waits its turn behind the applier"
    host.run_applier()
    assert answers == [None]


def test_reads_of_one_tick_share_a_round_and_a_lone_leader_needs_none():
    host = FakeHost(leading=True, voters=["b", "c"])
    reads = ReadIndex(host, ask_timeout=1.0)
    answers: list = []
    for _ in range(5):
        reads.request(answers.append)
    reads.before_tick()
    assert host.heartbeats == 1
    echo(reads, "c", 3, heartbeat(reads, "c")[ROUND])
    host.run_applier()
    assert answers == [None] * 5

    alone = FakeHost(leading=True, voters=[])
    reads = ReadIndex(alone, ask_timeout=1.0)
    answers = []
    reads.request(answers.append)
    reads.before_tick()
    alone.run_applier()
    assert answers == [None]


def test_a_leader_that_loses_its_term_fails_its_reads():
    host = FakeHost(leading=True, voters=["b", "c"])
    reads = ReadIndex(host, ask_timeout=1.0)
    answers: list = []
    reads.request(answers.append)
    reads.before_tick()
    host.current_term = 4  # deposed and elected again: the round was of term 3
    reads.before_tick()
    assert answers == [errors.NO_LEADER]
    host.leading = False
    reads.request(answers.append)
    reads.before_tick()
    assert answers == [errors.NO_LEADER, errors.NO_LEADER], "no leader known: nobody to ask"


def test_follower_asks_the_leader_and_waits_for_its_own_applier():
    host = FakeHost(leading=False, voters=["a", "c"])
    host.leader_node = "a"
    host.applied = 7
    reads = ReadIndex(host, ask_timeout=1.0)
    answers: list = []
    reads.request(answers.append)
    reads.before_tick()
    node, ask = host.sent[-1]
    assert node == "a" and ask["type"] == ASK
    assert ask["term"] == 3, "the ask says the follower's term when it was sent, after the read arrived"
    assert reads.on_message("a", {"type": ANSWER, "id": ask["id"], "index": 9})
    reads.after_tick()
    host.run_applier()
    assert not answers, "read index 9 is not applied here yet"
    host.applied = 9
    reads.after_tick()
    host.run_applier()
    assert answers == [None]

    # The leader changes while a request is out: it fails, to be asked again.
    reads.request(answers.append)
    reads.before_tick()
    host.leader_node = "c"
    reads.before_tick()
    assert answers[-1] is errors.NO_LEADER

    # The leader refuses (it no longer leads): nothing was read, ask again.
    host.leader_node = "a"
    reads.request(answers.append)
    reads.before_tick()
    ask = host.sent[-1][1]
    assert reads.on_message("a", {"type": ANSWER, "id": ask["id"], "refused": True})
    assert answers[-1] is errors.NO_LEADER

    # Not connected to the leader: no waiting for an answer that cannot come.
    host.disconnected.add("a")
    reads.request(answers.append)
    reads.before_tick()
    assert answers[-1] is errors.NO_LEADER and len(answers) == 4


def test_follower_echoes_only_a_leader_it_accepts():
    host = FakeHost(leading=False, voters=["a", "c"], term=5)
    reads = ReadIndex(host, ask_timeout=1.0)
    stale = {"type": "append_entries", "term": 4, ROUND: 8}
    reads.before_message("a", stale)
    reply = {"type": "next_node_idx", "success": True}
    reads.tag_outgoing("a", reply)
    assert ECHO not in reply, "a leader of an older term is not echoed"
    current = {"type": "append_entries", "term": 5, ROUND: 9}
    reads.before_message("c", current)
    reply = {"type": "next_node_idx", "success": True}
    reads.tag_outgoing("c", reply)
    assert reply[ECHO] == (5, 9), "the reply to that very message carries its round"
    reads.before_message("c", {"type": "append_entries", "term": 5})
    reply = {"type": "next_node_idx", "success": True}
    reads.tag_outgoing("c", reply)
    assert ECHO not in reply, "a message without a round gets a reply without an echo"


def test_leader_answers_a_followers_ask_by_message():
    host = FakeHost(leading=True, voters=["b", "c"])
    host.commit = 21
    reads = ReadIndex(host, ask_timeout=1.0)
    assert reads.on_message("b", {"type": ASK, "id": 4})
    reads.before_tick()
    echo(reads, "c", 3, heartbeat(reads, "c")[ROUND])
    assert host.sent[-1] == ("b", {"type": ANSWER, "id": 4, "index": 21})
    host.leading = False
    assert reads.on_message("b", {"type": ASK, "id": 5})
    assert host.sent[-1][1]["id"] == 5 and host.sent[-1][1]["refused"]


def test_an_ask_in_the_leaders_term_vouches_for_the_askers_reads_only():
    # Three voters: the asker (still in the leader's term after its reads
    # arrived) and the leader are a majority no later leader can have had.
    host = FakeHost(leading=True, voters=["b", "c"])
    host.commit = host.applied = 21
    reads = ReadIndex(host, ask_timeout=1.0)
    assert reads.on_message("b", {"type": ASK, "id": 4, "term": 3})
    assert host.sent[-1] == ("b", {"type": ANSWER, "id": 4, "index": 21})
    assert host.heartbeats == 0 and ROUND not in heartbeat(reads, "c"), "no round for it"

    # An ask from an older term, a later one (that follower may have voted
    # in it), or from a node that does not vote, proves nothing.
    assert reads.on_message("b", {"type": ASK, "id": 5, "term": 2})
    assert reads.on_message("b", {"type": ASK, "id": 6, "term": 4})
    assert reads.on_message("x", {"type": ASK, "id": 7, "term": 3})
    assert len(host.sent) == 1, "all three wait for a round"
    reads.before_tick()
    round_ = heartbeat(reads, "c")[ROUND]
    echo(reads, "c", 3, round_)
    assert [m["id"] for _node, m in host.sent[1:]] == [5, 6, 7]

    # The ask speaks for the reads it carries, not for a read that reached
    # the leader itself meanwhile: that one still waits for an echo.
    local: list = []
    reads.request(local.append)
    reads.before_tick()
    assert reads.on_message("b", {"type": ASK, "id": 8, "term": 3})
    assert host.sent[-1][1] == {"type": ANSWER, "id": 8, "index": 21}
    reads.after_tick()
    host.run_applier()
    assert not local, "the leader alone is no majority"
    echo(reads, "b", 3, heartbeat(reads, "b")[ROUND])
    host.run_applier()
    assert local == [None]


def test_in_a_larger_cluster_an_ask_counts_as_one_echo():
    host = FakeHost(leading=True, voters=["b", "c", "d", "e"])  # five voters: two followers needed
    reads = ReadIndex(host, ask_timeout=1.0)
    # An echo of an earlier round, before the ask arrived, is no echo for it.
    reads.request(lambda _error: None)
    reads.before_tick()
    echo(reads, "d", 3, heartbeat(reads, "d")[ROUND])
    assert reads.on_message("b", {"type": ASK, "id": 1, "term": 3})
    assert not host.sent, "the asker and the leader are two of five"
    reads.before_tick()
    round_ = heartbeat(reads, "b")[ROUND]
    echo(reads, "b", 3, round_)
    assert not host.sent, "the asker's own echo does not count twice"
    echo(reads, "d", 3, round_)
    assert host.sent == [("b", {"type": ANSWER, "id": 1, "index": 10})]

    # An asker the configuration dropped while its read waited counts no more.
    assert reads.on_message("c", {"type": ASK, "id": 2, "term": 3})
    host.voter_list = ["b", "d", "e"]  # four voters: still two followers needed
    reads.before_tick()
    round_ = heartbeat(reads, "b")[ROUND]
    echo(reads, "b", 3, round_)
    assert len(host.sent) == 1, "one echo, and no voucher from a non-voter"
    echo(reads, "d", 3, round_)
    assert host.sent[-1] == ("c", {"type": ANSWER, "id": 2, "index": 10})


def test_close_fails_what_waits():
    host = FakeHost(leading=True, voters=["b", "c"])
    reads = ReadIndex(host, ask_timeout=1.0)
    answers: list = []
    reads.request(answers.append)
    reads.before_tick()
    reads.request(answers.append)
    reads.close()
    assert answers == [errors.STOPPED, errors.STOPPED]
    reads.request(answers.append)
    assert answers[-1] is errors.STOPPED
