"""The outbox: performs the machines' outputs with one rule — persist, then send, then
notify (DESIGN §4) — and shares fsyncs between everything that is ready (group commit).

Every machine step appends its outputs (:meth:`Outbox.emit`).  One task (:meth:`run`)
takes everything that is there, commits all store operations in one SQLite transaction
(inline for a lone operation when the loop is idle, else on a committer thread), then hands the
frames to each peer's writer, then wakes the waiting callers.  Pipelined updates on one
channel, and updates on many channels, share fsyncs this way.

Lock-step traffic takes a shortcut (:meth:`Outbox.flush_now`): the task that emitted a
lone update, about to wait anyway, does the same work itself when nothing else is
running, which saves a hop through the scheduler (~20-60 us here) on each of the
three commits of an update.  Its callers decide what is lock-step (``Client.update``,
``Inbound.on_idle``); pipelined traffic always goes through the flusher.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import outcome
import trio
import trio.lowlevel

from channel import busypoll, codec
from channel.errors import LocalProtocolError
from channel.links import Links
from channel.machine import (
    Output,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    PersistRevived,
    SendMessage,
)
from channel.store import Plan, Store, StoreOp

log = logging.getLogger("optichannel.outbox")

T = TypeVar("T")

#: A batch of up to this many store operations commits on the Trio thread when the loop
#: is otherwise idle (lock-step traffic: the thread hand-off would cost more than it
#: saves).  Anything else commits on the committer thread, so that the loop keeps working
#: (reading, verifying, signing) during the fsync.
INLINE_COMMIT_OPS = 2


#: Readers pause while this many store operations wait for the flusher (see ``pace``).
PACE_BACKLOG = 256

#: The WAL is checkpointed after this many commits: a commit writes a few WAL pages, so
#: the WAL stays at a few MB and is then written over from its start.  Not more often:
#: a checkpoint costs two fsyncs, and the store's next commit waits for it.
CHECKPOINT_EVERY_COMMITS = 500

#: States one transaction of ``prune_history`` deletes: it holds the store (every commit
#: waits) for a few milliseconds.
PRUNE_CHUNK = 1000

#: Committer threads per process.  Every store is served by one of them (so its commits
#: stay in order); a process with many clients (a test harness, a hub of counterparties)
#: shares a few threads instead of one per store, which would leave a hundred threads
#: queueing for the GIL.
COMMITTER_THREADS = 4


class _Worker:
    """A daemon thread that runs jobs (callables) from its queue, in order, forever."""

    def __init__(self, index: int) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._loop, name=f"optichannel-store-{index}", daemon=True
        )
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception:  # pragma: no cover - jobs catch their own errors
                log.exception("store job failed")


_workers: list[_Worker] = []
_workers_lock = threading.Lock()
_next_worker = 0


def _worker_for_new_store() -> _Worker:
    global _next_worker
    with _workers_lock:
        if len(_workers) < COMMITTER_THREADS:
            _workers.append(_Worker(len(_workers)))
        w = _workers[_next_worker % len(_workers)]
        _next_worker += 1
        return w


class Committer:
    """Commits a store's plans on a committer thread, one at a time, and checkpoints
    its WAL there between them, so that no commit pays for a checkpoint.

    ``trio.to_thread`` would do, but its thread cache often starts a fresh thread when
    the flusher hands over the next plan before the last worker went idle; a long-lived
    thread fed through a queue costs a wake-up per commit and nothing more.  A
    checkpoint runs on the thread while the loop goes on, but never beside a commit of
    its store (see ``_lock``): a lock-step commit that meets one goes to the thread and
    waits for it, and in pipelined traffic it delays one commit in 500, while the loop
    keeps filling the next batch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._worker = _worker_for_new_store()
        self._commits = 0  # since the last checkpoint was queued
        # Held by a commit or a checkpoint: a checkpoint never runs beside a commit of
        # its store, so it copies the whole WAL and the next commit starts it over.
        self._lock = threading.Lock()
        store.checkpoint_in_background()

    def _counted(self) -> None:
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY_COMMITS:
            self._commits = 0
            # No busy polling until the checkpoint is done: its thread needs the GIL.
            held = busypoll.acquire()
            token = trio.lowlevel.current_trio_token()

            def job() -> None:
                try:
                    self._checkpoint()
                finally:
                    with contextlib.suppress(trio.RunFinishedError):  # the run ended
                        token.run_sync_soon(busypoll.release, held)

            self._worker.jobs.put(job)

    def _checkpoint(self) -> None:
        try:
            with self._lock:
                self.store.checkpoint()
        except Exception:  # a failed checkpoint loses nothing: the WAL has it all
            log.exception("WAL checkpoint failed")

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    def try_commit_inline(self, plan: Plan) -> bool:
        """Commit ``plan`` on the calling (Trio) thread, blocking for the fsync, unless
        the committer thread is busy with this store (a checkpoint): then do nothing
        and return False, and the caller hands the plan over with :meth:`commit`."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.store.commit(plan)
        finally:
            self._lock.release()
        self._counted()
        return True

    async def commit(self, plan: Plan) -> None:
        """Commit ``plan`` on the committer thread; not abandoned on cancellation (the
        commit finishes, and its outcome is known, before this returns or raises)."""
        await self.call(functools.partial(self.store.commit, plan))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a write of the store's own) on the committer thread, between
        commits, and return its result; like :meth:`commit`, never abandoned."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def job() -> None:
            result = outcome.capture(self._locked, fn)
            with contextlib.suppress(trio.RunFinishedError):  # the run ended under us
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._worker.jobs.put(job)
        self._counted()
        with busypoll.hold():  # the thread needs the GIL that a polling loop holds
            result = await trio.lowlevel.wait_task_rescheduled(
                lambda _: trio.lowlevel.Abort.FAILED
            )
        return result  # type: ignore[no-any-return]

    def close(self) -> None:
        """Wait (briefly) until the thread has run every job of this store, so that the
        store can be closed under it."""
        done = threading.Event()
        self._worker.jobs.put(done.set)
        done.wait(timeout=10)


class Outbox:
    def __init__(
        self,
        store: Store,
        links: Links,
        *,
        on_note: Callable[[Output], None],
        on_durable: Callable[[PersistLatest], None],
        busy_poll: float = 0.0,
    ) -> None:
        self.store = store
        self.busy_poll = busy_poll  # seconds of polling after frames went out (busypoll)
        self.links = links
        self.on_note = on_note
        self.on_durable = on_durable
        self.ops: list[StoreOp] = []
        #: (peer, the link epoch the frame was made for, frame): see ``Links.queue``.
        self.sends: list[tuple[bytes, int, bytes]] = []
        self.notes: list[Output] = []
        self.wake = trio.Event()
        self.idle = trio.Event()
        self._pacers = trio.lowlevel.ParkingLot()  # tasks held by pace(), first come first
        self._last_batch_ops = 0  # store operations in the last commit
        self._committer: Committer | None = None  # while run() runs
        self._flushing = False  # the flusher holds a batch it took (until it is delivered)

    def emit(self, peer: bytes, outputs: Sequence[Output]) -> None:
        """Queue a machine step's outputs; ``peer`` is where its messages go."""
        if not outputs:
            return  # e.g. a proposal held for countersigning: nothing for the flusher
        epoch = self.links.epoch(peer)
        for out in outputs:
            if isinstance(
                out, PersistProposal | PersistLatest | PersistDropProposals | PersistRevived
            ):
                self.ops.append(out)
            elif isinstance(out, SendMessage):
                self.sends.append((peer, epoch, codec.encode(out.msg)))
            else:
                self.notes.append(out)
        self.wake.set()

    def add_op(self, op: StoreOp) -> None:
        """Queue a store operation of the client's own (a channel, a status)."""
        self.ops.append(op)
        self.wake.set()

    def add_send(self, peer: bytes, frame: bytes) -> None:
        """Queue a frame that depends on nothing durable (an ``Error``, a refusal)."""
        self.sends.append((peer, self.links.epoch(peer), frame))
        self.wake.set()

    async def pace(self) -> None:
        """Backpressure for readers and proposing callers: wait while PACE_BACKLOG store
        operations are queued and the flusher has not taken them.  Without it, a client
        with many links lets every reader work through its whole socket buffer, and every
        woken caller sign its next proposal, before anything is committed and answered:
        the two sides of a busy link end up taking turns.  A take wakes the first
        PACE_BACKLOG waiters only (each adds an operation or a few), not all of them:
        with 1,600 callers waiting, waking all at every take cost ~7% of the CPU."""
        while len(self.ops) >= PACE_BACKLOG:
            await self._pacers.park()

    def busy(self) -> bool:
        """Something is queued, or taken by the flusher and not yet delivered."""
        return bool(self.ops or self.sends or self.notes or self._flushing)

    async def run(self) -> None:
        """The flusher: forever, persist then send then notify whatever is queued."""
        committer = self._committer = Committer(self.store)
        try:
            await self._run(committer)
        finally:
            self._committer = None
            committer.close()

    async def _run(self, committer: Committer) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            ops, sends, notes = self._take()
            self._flushing = True
            try:
                if ops:
                    # Persist, then send: nothing below leaves before this fsync returns.
                    # The plan (encoding, checks) is built here; the committer thread
                    # then only runs SQL, so it seldom holds the GIL the loop needs.
                    plan = self.store.prepare(ops)
                    if not (
                        len(ops) <= INLINE_COMMIT_OPS
                        and trio.lowlevel.current_statistics().tasks_runnable
                        <= busypoll.runnable()
                        and committer.try_commit_inline(plan)
                    ):
                        await committer.commit(plan)
                self._deliver(ops, sends, notes)
            finally:
                self._flushing = False
            self._note_idle()

    def flush_now(self) -> None:
        """The lock-step shortcut: commit and deliver what is queued on the calling task,
        as the flusher would, if it is a lone update (at most ``INLINE_COMMIT_OPS``
        store operations), the flusher holds no batch, and no other task is ready to run
        (the flusher, woken by the emit, aside).  Otherwise, or if the commit cannot
        run inline (a checkpoint holds the store), leave it all to the flusher.  Call it
        right before the task waits.  Same rule: persist, then send, then notify.

        Only in lock-step traffic, where the last commit was a lone update too: this
        check runs before the scheduler has polled the sockets, so with many busy links it
        would not see the peers whose frames are waiting, and an fsync on the loop thread
        would hold them all up (3% of a 100-channel maker's time went there)."""
        committer = self._committer
        if (
            committer is None
            or self._flushing
            or not self.ops
            or len(self.ops) > INLINE_COMMIT_OPS
            or self._last_batch_ops > INLINE_COMMIT_OPS
            or trio.lowlevel.current_statistics().tasks_runnable > 1 + busypoll.runnable()
        ):
            return
        commits = self.store.commits
        try:
            plan = self.store.prepare(self.ops)
            if not committer.try_commit_inline(plan):
                return
        except BaseException as exc:
            if self.store.commits != commits:
                # The commit stood, and something (a KeyboardInterrupt) came right after
                # it: the batch is durable, so it goes out now and is not committed again.
                self._deliver(*self._take())
                raise
            if not isinstance(exc, Exception):
                raise
            # Nothing was taken and the transaction rolled back: the flusher meets the
            # same error with everything still queued, as without the shortcut.
            self.wake.set()
            return
        self._deliver(*self._take())
        self._note_idle()

    def _take(
        self,
    ) -> tuple[list[StoreOp], list[tuple[bytes, int, bytes]], list[Output]]:
        taken = self.ops, self.sends, self.notes
        self.ops, self.sends, self.notes = [], [], []
        if taken[0]:
            self._last_batch_ops = len(taken[0])
        self._pacers.unpark(count=PACE_BACKLOG)
        return taken

    def _deliver(
        self, ops: list[StoreOp], sends: list[tuple[bytes, int, bytes]], notes: list[Output]
    ) -> None:
        """After the commit of ``ops``: hand the frames to the peers' writers, then wake
        the callers."""
        by_link: dict[tuple[bytes, int], list[bytes]] = {}
        for peer, epoch, frame in sends:
            by_link.setdefault((peer, epoch), []).append(frame)
        for (node_id, epoch), frames in by_link.items():
            # Offline, stalled or reconnected since: the reconnect Sync carries
            # everything that matters.
            self.links.queue(node_id, frames, epoch=epoch)
        if sends:
            busypoll.extend(self.busy_poll)  # the peer's answer is on its way soon
        for note in notes:
            self.on_note(note)
        for op in ops:
            if isinstance(op, PersistLatest):
                self.on_durable(op)

    def _note_idle(self) -> None:
        if not self.busy():
            self.idle.set()

    async def prune_history(self, channel_ids: Sequence[bytes]) -> int:
        """Delete the history of ``channel_ids`` (``Store.prune_history``) on the committer
        thread, between commits, ``PRUNE_CHUNK`` states a transaction, each followed by a
        checkpoint so that the WAL never holds more than one chunk's pages; how many
        states went.  Raises ``LocalProtocolError`` if the flusher is not running."""
        if self._committer is None:
            raise LocalProtocolError("the client is not running")
        store, total = self.store, 0

        def chunk(cid: bytes) -> int:
            n = store.prune_history(cid, limit=PRUNE_CHUNK)
            if n:
                store.checkpoint()
            return n

        for cid in channel_ids:
            while True:
                n = await self._committer.call(functools.partial(chunk, cid))
                total += n
                if n < PRUNE_CHUNK:
                    break
        return total

    async def drain(self) -> None:
        """Wait until everything queued so far is durable and handed to the sockets."""
        while self.busy():
            if self.idle.is_set():
                self.idle = trio.Event()
            self.wake.set()
            await self.idle.wait()
