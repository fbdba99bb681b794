"""The follower's held acknowledgements (raft.node._DurableAckTransport) in
isolation: one fsync for many, and never one that claims entries the log
may have lost. The journal is real; pysyncobj's node is a stand-in that
only carries what the transport reads (term, journal, read-index tagging),
and what would go on the wire is recorded instead of sent."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import metastore.raft.node as raft_node
from metastore.raft.journal import DurableJournal
from metastore.raft.read_index import ECHO

LEADER, OTHER = "127.0.0.1:1", "127.0.0.1:2"


@pytest.fixture
def transport(tmp_path, monkeypatch):
    journal = DurableJournal(str(tmp_path / "raft.log"))
    wire: list[tuple[str, dict]] = []
    monkeypatch.setattr(raft_node.TCPTransport, "send",
                        lambda self, node, message: wire.append((node, message)) or True)
    t = object.__new__(raft_node._DurableAckTransport)
    t._held_acks, t._held_term, t._last_ack = [], 0, {}
    t._syncObj = SimpleNamespace(_durable_journal=journal, raftCurrentTerm=3,
                                 read_index=SimpleNamespace(tag_outgoing=lambda node, message: None))
    return t, journal, wire


def append(journal: DurableJournal, first: int, last: int, term: int = 3) -> None:
    for i in range(first, last + 1):
        journal.add(b"cmd%d" % i, i, term)


def ack(next_index: int) -> dict:
    return {"type": "next_node_idx", "next_node_idx": next_index, "reset": False, "success": True}


def entries(prev: int, term: int = 3) -> dict:
    return {"type": "append_entries", "term": term, "prevLogIdx": prev, "prevLogTerm": term,
            "entries": [], "commit_index": 0}


def test_acknowledgements_wait_for_one_fsync(transport):
    t, journal, wire = transport
    append(journal, 1, 5)
    t.send(LEADER, ack(6))
    append(journal, 6, 9)
    t.send(LEADER, ack(10))
    assert wire == [] and journal.fsync_count == 0
    t.send_held_acks()  # the start of the next tick
    assert journal.fsync_count == 1 and journal.durable_index == 9
    assert [m["next_node_idx"] for _, m in wire] == [10]  # the furthest says what both said


def test_the_one_sent_carries_the_latest_read_round_echoed(transport):
    t, journal, wire = transport
    append(journal, 1, 5)
    t.send(LEADER, {**ack(4), ECHO: (3, 7)})
    t.send(LEADER, {**ack(5), ECHO: (3, 9)})
    t.send(LEADER, ack(6))  # nothing accepted since: no echo of its own
    t.send_held_acks()
    assert [(m["next_node_idx"], m.get(ECHO)) for _, m in wire] == [(6, (3, 9))]


def test_the_furthest_the_log_still_holds_is_sent(transport):
    t, journal, wire = transport
    append(journal, 1, 12)
    t.send(LEADER, ack(9))
    t.send(LEADER, ack(13))
    journal.deleteEntriesFrom(10)  # positions: 11 and 12 are cut, 10 stays
    t.send_held_acks()
    assert [m["next_node_idx"] for _, m in wire] == [9]


def test_anything_else_sent_goes_after_them(transport):
    t, journal, wire = transport
    append(journal, 1, 3)
    t.send(LEADER, ack(4))
    t.send(LEADER, {"type": "apply_command", "command": b"x"})
    assert [m["type"] for _, m in wire] == ["next_node_idx", "apply_command"]
    assert journal.durable_index == 3


def test_only_entries_that_extend_past_them_are_taken_in_while_they_wait(transport):
    t, journal, _wire = transport
    append(journal, 1, 12)
    t.send(LEADER, ack(13))
    must_flush = t._must_send_held_acks_before
    assert not must_flush(LEADER, entries(prev=12))  # appends after 12: cuts nothing held
    assert must_flush(LEADER, entries(prev=10))      # a resend: pysyncobj cuts from 11
    assert must_flush(LEADER, entries(prev=12, term=4))
    assert must_flush(OTHER, entries(prev=12))
    assert must_flush(LEADER, {**entries(prev=12), "transmission": "start", "data": b""})
    assert must_flush(LEADER, {"type": "append_entries", "term": 3, "serialized": b"..", "commit_index": 0})
    assert must_flush(LEADER, {"type": "request_vote", "term": 4})


def test_one_claiming_entries_the_log_lost_is_dropped(transport):
    t, journal, wire = transport
    append(journal, 1, 12)
    t.send(LEADER, ack(13))
    journal.deleteEntriesFrom(10)  # positions: entries 11 and 12 are cut
    t.send_held_acks()
    assert wire == [] and journal.durable_index == 10


def test_an_acknowledgement_that_repeats_the_last_one_is_not_sent(transport, monkeypatch):
    """The reply to an append_entries with no entry (the leader's new commit
    index, a heartbeat) says what the last reply said: not sent again
    within REPEATED_ACK_WINDOW -- unless it echoes a read round, the term
    changed, or the window has passed (heartbeats keep the leader informed)."""
    t, journal, wire = transport
    clock = [100.0]
    monkeypatch.setattr(raft_node.time, "monotonic", lambda: clock[0])
    append(journal, 1, 5)
    t.send(LEADER, ack(6))
    t.send_held_acks()
    assert [m["next_node_idx"] for _, m in wire] == [6]
    t.send(LEADER, ack(6))  # the commit index came: nothing new to say
    assert len(wire) == 1
    t.send(OTHER, ack(6))  # another peer has heard nothing from us
    t.send(LEADER, {**ack(6), ECHO: (3, 4)})  # a read round waits for this one
    assert [(node, m.get(ECHO)) for node, m in wire[1:]] == [(OTHER, None), (LEADER, (3, 4))]
    clock[0] += raft_node.REPEATED_ACK_WINDOW * 1.5
    t.send(LEADER, ack(6))  # a heartbeat's reply, a window after the last
    assert len(wire) == 4
    t._syncObj.raftCurrentTerm = 4
    t.send(LEADER, ack(6))  # a new term: a new leader's first word
    assert len(wire) == 5
    t.send(LEADER, {**ack(6), "success": False, "reset": True})  # refusals always go
    assert len(wire) == 6
