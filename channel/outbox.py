"""The outbox: performs the machines' outputs with one rule — persist, then send, then
notify (DESIGN §4) — and shares fsyncs between everything that is ready (group commit).

Every machine step appends its outputs (:meth:`Outbox.emit`).  One task (:meth:`run`)
takes everything that is there, commits all store operations in one SQLite transaction
(on the Trio thread for a small batch, in a worker thread otherwise), then hands the
frames to each peer's writer, then wakes the waiting callers.  Pipelined updates on one
channel, and updates on many channels, share fsyncs this way.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio
import trio.lowlevel

from channel import codec
from channel.links import Links
from channel.machine import (
    Output,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    SendMessage,
)
from channel.store import Plan, Store, StoreOp

log = logging.getLogger("optichannel.outbox")

#: A batch of up to this many store operations commits on the Trio thread when the loop
#: is otherwise idle (lock-step traffic: the thread hand-off would cost more than it
#: saves).  Anything else commits in a worker thread, so that the loop keeps working
#: (reading, verifying, signing) during the fsync.
INLINE_COMMIT_OPS = 2


#: The WAL is checkpointed after this many commits (a commit writes a few WAL pages;
#: SQLite's own automatic checkpoint would run every 1000 pages).
CHECKPOINT_EVERY_COMMITS = 250

_CHECKPOINT = object()  # a job for the committer thread: checkpoint the WAL


class Committer:
    """One long-lived thread per store that commits plans, one at a time, and
    checkpoints the WAL between them, so that no commit pays for a checkpoint.

    ``trio.to_thread`` would do, but its thread cache often starts a fresh thread when
    the flusher hands over the next plan before the last worker went idle; one thread
    fed through a queue costs a wake-up per commit and nothing more.  A checkpoint runs
    on the thread while the loop goes on: beside lock-step traffic (whose small commits
    run inline on the loop) it costs nothing; in pipelined traffic it delays one commit
    in 250, while the loop keeps filling the next batch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._commits = 0  # since the last checkpoint was queued
        store.checkpoint_in_background()

    def _submit(self, job: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="optichannel-store", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    def _counted(self) -> None:
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY_COMMITS:
            self._commits = 0
            self._submit(_CHECKPOINT)

    def commit_inline(self, plan: Plan) -> None:
        """Commit ``plan`` on the calling (Trio) thread: blocks for the fsync."""
        self.store.commit(plan)
        self._counted()

    async def commit(self, plan: Plan) -> None:
        """Commit ``plan`` in the thread; not abandoned on cancellation (a commit that
        started finishes, and its outcome is known, before this returns or raises)."""
        self._submit((plan, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        self._counted()
        result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job is _CHECKPOINT:
                try:
                    self.store.checkpoint()
                except Exception:  # a failed checkpoint loses nothing: the WAL has it all
                    log.exception("WAL checkpoint failed")
                continue
            plan, token, task = job
            result = outcome.capture(self.store.commit, plan)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # pragma: no cover - the run ended under us
                return


class Outbox:
    def __init__(
        self,
        store: Store,
        links: Links,
        *,
        on_note: Callable[[Output], None],
        on_durable: Callable[[PersistLatest], None],
    ) -> None:
        self.store = store
        self.links = links
        self.on_note = on_note
        self.on_durable = on_durable
        self.ops: list[StoreOp] = []
        self.sends: list[tuple[bytes, bytes]] = []
        self.notes: list[Output] = []
        self.wake = trio.Event()
        self.idle = trio.Event()

    def emit(self, peer: bytes, outputs: Sequence[Output]) -> None:
        """Queue a machine step's outputs; ``peer`` is where its messages go."""
        for out in outputs:
            if isinstance(out, PersistProposal | PersistLatest | PersistDropProposals):
                self.ops.append(out)
            elif isinstance(out, SendMessage):
                self.sends.append((peer, codec.encode(out.msg)))
            else:
                self.notes.append(out)
        self.wake.set()

    def add_op(self, op: StoreOp) -> None:
        """Queue a store operation of the client's own (a channel, a status)."""
        self.ops.append(op)
        self.wake.set()

    def add_send(self, peer: bytes, frame: bytes) -> None:
        """Queue a frame that depends on nothing durable (an ``Error``, a refusal)."""
        self.sends.append((peer, frame))
        self.wake.set()

    def busy(self) -> bool:
        return bool(self.ops or self.sends or self.notes)

    async def run(self) -> None:
        """The flusher: forever, persist then send then notify whatever is queued."""
        committer = Committer(self.store)
        try:
            await self._run(committer)
        finally:
            committer.close()

    async def _run(self, committer: Committer) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            ops, sends, notes = self.ops, self.sends, self.notes
            self.ops, self.sends, self.notes = [], [], []
            if ops:
                # Persist, then send: nothing below leaves before this fsync returns.
                # The plan (encoding, checks) is built here; the worker thread then
                # only runs SQL, so it seldom holds the GIL the loop needs.
                plan = self.store.prepare(ops)
                if (
                    len(ops) <= INLINE_COMMIT_OPS
                    and trio.lowlevel.current_statistics().tasks_runnable == 0
                ):
                    committer.commit_inline(plan)
                else:
                    await committer.commit(plan)
            by_peer: dict[bytes, list[bytes]] = {}
            for peer, frame in sends:
                by_peer.setdefault(peer, []).append(frame)
            for node_id, frames in by_peer.items():
                # Offline or stalled: the reconnect Sync carries everything that matters.
                await self.links.queue(node_id, frames)
            for note in notes:
                self.on_note(note)
            for op in ops:
                if isinstance(op, PersistLatest):
                    self.on_durable(op)
            if not self.busy():
                self.idle.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is durable and handed to the sockets."""
        while self.busy():
            if self.idle.is_set():
                self.idle = trio.Event()
            self.wake.set()
            await self.idle.wait()
