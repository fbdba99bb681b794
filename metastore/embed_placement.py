"""Workloads and drain from an application that embeds a member.

`embed.Member.placement` is a `PlacementClient`: the HTTP placement API
(api/placement_http.py) as plain synchronous calls, plus the two hooks only
an embedding application can give -- accept a workload assigned to this
member, and let go of one moved away:

    def on_assign(w: Workload) -> dict[int, int] | None:
        start_running(w.id, w.metadata)          # raise to refuse
        return {other_member_id: 2}              # sub-units it runs elsewhere, if any

    m = embed.start(name="app", ..., on_assign=on_assign, on_release=lambda w: stop_running(w.id))
    m.placement.register("job-7", {"shard": 7})
    m.placement.drain("app-2")

Hooks run on a worker thread, never on the member's event loop, so they
may block; a member with no on_assign hook accepts at once.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from metastore.member_agent import AssignHook, ReleaseHook
from metastore.placement import PlacementError
from metastore.workloads import Workload

if TYPE_CHECKING:  # pragma: no cover
    from metastore.embed import Member

T = TypeVar("T")

__all__ = ["PlacementClient", "PlacementError", "Workload"]


class PlacementClient:
    def __init__(self, member: "Member", timeout: float = 30.0) -> None:
        self._member = member
        self._timeout = timeout

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        loop = self._member.loop
        node = self._member.node
        if loop is None or node is None or not self._member.running:
            raise RuntimeError(f"metastore member {self._member.name!r} is not running")

        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(self._timeout)

    @property
    def _placement(self) -> Any:
        return self._member.node.placement

    # -- hooks ---------------------------------------------------------------------
    def set_hooks(self, on_assign: AssignHook | None = None, on_release: ReleaseHook | None = None) -> None:
        """Install the application's hooks (see the module docstring)."""
        agent = self._placement.agent
        agent.on_assign = on_assign
        agent.on_release = on_release

    # -- workloads -------------------------------------------------------------------
    def register(self, workload_id: str, metadata: Any = None) -> Workload:
        """Register a workload or update its metadata (idempotent)."""
        return self._run(lambda: self._placement.register(workload_id, metadata))[1]

    def remove(self, workload_id: str) -> bool:
        return self._run(lambda: self._placement.remove(workload_id))

    def list(self) -> list[Workload]:
        return self._run(lambda: self._placement.list())

    def get(self, workload_id: str) -> Workload | None:
        return self._run(lambda: self._placement.get(workload_id))

    def mine(self) -> list[Workload]:
        """The workloads this member runs in its current session."""
        me, session = self._member.member_id, self._placement.agent.session
        return [w for w in self.list() if w.owner == me and w.session == session]

    def report_subunits(self, workload_id: str, subunits: dict[int, int]) -> bool:
        """Report the sub-units (per member id) this member runs for a workload
        it owns; False (dropped) when it no longer owns it."""
        async def report() -> bool:
            current = await self._placement.get(workload_id)
            if (current is None or current.owner != self._member.member_id
                    or current.session != self._placement.agent.session):
                return False
            return await self._placement.acknowledge(workload_id, current.owner, current.epoch, subunits,
                                                     accept=False)

        return self._run(report)

    # -- members and drain --------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        return self._run(lambda: self._placement.members_status())

    def drain(self, member: str, deadline_seconds: float = 0.0) -> dict[str, int]:
        """Start draining `member` (name or hex id); PlacementError (with an
        HTTP-like status) when refused."""
        return self._run(lambda: self._placement.drain_start(member, deadline_seconds))

    def drain_status(self, member: str) -> dict[str, Any]:
        return self._run(lambda: self._placement.drain_status(member))

    def cancel_drain(self, member: str) -> dict[str, Any]:
        return self._run(lambda: self._placement.drain_cancel(member))
