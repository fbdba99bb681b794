"""gc_paused: the collector is off while any holder is inside, and back as it was."""
from __future__ import annotations

import gc
import threading

import pytest

from metastore.api.pb import rpc_pb2
from metastore.engines.memory import open_store
from metastore.gc_pause import gc_paused


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_off_inside_and_back_on_after_the_last_holder_leaves() -> None:
    inside, leave = threading.Event(), threading.Event()

    def other_holder() -> None:
        with gc_paused():
            inside.set()
            assert leave.wait(10)

    t = threading.Thread(target=other_holder)
    with gc_paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread still holds it
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_elsewhere_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_a_range_delete_runs_without_collection_a_single_key_with(monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store()
    seen = []
    real = type(store)._delete

    def spy(self, w, req, out):
        seen.append(gc.isenabled())
        return real(self, w, req, out)

    for key in (b"a", b"b", b"c"):
        store.put(rpc_pb2.PutRequest(key=key, value=b"v"))
    monkeypatch.setattr(type(store), "_delete", spy)
    store.delete_range(rpc_pb2.DeleteRangeRequest(key=b"a"))
    store.delete_range(rpc_pb2.DeleteRangeRequest(key=b"b", range_end=b"z"))
    assert seen == [True, False]
    assert gc.isenabled()
