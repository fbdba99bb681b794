"""raft.node._ReplicatedLog: the append_entries pysyncobj wants during the
body of a tick (after applying, and after each command it appends) go out
once, after the commands; outside a tick's body they go out at once. The
pysyncobj object is built without sockets and its real send is recorded."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from pysyncobj import SyncObj

from metastore.raft.node import GATHER_AT_MOST, _ReplicatedLog


@pytest.fixture
def log(monkeypatch):
    sent: list[str] = []
    monkeypatch.setattr(SyncObj, "_SyncObj__sendAppendEntries", lambda self: sent.append("append_entries"))
    obj = object.__new__(_ReplicatedLog)
    obj._gathering_appends, obj._appends_gathered = False, 0
    obj.leading = True
    obj._isLeader = lambda: obj.leading
    return obj, sent, monkeypatch


def test_a_ticks_appends_go_out_once_after_its_commands(log):
    obj, sent, monkeypatch = log

    def three_commands(self: _ReplicatedLog) -> None:
        for _ in range(3):
            self._SyncObj__sendAppendEntries()  # what pysyncobj does after appending each

    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", three_commands)
    obj._gathering_appends = True  # _onTick's body
    obj._SyncObj__sendAppendEntries()  # entries applied: the new commit index
    assert sent == []
    obj._checkCommandsToApply()
    assert sent == ["append_entries"]
    obj._SyncObj__sendAppendEntries()  # later, in the poll (a vote won, ...): at once
    assert sent == ["append_entries"] * 2


def test_nothing_wanted_sends_nothing_and_a_former_leader_sends_nothing(log):
    obj, sent, monkeypatch = log
    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", lambda self: None)
    obj._gathering_appends = True
    obj._checkCommandsToApply()
    assert sent == []
    obj._gathering_appends = True
    obj._SyncObj__sendAppendEntries()
    obj.leading = False  # stepped down within the tick
    obj._checkCommandsToApply()
    assert sent == [] and not obj._appends_gathered


def test_a_failing_command_step_still_sends_what_was_wanted(log):
    obj, sent, monkeypatch = log

    def fails(self: _ReplicatedLog) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", fails)
    obj._gathering_appends = True
    obj._SyncObj__sendAppendEntries()
    with pytest.raises(RuntimeError):
        obj._checkCommandsToApply()
    assert sent == ["append_entries"] and not obj._gathering_appends


def test_pysyncobj_sends_through_the_name_overridden_here():
    # pysyncobj calls self.__sendAppendEntries() in the steps below; Python
    # looks that up as _SyncObj__sendAppendEntries, which _ReplicatedLog
    # overrides. A pysyncobj that renamed it would bypass the override.
    for step in (SyncObj._onTick, SyncObj._checkCommandsToApply):
        assert "_SyncObj__sendAppendEntries" in step.__code__.co_names


def _ticking(obj: _ReplicatedLog) -> None:
    """What our _onTick wrapper reads before pysyncobj's body runs."""
    obj._durable_journal = None
    obj._SyncObj__transport = SimpleNamespace(send_held_acks=lambda: None)
    obj.read_index = SimpleNamespace(before_tick=lambda: None)


def test_the_tick_wrapper_gathers_and_its_commands_step_sends(log):
    obj, sent, monkeypatch = log
    _ticking(obj)
    seen: list[str] = []

    def body(self: _ReplicatedLog, timeToWait: float = 0.0) -> None:  # pysyncobj's _onTick, shortened
        self._SyncObj__sendAppendEntries()  # after applying
        seen.append(f"before the commands: {len(sent)} sent")
        self._checkCommandsToApply()
        self._SyncObj__sendAppendEntries()  # a message handled in the poll

    monkeypatch.setattr(SyncObj, "_onTick", body)
    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", lambda self: self._SyncObj__sendAppendEntries())
    obj._onTick(0.0)
    assert seen == ["before the commands: 0 sent"]
    assert sent == ["append_entries"] * 2 and not obj._gathering_appends


@pytest.mark.parametrize("ending", ["returns early", "raises"])
def test_a_tick_that_ends_before_its_commands_still_sends(log, ending):
    obj, sent, monkeypatch = log
    _ticking(obj)

    def body(self: _ReplicatedLog, timeToWait: float = 0.0) -> None:
        self._SyncObj__sendAppendEntries()
        if ending == "raises":
            raise RuntimeError("boom")

    monkeypatch.setattr(SyncObj, "_onTick", body)
    if ending == "raises":
        with pytest.raises(RuntimeError, match="boom"):
            obj._onTick(0.0)
    else:
        obj._onTick(0.0)
    assert sent == ["append_entries"] and not obj._gathering_appends
    obj._SyncObj__sendAppendEntries()  # between ticks: at once
    assert sent == ["append_entries"] * 2


def test_many_commands_in_one_tick_go_out_in_groups(log):
    obj, sent, monkeypatch = log
    monkeypatch.setattr(SyncObj, "_checkCommandsToApply",
                        lambda self: [self._SyncObj__sendAppendEntries() for _ in range(2 * GATHER_AT_MOST + 1)])
    obj._gathering_appends = True
    obj._checkCommandsToApply()
    assert sent == ["append_entries"] * 3  # two full groups on the way, the rest at the end
