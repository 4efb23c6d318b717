"""Busy polling: keep the Trio loop polling its sockets for a short while after it sent
frames, instead of blocking in ``epoll_wait`` at once.

Why: in lock-step traffic each party waits for the other about half the time.  On these
VMs a process that blocks and is woken by the peer's frame pays twice: the wake-up (an
idle vCPU, an interrupt, the scheduler) and a colder CPU afterwards (the Python that
follows runs up to ~1.5x slower).  Measured end to end without any client code
(``benchmarks/lockstep_orders.py``), polling while waiting takes ~0.23 ms off a lock-step
update of ~1.07 ms.  Low-latency messaging stacks do the same (spin, then park).

How: one system task per Trio run (shared by every client in it) loops on
``trio.lowlevel.checkpoint()`` until the deadline that :func:`extend` last pushed out;
while it is runnable the scheduler polls with a zero timeout, so a frame that arrives is
read within a few microseconds.  Then it parks and costs nothing.  It does not poll while
a job of the loop's waits on another thread (:func:`hold`): that thread needs the GIL,
which a polling loop would keep taking back from it.

The cost is CPU: a party polls (one core) for up to ``seconds`` after each frame it
sends, so in lock-step traffic a client uses its core fully, and an idle one not at all.
``open_client(busy_poll=0)`` turns it off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.lowlevel


class _Poller:
    """The polling state of one Trio run."""

    def __init__(self) -> None:
        self.deadline = 0.0  # time.perf_counter() until which to poll
        self.holds = 0  # jobs of the loop waiting on other threads
        self.parked = trio.lowlevel.ParkingLot()
        trio.lowlevel.spawn_system_task(self._run, name="optichannel-busy-poll")

    async def _run(self) -> None:
        clock = time.perf_counter
        checkpoint = trio.lowlevel.checkpoint
        while True:
            while self.holds == 0 and clock() < self.deadline:
                await checkpoint()
            await self.parked.park()


_POLLER: trio.lowlevel.RunVar[_Poller] = trio.lowlevel.RunVar("optichannel_busy_poll")


def _poller() -> _Poller:
    try:
        return _POLLER.get()
    except LookupError:
        p = _Poller()
        _POLLER.set(p)
        return p


def runnable() -> int:
    """Scheduler tasks that are runnable only because they poll: 1 while the poller loops,
    else 0.  Code that asks whether the loop is otherwise idle
    (``trio.lowlevel.current_statistics().tasks_runnable``) subtracts it: exact when the
    poller is queued, one too many while it waits its turn in the scheduler's current
    batch (it is not counted then), which can let one other task wait for an inline
    commit."""
    try:
        p = _POLLER.get()
    except LookupError:
        return 0
    return 0 if p.parked else 1


def extend(seconds: float) -> None:
    """Poll for at least ``seconds`` from now (no-op for ``seconds <= 0``).  Call it from
    the Trio thread after queueing frames that the peer will answer."""
    if seconds <= 0:
        return
    p = _poller()
    until = time.perf_counter() + seconds
    if until > p.deadline:
        p.deadline = until
    if p.parked:
        p.parked.unpark()


def acquire() -> None:
    """Stop polling until the matching :func:`release` (both on the Trio thread): a job
    was handed to another thread, which needs the GIL that a polling loop keeps taking
    back from it (up to the interpreter's 5 ms switch interval each time)."""
    _poller().holds += 1


def release() -> None:
    """End an :func:`acquire`; polling resumes if its deadline is still ahead."""
    p = _poller()
    p.holds -= 1
    if p.holds == 0 and p.parked and time.perf_counter() < p.deadline:
        p.parked.unpark()


@contextmanager
def hold() -> Iterator[None]:
    """No polling while the block runs: wrap a wait for a job on another thread."""
    acquire()
    try:
        yield
    finally:
        release()
