"""metastore.event_loop.wait_event: a loop waiting with it can always be stopped.

asyncio.wait_for(event.wait(), timeout) on Python 3.11 loses a cancellation
that arrives just after the event was set (CPython gh-86296); a coordinator
loop waiting that way went round again, and the member's stop waited for it
for ever. Each case sets the event, lets the loop run a few steps (the
window is a few iterations wide) and cancels: the task must end cancelled.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest

from metastore import event_loop
from metastore.event_loop import wait_event


async def wait_with_wait_for(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    return event.is_set()


async def stops_after_set_then_cancel(wait: Callable[[asyncio.Event, float], Awaitable[bool]],
                                      steps: int) -> bool:
    """Whether a `while True` loop around `wait` ends when cancelled `steps`
    loop iterations after its event was set."""
    wake = asyncio.Event()

    async def loop_forever() -> None:
        while True:
            await wait(wake, 10.0)
            wake.clear()

    task = asyncio.ensure_future(loop_forever())
    for _ in range(3):
        await asyncio.sleep(0)  # the loop is waiting
    wake.set()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    stopped = task.done()
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    return stopped


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_a_cancelled_wait_event_loop_always_stops(steps):
    assert event_loop.run(stops_after_set_then_cancel(wait_event, steps))


def test_wait_event_reports_set_and_timeout():
    async def both() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_later(0.01, event.set)
        return timed_out, await wait_event(event, 5.0)

    assert event_loop.run(both()) == (False, True)


def test_the_race_is_real_with_wait_for_on_this_python():
    """The case above is not vacuous: on the Pythons that have the bug, the
    same loop around wait_for misses one of the cancellations."""
    import sys
    if sys.version_info >= (3, 12):
        pytest.skip("asyncio.wait_for no longer loses cancellations (gh-86296 fixed in 3.12)")
    assert not all(event_loop.run(stops_after_set_then_cancel(wait_with_wait_for, steps))
                   for steps in (0, 1, 2, 3))
