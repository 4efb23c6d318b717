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
It is off unless ``open_client(busy_poll=...)`` asks for it (``BUSY_POLL`` suggested).

Polling only pays while the loop has a core to itself.  When other processes want the
cores (a busy machine, or here both parties and one CPU-bound process on two cores), the
scheduler keeps preempting a polling loop and runs the others for a whole time slice
while a frame waits: measured here, lock-step p50 went from 1.65 ms blocking to 3.5 ms
polling.  That is why it is off by default.  The poller also samples how long its thread
waited for a CPU while it polled (the run-queue wait in ``/proc/thread-self/schedstat``):
past ``CONTENDED`` of a sample's time, it stops polling for ``BACKOFF`` seconds, then
tries again (that brought the case above to 2.2 ms: still worse than blocking).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
import trio.lowlevel

#: Seconds of polling per contention sample.
SAMPLE = 0.005
#: A sample in which the loop's thread waited for a CPU this share of the time or more
#: means the cores are contended: stop polling.  (A loop with a core to itself waits
#: ~0-5% here; two parties and one CPU-bound process on two cores, ~30% and more.)
CONTENDED = 0.15
#: Seconds without polling once the cores are found contended, before trying again.
BACKOFF = 1.0


class _RunQueueWait:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux
    ``/proc/thread-self/schedstat``); ``None`` where the kernel does not tell."""

    def __init__(self) -> None:
        try:
            self._f: Any = open("/proc/thread-self/schedstat", "rb", buffering=0)  # noqa: SIM115
        except OSError:
            self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __call__(self) -> float | None:
        if self._f is None:
            return None
        try:
            self._f.seek(0)
            return int(self._f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None


class _Poller:
    """The polling state of one Trio run."""

    def __init__(self) -> None:
        self.deadline = 0.0  # time.perf_counter() until which to poll
        self.holds = 0  # jobs of the loop waiting on other threads
        self.backoff_until = 0.0  # no polling before this (time.perf_counter())
        self.backoffs = 0  # times polling stopped because the cores were contended
        self._polled = 0.0  # the current contention sample: seconds of polling,
        self._waited = 0.0  # and of waiting for a CPU meanwhile
        self.parked = trio.lowlevel.ParkingLot()
        trio.lowlevel.spawn_system_task(self._run, name="optichannel-busy-poll")

    async def _run(self) -> None:
        waited = _RunQueueWait()  # opened here: on the loop's own thread
        try:
            await self._loop(waited)
        finally:
            waited.close()

    async def _loop(self, waited: _RunQueueWait) -> None:
        clock = time.perf_counter
        checkpoint = trio.lowlevel.checkpoint
        while True:
            if self.holds == 0 and clock() < self.deadline:
                w, start = waited(), clock()
                while self.holds == 0 and (now := clock()) < self.deadline:
                    if w is not None and now - start >= SAMPLE:  # a long episode
                        w, start = self._account(now - start, w, waited()), now
                    await checkpoint()
                if w is not None:
                    self._account(clock() - start, w, waited())
            await self.parked.park()

    def _account(self, polled: float, w0: float, w1: float | None) -> float:
        """Add ``polled`` seconds of polling, in which the thread waited ``w1 - w0`` for a
        CPU, to the sample; judge the sample once it holds ``SAMPLE`` seconds.  Polling
        episodes are short (about one per update), so a sample spans many of them."""
        if w1 is None:
            return w0
        self._polled += polled
        self._waited += w1 - w0
        if self._polled >= SAMPLE:
            if self._waited >= CONTENDED * self._polled:
                self.backoff_until = time.perf_counter() + BACKOFF
                self.deadline = 0.0
                self.backoffs += 1
            self._polled = self._waited = 0.0
        return w1


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
    now = time.perf_counter()
    if now < p.backoff_until:
        return  # the cores are contended: polling would cost more than it saves
    until = now + seconds
    if until > p.deadline:
        p.deadline = until
    if p.parked:
        p.parked.unpark()


def acquire() -> _Poller | None:
    """Stop polling until the matching :func:`release` (both on the Trio thread): a job
    was handed to another thread, which needs the GIL that a polling loop keeps taking
    back from it (up to the interpreter's 5 ms switch interval each time).  Returns what
    to pass to ``release``; with no poller in this run (polling off) there is nothing to
    hold, and none is started."""
    try:
        p = _POLLER.get()
    except LookupError:
        return None
    p.holds += 1
    return p


def release(p: _Poller | None) -> None:
    """End an :func:`acquire`; polling resumes if its deadline is still ahead."""
    if p is None:
        return
    p.holds -= 1
    if p.holds == 0 and p.parked and time.perf_counter() < p.deadline:
        p.parked.unpark()


@contextmanager
def hold() -> Iterator[None]:
    """No polling while the block runs: wrap a wait for a job on another thread."""
    p = acquire()
    try:
        yield
    finally:
        release(p)
