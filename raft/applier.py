"""Applying committed entries on a thread of their own.

pysyncobj hands each committed entry to the replicated method on its tick
thread -- the thread that also reads peer messages, appends and acknowledges
entries and sends heartbeats. Applying there would stop all of that for as
long as one entry takes: a DeleteRange of 60,000 keys takes seconds, during
which a follower acknowledges nothing (so nothing else commits) and a leader
sends no heartbeat. As etcd does, the Raft loop here only queues the entry;
the Applier applies entries in log order beside it, and whoever proposed an
entry is answered once it is applied.

Anything that must see the state at an exact log position (a snapshot
frozen at pysyncobj's last applied index) runs in the same queue, after the
entries before it (`run_in_order`).
"""
from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("metastore.raft")

# An apply longer than this is reported to long-apply listeners (the lessor
# extends every lease by it: keep-alives queued behind it could not land).
LONG_APPLY = 0.05
# etcd warns about an apply slower than this ("apply request took too long").
SLOW_APPLY_WARNING = 0.1


# What waiters of an entry that was never applied (the node stopped) get.
NOT_APPLIED = object()


class AppliedResult:
    """What applying one entry returned, once it has been applied (handed to
    pysyncobj as the replicated method's return value, which it passes to the
    proposer's callback at once)."""

    __slots__ = ("_lock", "_done", "_value", "_listeners")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._listeners: list[Callable[[Any], None]] = []

    def when_applied(self, listener: Callable[[Any], None]) -> None:
        """listener(value) once applied: now if it already is, else on the
        applier thread."""
        with self._lock:
            if not self._done:
                self._listeners.append(listener)
                return
        listener(self._value)

    def _set(self, value: Any) -> None:
        with self._lock:
            self._done, self._value = True, value
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                listener(value)
            except Exception:  # one waiter's failure must not stop the applier
                log.exception("a listener of an applied entry failed")


class Applier:
    """The thread that applies committed entries in log order."""

    def __init__(self, apply: Callable[[bytes, int], Any], on_long_apply: Callable[[float], None]) -> None:
        self._apply = apply
        self._on_long_apply = on_long_apply
        self._queue: collections.deque[tuple[int, bytes | None, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._backlog = 0  # queued entries (not jobs) not yet applied
        self._last_index = 0  # of the last entry applied
        self._requests = 0  # see requests_applied
        self._started_at: float | None = None  # the entry being applied
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="raft-apply", daemon=True)
        self._thread.start()

    # -- called on the tick thread --------------------------------------------
    def enqueue(self, payload: bytes, index: int) -> AppliedResult:
        result = AppliedResult()
        with self._cond:
            if not self._backlog:
                # Nothing queued: every entry before this one is applied, by
                # this thread or by pysyncobj itself (a leader's no-op, a
                # configuration change). Without this a member whose first
                # entries since its start are still queued reported 0 applied.
                self._last_index = max(self._last_index, index - 1)
            self._queue.append((index, payload, result))
            self._backlog += 1
            self._cond.notify()
        return result

    def run_in_order(self, job: Callable[[], None]) -> None:
        """Run job() on the applier thread once every entry queued so far is
        applied, before any queued later."""
        with self._cond:
            self._queue.append((0, None, job))
            self._cond.notify()

    def loaded(self, index: int) -> None:
        """A snapshot taken at `index` replaced the state (the queue was
        drained first): that is the last index applied now, whatever came
        before."""
        self._last_index = index

    def drain(self) -> None:
        """Return once everything queued so far has been applied or run (a
        snapshot is about to replace the state)."""
        reached = threading.Event()
        self.run_in_order(reached.set)
        while not reached.wait(0.1):
            if not self._thread.is_alive():
                return

    # -- status ----------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Entries committed and handed over but not applied yet."""
        return self._backlog

    @property
    def last_index(self) -> int:
        """Raft index of the last entry applied: by this thread, or by
        pysyncobj before the entries queued now (0: none since the start)."""
        return self._last_index

    @property
    def requests_applied(self) -> int:
        """Requests applied since this applier started. An entry whose apply
        answered a list -- one result per request the entry carried, as
        StateMachine.apply does -- counts as that many, any other as one:
        snapshots are due by requests, as etcd counts them (see
        RaftNode._snapshot_when_due)."""
        return self._requests

    def applying_for(self) -> float:
        """Seconds the entry being applied right now has taken so far (0
        when none is): a long apply holds back everything queued behind it."""
        started = self._started_at
        return time.monotonic() - started if started is not None else 0.0

    def stop(self) -> None:
        """Finish the entry being applied, drop the rest (committed entries are
        applied again from the log after a restart) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    dropped = list(self._queue)
                    self._queue.clear()
                    break
                index, payload, target = self._queue.popleft()
            if payload is None:
                try:
                    target()
                except Exception:
                    log.exception("a job queued behind the applied entries failed")
                continue
            value = self._apply_one(payload, index)
            self._requests += len(value) if isinstance(value, list) else 1
            self._last_index = index  # before the backlog shrinks: see RaftNode.raft_status
            with self._cond:
                self._backlog -= 1
            target._set(value)
        for _index, payload, target in dropped:
            if payload is not None:
                target._set(NOT_APPLIED)

    def _apply_one(self, payload: bytes, index: int) -> Any:
        t0 = time.monotonic()
        self._started_at = t0
        # No cyclic GC during an apply: a DeleteRange of many keys allocates
        # hundreds of thousands of short-lived tuples, each batch of which
        # would start a full collection (tens of ms each, most of a long
        # apply); reference counting frees them, and the collector runs after.
        collect = gc.isenabled()
        if collect:
            gc.disable()
        try:
            return self._apply(payload, index)
        except Exception:  # the state machine never raises; if it does, say so loudly
            log.exception("applying raft entry %d failed", index)
            return NOT_APPLIED
        finally:
            if collect:
                gc.enable()
            self._started_at = None
            took = time.monotonic() - t0
            if took > LONG_APPLY:
                self._on_long_apply(took)
                if took > SLOW_APPLY_WARNING:
                    log.warning("applying raft entry %d took %.0f ms (a big DeleteRange, txn or lease "
                                "revoke?)", index, took * 1000)
