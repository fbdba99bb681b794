"""When leases expire: clocks kept by every member, acted on by the leader.

Which leases exist is replicated state (the store's `lease` table). When each
one runs out is not: it depends on keep-alives arriving in real time. Every
member keeps a deadline per lease, restarted whenever a grant or a keep-alive
(a `LeaseRefresh` entry) is applied, so all members hold nearly the same
clocks and a new leader knows how long each lease has left -- a lease whose
client died does not get a fresh TTL because the leader changed. Only the
leader acts on them: it proposes a revoke for each expired lease, and the
revoke (deleting the lease's keys) is applied everywhere like any write.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from metastore.store import Store

# etcd's limit on a lease's TTL (seconds).
MAX_LEASE_TTL = 9_000_000_000


def minimum_ttl(election_timeout_ms: int) -> int:
    """etcd's minimum lease TTL: long enough to outlive a leader election
    (1.5 election timeouts, rounded up to whole seconds)."""
    return max(1, -(-election_timeout_ms * 3 // 2000))


class Lessor:
    def __init__(self, store: Store, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        # A new leader gives every lease at least this long, so clients whose
        # keep-alives went to the old leader have time to find the new one.
        self._grace = grace
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}

    # -- applied entries (Raft apply thread) ----------------------------------
    def granted(self, lease: int, ttl: int) -> None:
        with self._lock:
            self._deadlines[lease] = self._clock() + ttl

    def revoked(self, lease: int) -> None:
        with self._lock:
            self._deadlines.pop(lease, None)

    def refreshed(self, leases: list[int]) -> None:
        now = self._clock()
        with self._lock:
            for lease in leases:
                ttl = self._store.lease_ttl(lease)
                if ttl is not None:
                    self._deadlines[lease] = now + ttl

    # -- queries --------------------------------------------------------------
    def remaining(self, lease: int) -> float | None:
        """Seconds until the lease expires (<= 0: expired, revoke pending);
        None if there is no such lease."""
        ttl = self._store.lease_ttl(lease)
        if ttl is None:
            return None
        now = self._clock()
        with self._lock:
            return self._deadlines.setdefault(lease, now + ttl) - now

    def became_leader(self) -> None:
        now = self._clock()
        with self._lock:
            for lease, ttl in self._store.leases().items():
                floor = now + min(ttl, self._grace)
                self._deadlines[lease] = max(self._deadlines.get(lease, now + ttl), floor)

    def extend(self, seconds: float) -> None:
        """Move every deadline later by `seconds`: time during which
        keep-alives could not be applied (a paused proposer) is not held
        against any lease."""
        with self._lock:
            for lease in self._deadlines:
                self._deadlines[lease] += seconds

    def expired(self) -> list[int]:
        """Leases past their deadline, oldest first. Leases this member has
        no clock for (loaded from a snapshot or after a restart) start one."""
        now = self._clock()
        leases = self._store.leases()
        with self._lock:
            for gone in [lease for lease in self._deadlines if lease not in leases]:
                del self._deadlines[gone]
            out = []
            for lease, ttl in leases.items():
                deadline = self._deadlines.setdefault(lease, now + ttl)
                if deadline <= now:
                    out.append((deadline, lease))
        return [lease for _, lease in sorted(out)]
