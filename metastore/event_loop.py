"""The event loop a member runs on.

uvloop where it is installed (a dependency on Linux and macOS), else
asyncio's own. Measured on the 2-core benchmark machine, a bare grpc.aio
server answering Range spent ~10 % less CPU per request on uvloop (276 vs
248 us), and the member's own loop work (futures, timers, callbacks from
Raft's threads) gains too. METASTORE_EVENT_LOOP=asyncio keeps asyncio's loop,
to rule the loop out when chasing a problem.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    if os.environ.get("METASTORE_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on the loop loop_factory() names."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` s have passed; True if it is set.

    For loops that a stop cancels. asyncio.wait_for(event.wait(), timeout)
    on Python 3.11 and older returns normally when the cancellation lands
    just after the event was set (CPython gh-86296): the loop goes round
    again and the task that stops it waits forever (an embedded member that
    never stopped). Here a cancellation always ends the wait."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
