"""The committer thread against a real SQLite store: results, errors, cancellation,
and checkpoints between commits."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from channel.errors import StoreError
from channel.keys import Signer
from channel.links import Links
from channel.machine import PersistLatest, PersistProposal
from channel.outbox import CHECKPOINT_EVERY_COMMITS, PACE_BACKLOG, Committer, Outbox
from channel.state import ETH, Params, SignedState, State
from channel.store import PersistChannel, PersistStatus, Store

ALICE = Signer.from_bytes(b"\x01" * 32)  # test-only keys
BOB = Signer.from_bytes(b"\x02" * 32)


def _setup(path: Path) -> tuple[Store, Params, State]:
    store = Store(path, owner=ALICE.address)
    params = Params.new(
        chain_id=31337,
        adjudicator=b"\xad" * 20,
        participants=(ALICE.address, BOB.address),
        challenge_duration=3600,
    )
    v0 = State.initial(params, [(ETH, 100, 100)])
    sig = b"\x11" * 65  # the store does not verify signatures: the machine did
    store.apply(
        [
            PersistChannel(params=params, me=0, peer_node_id=BOB.node_id),
            PersistLatest(params=params, signed=SignedState(state=v0, signatures=(sig, sig))),
        ]
    )
    return store, params, v0


def _proposal(params: Params, base: State, version: int) -> PersistProposal:
    state = State(channel_id=base.channel_id, version=version, allocations=base.allocations)
    return PersistProposal(
        params=params, me=0, base_version=version - 1, state=state, signature=b"\x22" * 65
    )


@attrs.frozen
class Rig:
    path: Path
    store: Store
    params: Params
    v0: State
    committer: Committer

    async def propose(self, *versions: int) -> None:
        """Commit our proposals at ``versions`` (one plan) through the committer."""
        plan = self.store.prepare([_proposal(self.params, self.v0, v) for v in versions])
        await self.committer.commit(plan)


def _in_flight(store: Store) -> list[int]:
    (rec,) = store.load()
    return [f.proposal.state.version for f in rec.in_flight]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    path = tmp_path / "s.sqlite"
    store, params, v0 = _setup(path)
    committer = Committer(store)
    yield Rig(path=path, store=store, params=params, v0=v0, committer=committer)
    committer.close()
    store.close()


async def test_commit_in_the_thread_is_durable_when_it_returns(rig: Rig) -> None:
    """After `await commit(plan)` the rows are in the file (read by a fresh connection)."""
    await rig.propose(1)
    other = Store(rig.path, owner=ALICE.address)
    try:
        assert _in_flight(other) == [1]
    finally:
        other.close()


async def test_a_failing_commit_raises_in_the_caller_and_rolls_back(rig: Rig) -> None:
    """A plan that breaks rule S raises StoreError in the awaiting task; the thread lives
    on and commits the next plan."""
    await rig.propose(1)
    with pytest.raises(StoreError, match="already signed"):
        await rig.propose(2, 1)
    await rig.propose(2)
    assert _in_flight(rig.store) == [1, 2]


async def test_cancelling_the_waiter_does_not_abandon_a_commit(rig: Rig) -> None:
    """A commit in progress finishes (and is durable) even if the awaiting task is
    cancelled: cancellation is delivered only after the commit is known."""
    with trio.CancelScope() as scope:
        scope.cancel()  # already cancelled when the commit is handed over
        await rig.propose(1)
        await trio.lowlevel.checkpoint()  # ... and the cancellation arrives after it
    assert scope.cancelled_caught
    assert _in_flight(rig.store) == [1]


async def test_checkpoints_run_between_commits(rig: Rig) -> None:
    """Commits never checkpoint (the database file stays as it was) until the committer
    queues its checkpoint after CHECKPOINT_EVERY_COMMITS commits."""
    size = rig.path.stat().st_size
    for v in range(1, CHECKPOINT_EVERY_COMMITS):
        await rig.propose(v)
    assert rig.path.stat().st_size == size  # everything is still in the WAL
    await rig.propose(CHECKPOINT_EVERY_COMMITS)
    rig.committer.close()  # waits until the thread ran this store's jobs: the checkpoint too
    assert rig.path.stat().st_size > size


async def test_readers_pause_while_the_flusher_is_behind(tmp_path: Path) -> None:
    """With PACE_BACKLOG store operations queued, pace() waits until the flusher has
    taken them (and then returns); below that it returns at once."""
    store, params, _ = _setup(tmp_path / "s.sqlite")
    links = Links(ALICE, on_frame=lambda n, f: True, on_connected=lambda n: None, timeout=1.0)
    outbox = Outbox(store, links, on_note=lambda n: None, on_durable=lambda op: None)
    with trio.fail_after(5):
        await outbox.pace()  # nothing queued: no wait
    for _ in range(PACE_BACKLOG):
        outbox.add_op(PersistStatus(channel_id=params.channel_id, status="open"))
    resumed = trio.Event()

    async def reader() -> None:
        await outbox.pace()
        resumed.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not resumed.is_set()
            nursery.start_soon(outbox.run)
            with trio.fail_after(5):
                await resumed.wait()
                await outbox.drain()
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_paced_tasks_woken_by_one_take_add_about_one_backlog(tmp_path: Path) -> None:
    """Tasks held by pace() that one take of the flusher wakes re-check the backlog: the
    first ones fill it again and the rest keep waiting for the next take (so one
    scheduler batch adds about PACE_BACKLOG operations, not one per waiting task)."""
    store, params, _ = _setup(tmp_path / "s.sqlite")
    links = Links(ALICE, on_frame=lambda n, f: True, on_connected=lambda n: None, timeout=1.0)
    outbox = Outbox(store, links, on_note=lambda n: None, on_durable=lambda op: None)
    op = PersistStatus(channel_id=params.channel_id, status="open")
    for _ in range(PACE_BACKLOG):
        outbox.add_op(op)
    passed = 0

    async def caller() -> None:
        nonlocal passed
        await outbox.pace()
        passed += 1
        for _ in range(PACE_BACKLOG // 2):  # each caller's proposals
            outbox.add_op(op)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            assert passed == 0
            outbox._take()  # the flusher takes the queue ...
            await trio.testing.wait_all_tasks_blocked()
            assert passed == 2  # ... two callers refill it, four wait for the next take
            assert len(outbox.ops) == PACE_BACKLOG
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_the_wal_stays_bounded_with_inline_and_threaded_commits(rig: Rig) -> None:
    """Checkpoints never run beside a commit of their store, so each one copies the
    whole WAL and the WAL is written over instead of growing: after three more
    checkpoint periods of mixed inline and committer-thread commits it has grown by a
    little (the tables are deeper), not to four times its size."""
    wal = rig.path.with_name(rig.path.name + "-wal")
    version = 0

    async def period() -> None:
        nonlocal version
        for _ in range(CHECKPOINT_EVERY_COMMITS // 2):
            version += 1
            plan = rig.store.prepare([_proposal(rig.params, rig.v0, version)])
            if not rig.committer.try_commit_inline(plan):
                await rig.committer.commit(plan)
            version += 1
            await rig.propose(version)

    await period()
    version += 1
    await rig.propose(version)  # the first commit after the checkpoint: a new WAL
    first = wal.stat().st_size
    for _ in range(3):
        await period()
    assert wal.stat().st_size < 1.5 * first
    assert _in_flight(rig.store) == list(range(1, version + 1))


async def test_an_inline_commit_defers_to_a_running_checkpoint(rig: Rig) -> None:
    """While the committer thread holds the store (a checkpoint), try_commit_inline does
    nothing and says so; the plan then commits through the thread."""
    plan = rig.store.prepare([_proposal(rig.params, rig.v0, 1)])
    with rig.committer._lock:
        assert rig.committer.try_commit_inline(plan) is False
    assert _in_flight(rig.store) == []
    assert rig.committer.try_commit_inline(plan) is True
    assert _in_flight(rig.store) == [1]


async def test_a_checkpoint_waits_for_the_commit_in_progress(rig: Rig) -> None:
    """A checkpoint queued while a commit of its store is in progress (here an inline
    one, held open mid-transaction) runs only after that commit."""
    await rig.propose(1)
    entered, release = threading.Event(), threading.Event()

    def held_open(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(5)

    plan = rig.store.prepare([_proposal(rig.params, rig.v0, 2)])
    plan.steps.insert(0, held_open)
    committing = threading.Thread(target=rig.committer.try_commit_inline, args=(plan,))
    committing.start()
    assert entered.wait(5)
    checkpointed = threading.Event()
    rig.committer._worker.jobs.put(rig.committer._checkpoint)
    rig.committer._worker.jobs.put(checkpointed.set)
    assert not checkpointed.wait(0.3)  # the checkpoint waits for the commit
    release.set()
    committing.join(5)
    assert checkpointed.wait(5)
    assert _in_flight(rig.store) == [1, 2]


@attrs.define
class Flushing:
    """An outbox whose flusher runs; records what it delivered and when."""

    outbox: Outbox
    params: Params
    v0: State
    store: Store
    notes: list[object] = attrs.Factory(list)
    durable: list[int] = attrs.Factory(list)

    def propose(self, version: int) -> None:
        self.outbox.emit(BOB.node_id, [_proposal(self.params, self.v0, version)])


@pytest.fixture
async def flushing(tmp_path: Path) -> Iterator[Flushing]:  # type: ignore[misc]
    store, params, v0 = _setup(tmp_path / "s.sqlite")
    links = Links(ALICE, on_frame=lambda n, f: True, on_connected=lambda n: None, timeout=1.0)
    rig = Flushing(outbox=None, params=params, v0=v0, store=store)  # type: ignore[arg-type]
    rig.outbox = Outbox(
        store,
        links,
        on_note=rig.notes.append,
        on_durable=lambda op: rig.durable.append(op.signed.state.version),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.outbox.run)
        await trio.testing.wait_all_tasks_blocked()
        yield rig
        nursery.cancel_scope.cancel()
    store.close()


async def test_flush_now_commits_a_lone_update_on_the_calling_task(flushing: Flushing) -> None:
    """With the flusher idle and nothing else to run, flush_now commits the lone update
    and delivers its results before it returns: no pass through the scheduler."""
    flushing.propose(1)
    flushing.outbox.add_send(BOB.node_id, b"frame")  # peer offline: dropped, as by the flusher
    flushing.outbox.emit(BOB.node_id, [object()])  # type: ignore[list-item]  # a note
    flushing.outbox.flush_now()
    assert _in_flight(flushing.store) == [1]
    assert len(flushing.notes) == 1 and not flushing.outbox.busy()
    assert flushing.outbox.idle.is_set()


async def test_flush_now_leaves_batches_and_busy_loops_to_the_flusher(
    flushing: Flushing,
) -> None:
    """More than INLINE_COMMIT_OPS operations, a lone update right after a batch (the
    loop may have sockets to read), or another task ready to run: flush_now does nothing
    and the flusher commits it, in order.  Once the traffic is lone updates again, it
    commits them itself."""
    for v in (1, 2, 3):
        flushing.propose(v)
    flushing.outbox.flush_now()
    assert _in_flight(flushing.store) == []  # three operations: a batch for the flusher
    await flushing.outbox.drain()
    assert _in_flight(flushing.store) == [1, 2, 3]
    flushing.propose(4)
    flushing.outbox.flush_now()
    assert _in_flight(flushing.store) == [1, 2, 3]  # the last commit was a batch
    await flushing.outbox.drain()

    async def busy() -> None:
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        nursery.start_soon(busy)
        flushing.propose(5)
        flushing.outbox.flush_now()  # two tasks ready to run (and the flusher)
        assert _in_flight(flushing.store) == [1, 2, 3, 4]
    await flushing.outbox.drain()
    flushing.propose(6)
    flushing.outbox.flush_now()  # lock-step again, and nothing else to run
    assert _in_flight(flushing.store) == [1, 2, 3, 4, 5, 6]


async def test_flush_now_leaves_a_failing_update_queued_for_the_flusher(tmp_path: Path) -> None:
    """An update whose plan fails (rule S) is not taken by flush_now: it stays queued, and
    the flusher meets the error, as without the shortcut."""
    store, params, v0 = _setup(tmp_path / "s.sqlite")
    links = Links(ALICE, on_frame=lambda n, f: True, on_connected=lambda n: None, timeout=1.0)
    outbox = Outbox(store, links, on_note=lambda n: None, on_durable=lambda op: None)
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(StoreError, match="already signed")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                await trio.testing.wait_all_tasks_blocked()
                outbox.emit(BOB.node_id, [_proposal(params, v0, 1)])
                outbox.flush_now()
                assert _in_flight(store) == [1]
                outbox.emit(BOB.node_id, [_proposal(params, v0, 1)])  # signed before
                outbox.flush_now()
                assert len(outbox.ops) == 1  # still queued
                await trio.sleep_forever()  # the flusher raises
    finally:
        store.close()


async def test_drain_waits_for_a_batch_the_flusher_is_still_committing(
    flushing: Flushing, tmp_path: Path
) -> None:
    """Once the flusher has taken a batch nothing is queued, but the batch is not durable
    until its commit returns: drain() waits for that too (a fresh connection, which sees
    only what was committed, finds every row)."""
    for v in (1, 2, 3):
        flushing.propose(v)
    await trio.testing.wait_all_tasks_blocked()  # taken: the committer thread has it
    assert not flushing.outbox.ops and flushing.outbox.busy()
    await flushing.outbox.drain()
    fresh = Store(flushing.store.path, owner=ALICE.address)
    try:
        assert _in_flight(fresh) == [1, 2, 3]
    finally:
        fresh.close()
