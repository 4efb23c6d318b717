"""The update lane of one channel: the line of updates waiting for window room, and the
turn-taking after a conflict.

A market maker's trading tasks call ``Client.update`` far faster than one channel can
co-sign: at most ``window`` proposals are in flight, and the rest wait here in line,
first come first served.  When a proposal resolves (or an ``Accept`` frees its slot),
the client proposes the next update in line at once, on the task that saw the slot
free up (:meth:`Lane.pump`) — the waiting caller is woken only when its update is
co-signed, so a pipelined update costs its caller one task switch, not three.

Turn-taking (see docs/protocol.md): after both sides proposed at once, the winner
(lower address) gives the peer one turn — its burst, until a quiet gap — before
proposing again (:meth:`Lane.give_turn`), and the loser waits for such a gap before
retrying (:meth:`Lane.quiet_gap`).  An update that must take this careful path is
handed back to its caller (``Waiter.go``) rather than proposed by the pump.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

import attrs
import trio

from channel.machine import ChannelMachine, NotifyAccepted, NotifyRejected
from channel.state import Allocation, SignedState, State

#: Channel statuses: waiting for on-chain funding, usable, final state agreed, concluded.
FUNDING, OPEN, CLOSING, CLOSED = "funding", "open", "closing", "closed"
STATUSES = (FUNDING, OPEN, CLOSING, CLOSED)

#: How a party refuses a proposal on a channel it still waits to see funded on chain.  Each
#: party's ``channel.onchain.fund`` sees the deposits confirmed at its own poll, so the
#: peer may lag us by one poll: a proposer refused so retries every ``FUNDING_RETRY`` s
#: until its ``update_timeout``, instead of failing a pay made right after ``fund``.
FUNDING_REFUSAL = "channel is funding"
FUNDING_RETRY = 0.05

#: After a conflict the yielding party waits for this long a gap in the peer's proposals.
YIELD_QUIET = 0.005
#: After winning a conflict, the longest a party waits for the peer to take its turn.
YIELD_HOLD = 0.05
#: After a conflict a lane proposes at most this many updates at once, and then one more
#: for each of its proposals co-signed, back up to the full window.  When both sides
#: keep a channel busy, every conflict burns the loser's whole window (and the winner's
#: proposals that collide with it): a full window of 256 each way kept them burning
#: versions for seconds, a small one settles in milliseconds.
CONFLICT_WINDOW = 16


@attrs.frozen(kw_only=True)
class Update:
    """What a proposal changes: the result of an update function."""

    allocations: tuple[Allocation, ...]
    app_data: bytes = b""
    is_final: bool = False


UpdateFn: TypeAlias = Callable[[State], Update]


class Waiter:
    """One update: waiting in line for window room (``fn`` set), then in flight."""

    __slots__ = (
        "cancelled",
        "deadline",
        "error",
        "event",
        "fn",
        "go",
        "result",
        "stalled",
        "timed_out",
        "uid",
    )

    def __init__(self, deadline: float, fn: UpdateFn | None = None, uid: int = 0) -> None:
        self.uid = uid  # the update's id: a retry keeps it (``channel.machine``, "Burned")
        self.deadline = deadline
        self.event = trio.Event()
        self.fn = fn
        self.result: NotifyAccepted | NotifyRejected | None = None
        self.error: Exception | None = None  # raised by fn or the machine when proposing
        self.go = False  # handed the turn: the caller proposes itself (the careful path)
        self.stalled = False  # waited update_timeout in line with no progress at all
        self.timed_out = False  # proposed, but no answer within update_timeout
        self.cancelled = False  # the caller went away while in line


class Lane:
    """One channel as the client drives it: its machine, status and line of updates."""

    def __init__(
        self,
        machine: ChannelMachine,
        peer_node_id: bytes,
        peer_addr: str | None,
        status: str = OPEN,
    ) -> None:
        self.machine = machine
        self.status = status
        self.peer_node_id = peer_node_id
        self.peer_addr = peer_addr
        self.durable: SignedState | None = machine.latest
        self.queue: deque[Waiter] = deque()
        self.last_progress = trio.current_time()  # when a proposal of ours last resolved
        self.last_incoming = -math.inf  # trio time of the last proposal we accepted
        self.conflict_at = -math.inf  # trio time of the last conflict we saw
        self.turn_given_at = -math.inf  # the conflict after which we last gave a turn
        self.incoming = trio.Event()  # set (and replaced) whenever we accept a proposal
        self.full_window = machine.window

    # -- the window ---------------------------------------------------------

    def note_conflict(self) -> None:
        """Both sides proposed at once: narrow the window (see ``CONFLICT_WINDOW``)."""
        self.machine.window = min(self.machine.window, CONFLICT_WINDOW)

    def note_accepted(self) -> None:
        """A proposal of ours is co-signed: widen the window by one, up to the full one."""
        if self.machine.window < self.full_window:
            self.machine.window += 1

    # -- the line -----------------------------------------------------------

    def pump(self, propose: Callable[[Waiter], None]) -> None:
        """Propose the updates in line while the window has room (group commit then
        takes them all at once).  An update that needs the careful path (turn-taking
        after a conflict, or the channel is no longer open) is handed back to its
        caller instead, and the line stops there until that one resolves."""
        m = self.machine
        while self.queue and m.is_open and not m.window_full():
            w = self.queue.popleft()
            if w.cancelled:
                continue
            if self.status != OPEN or self.held():
                w.go = True
                w.event.set()
                return
            propose(w)

    def expire_line(self, now: float, timeout: float) -> None:
        """Waiting in line is not a timeout; waiting ``timeout`` with no proposal of the
        channel resolved in that time is: everyone in line is woken as stalled."""
        if self.queue and self.queue[0].deadline <= now and now - self.last_progress >= timeout:
            for w in self.queue:
                w.stalled = True
                w.event.set()
            self.queue.clear()

    # -- turn-taking --------------------------------------------------------

    def held(self) -> bool:
        """We won the last conflict and have not yet given the peer its turn."""
        return not self.machine.should_yield and self.conflict_at > self.turn_given_at

    def incoming_changed(self) -> trio.Event:
        """An event that fires on the next proposal we accept from the peer."""
        if self.incoming.is_set():
            self.incoming = trio.Event()
        return self.incoming

    def note_incoming(self) -> None:
        """We accepted a proposal from the peer."""
        self.last_incoming = trio.current_time()
        self.incoming.set()

    async def quiet_gap(self) -> None:
        """Return after YIELD_QUIET seconds with no proposal accepted from the peer."""
        while True:
            with trio.move_on_after(YIELD_QUIET) as quiet:
                await self.incoming_changed().wait()
            if quiet.cancelled_caught:
                return

    async def give_turn(self, deadline: float) -> None:
        """After winning a conflict: wait for the peer's turn to start and end."""
        conflict_at = self.conflict_at
        with trio.move_on_at(min(deadline, conflict_at + YIELD_HOLD)):
            while self.last_incoming <= conflict_at:
                await self.incoming_changed().wait()
            await self.quiet_gap()
        self.turn_given_at = max(self.turn_given_at, conflict_at)
