"""Busy polling (channel.busypoll): the loop polls for as long as it was asked to after
frames went out, then parks; never while a job waits on another thread; not at all when
it is off.  Real time (the poller's budget is ``time.perf_counter``), real sockets."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from test_client import _open

from channel import busypoll
from channel.client import open_client
from channel.keys import Signer
from channel.state import ETH

#: Polling windows in these tests are long against the sleeps inside them: on a loaded
#: machine a ``trio.sleep(0.02)`` can take tens of milliseconds more, and a window that
#: short ran out before the assertion that it was still open.
WINDOW = 0.3


@pytest.fixture(autouse=True)
def _no_contention_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The contention guard stops polling when the cores are busy, which a loaded CI
    machine can make them at any moment; it has a test of its own (``contended``), and
    the others judge polling without it."""
    if "contended" not in request.node.name:
        monkeypatch.setattr(busypoll, "CONTENDED", float("inf"))


def _polling() -> bool:
    """The poller exists and is looping (not parked)."""
    try:
        p = busypoll._POLLER.get()
    except LookupError:
        return False
    return p.parked.statistics().tasks_waiting == 0


def _blocking_waits() -> int:
    """Voluntary context switches of this thread so far: each is a wait that blocked
    (in ``epoll_wait``, an fsync, a lock), which a polling loop never does."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


async def test_the_loop_polls_until_the_deadline_then_parks() -> None:
    busypoll.extend(WINDOW)
    await trio.lowlevel.checkpoint()
    assert _polling()
    await trio.sleep(0.02)
    assert _polling(), "parked before its deadline"
    await trio.sleep(WINDOW + 0.05)
    assert not _polling(), "still polling after its deadline"


async def test_a_later_deadline_extends_polling_and_an_earlier_one_does_not_cut_it() -> None:
    busypoll.extend(WINDOW)
    busypoll.extend(0.001)  # must not shorten the window asked for first
    await trio.sleep(0.03)
    assert _polling()
    await trio.sleep(WINDOW + 0.05)
    assert not _polling()


async def test_zero_or_less_never_polls() -> None:
    busypoll.extend(0)
    busypoll.extend(-1.0)
    await trio.lowlevel.checkpoint()
    assert not _polling()


async def test_no_polling_while_a_job_waits_on_another_thread() -> None:
    """The job's thread needs the GIL, which a polling loop keeps taking back; polling
    resumes when the wait ends, if its deadline is still ahead.  With no poller in the
    run (polling off), a hold starts none."""
    with busypoll.hold():
        pass
    assert busypoll.runnable() == 0 and not _polling()
    with pytest.raises(LookupError):
        busypoll._POLLER.get()
    busypoll.extend(0.001)
    await trio.sleep(0.01)
    with busypoll.hold():
        busypoll.extend(WINDOW)
        await trio.sleep(0.005)
        assert not _polling(), "polled while a thread needed the GIL"
    await trio.lowlevel.checkpoint()
    assert _polling()
    await trio.sleep(WINDOW + 0.05)
    with busypoll.hold():
        pass
    await trio.lowlevel.checkpoint()
    assert not _polling(), "a hold that ended after the deadline restarted polling"


async def test_while_polling_the_loop_never_blocks_and_a_frame_wakes_its_reader() -> None:
    """The point of it all: with the poller looping, the scheduler polls with a zero
    timeout instead of sleeping in ``epoll_wait``, and a reader on a real socket is still
    woken by its data; parked, the same wait blocks."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got = trio.Event()

    async def reader() -> None:
        await a.recv(1)
        got.set()

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.002)
            assert not _polling()
            before = _blocking_waits()
            await trio.sleep(0.02)
            assert _blocking_waits() > before, "a parked poller's loop should block"

            busypoll.extend(WINDOW)
            await trio.lowlevel.checkpoint()
            before = _blocking_waits()
            await trio.sleep(0.02)
            await b.send(b"x")
            with trio.fail_after(1):
                await got.wait()
            assert _blocking_waits() == before, "the loop blocked while polling"
            assert _polling()


async def test_clients_poll_after_they_send_and_not_at_all_with_busy_poll_zero(
    tmp_path: Path,
) -> None:
    """Two clients in one run share one poller; with ``busy_poll=0`` (the default) a pay
    never starts it; asked to poll, it polls once frames went out, and parks when idle."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(alice_key, tmp_path / "a.sqlite", busy_poll=0) as alice,
        open_client(bob_key, tmp_path / "b.sqlite", busy_poll=0) as bob,
    ):
        cid = await _open(alice, bob, 100)
        for _ in range(3):
            await alice.pay(cid, ETH, 1)
        try:
            busypoll._POLLER.get()
            started = True
        except LookupError:
            started = False
        assert not started, "busy_poll=0 started the poller"
    async with (
        open_client(alice_key, tmp_path / "a.sqlite", busy_poll=WINDOW) as alice,
        open_client(bob_key, tmp_path / "b.sqlite", busy_poll=WINDOW) as bob,
    ):
        await alice.connect(bob.peer_address())
        signed = await alice.pay(cid, ETH, 1)
        assert signed.state.allocations[0].balances == (96, 104)
        assert _polling()
        await trio.sleep(WINDOW + 0.1)
        assert not _polling()


async def test_runnable_counts_the_poller_only_while_it_loops() -> None:
    """What the outbox subtracts when it asks whether the loop is otherwise idle (its
    lock-step shortcut commits on the loop only then)."""
    assert busypoll.runnable() == 0
    busypoll.extend(WINDOW)
    await trio.lowlevel.checkpoint()
    for _ in range(50):
        # The outbox's idle test holds while the poller loops and nothing else runs (the
        # poller is either queued, and counted, or still in the scheduler's batch).
        assert busypoll.runnable() == 1
        assert trio.lowlevel.current_statistics().tasks_runnable <= busypoll.runnable()
        await trio.lowlevel.checkpoint()
    await trio.sleep(WINDOW + 0.05)
    assert busypoll.runnable() == 0
    assert trio.lowlevel.current_statistics().tasks_runnable == 0


async def test_contended_cores_stop_polling_for_a_while() -> None:
    """A sample of polling in which the thread waited for a CPU for CONTENDED of the time
    or more stops polling for BACKOFF seconds: asked to poll meanwhile, the loop blocks
    as if polling were off.  Below that share, polling goes on."""
    p = busypoll._poller()
    quiet = busypoll.SAMPLE * (busypoll.CONTENDED / 2)
    p._account(busypoll.SAMPLE, 0.0, quiet)
    assert p.backoffs == 0
    busypoll.extend(0.05)
    await trio.lowlevel.checkpoint()
    assert _polling()
    # Several short episodes make one sample; together they waited too long.
    for _ in range(4):
        p._account(busypoll.SAMPLE / 4, 1.0, 1.0 + busypoll.SAMPLE / 4 * busypoll.CONTENDED)
    assert p.backoffs == 1
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()
    assert not _polling()
    busypoll.extend(0.05)
    await trio.lowlevel.checkpoint()
    assert not _polling(), "polled again during the back-off"
    p.backoff_until = 0.0  # the back-off is over
    busypoll.extend(0.05)
    await trio.lowlevel.checkpoint()
    assert _polling()


def test_the_run_queue_wait_is_read_from_the_kernel() -> None:
    """The contention guard's input on Linux: seconds this thread waited for a CPU, which
    never decreases."""
    waited = busypoll._RunQueueWait()
    first = waited()
    assert first is not None and first >= 0.0
    sum(range(200_000))
    second = waited()
    assert second is not None and second >= first
