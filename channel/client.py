"""The Trio channel client that a trading process embeds.

One :class:`Client` owns one signing key, one store file, one listening socket
and any number of channels with any number of peers.  It drives a
:class:`~channel.machine.ChannelMachine` per channel and performs the machine's
outputs with one rule (DESIGN §4): **persist, then send, then notify**.

Group commit: every machine step appends its outputs to one outbox; a single
flusher task takes everything that is there, commits all store operations in
one SQLite transaction (one fsync, on a committer thread), then queues the frames
on each peer's writer task, then wakes the waiting callers.  Pipelined updates
on one channel, and updates on many channels, share fsyncs this way.

Usage::

    async with open_client(signer, "alice.sqlite") as alice:
        cid = await alice.open_channel(bob_address, chain_id=1, adjudicator=adj,
                                       challenge_duration=3600,
                                       balances=[(ETH, 10**18, 10**18)])
        signed = await alice.pay(cid, ETH, 10**15)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeAlias

import trio
import trio.lowlevel

from channel.errors import (
    LocalProtocolError,
    PeerTimeout,
    ProposalConflict,
    TransportError,
    UpdateRejected,
)
from channel.inbound import Inbound, OpenPolicy, ask_policy
from channel.keys import Signer, address_of_node_id
from channel.lane import (
    CLOSED,
    CLOSING,
    FUNDING,
    FUNDING_REFUSAL,
    FUNDING_RETRY,
    OPEN,
    STATUSES,
    YIELD_HOLD,
    Lane,
    Update,
    UpdateFn,
    Waiter,
)
from channel.limits import MAX_CHANNELS, MAX_CHANNELS_PER_PEER, PIPELINE_WINDOW, UPDATE_TIMEOUT
from channel.links import Links
from channel.machine import (
    ActionCountersign,
    ActionPropose,
    ChannelMachine,
    NotifyAccepted,
    NotifyProtocolError,
    NotifyReceived,
    NotifyRejected,
    Output,
    PersistLatest,
    Policy,
)
from channel.outbox import Outbox
from channel.registry import ChannelInfo, ChannelTable
from channel.state import Allocation, Params, SignedState, State
from channel.store import PersistChannel, Store, StoreLock
from channel.transport import Listening, PeerAddress, serve

log = logging.getLogger("optichannel.client")

#: Called (synchronously, after it is durable) with every new co-signed state.
StateListener: TypeAlias = Callable[[Params, SignedState], None]


class Client(ChannelTable):
    """A channel client.  Create it with :func:`open_client`.  Its queries and records
    of channels (``status``, ``latest``, ``channels``, ...) are :class:`ChannelTable`'s."""

    def __init__(
        self,
        signer: Signer,
        store: Store,
        *,
        policy: Policy | None = None,
        open_policy: OpenPolicy | None = None,
        update_timeout: float = UPDATE_TIMEOUT,
        window: int = PIPELINE_WINDOW,
        require_funding: bool = False,
        max_channels_per_peer: int = MAX_CHANNELS_PER_PEER,
        max_channels: int = MAX_CHANNELS,
        busy_poll: float = 0.0,
    ) -> None:
        self.signer = signer
        self.store = store
        self.require_funding = require_funding
        self.user_policy = policy
        self.policy: Policy = self._check_incoming
        self.update_timeout = update_timeout
        self.window = window
        self.listening: Listening | None = None
        self._channels: dict[bytes, Lane] = {}
        self.links = Links(
            signer,
            on_frame=lambda node_id, frame: self.inbound.on_frame(node_id, frame),
            on_connected=lambda node_id: self.inbound.on_connected(node_id),
            pace=lambda: self.outbox.pace(),
            on_idle=lambda node_id: self.inbound.on_idle(node_id),
            take_strikes=lambda node_id: self.inbound.take_strikes(node_id),
            known_peers=self._known_peers,
            timeout=update_timeout,
        )
        self._waiters: dict[int, Waiter] = {}
        #: Updates whose proposal was refused while their ``update`` call goes on (it may
        #: retry): the ``NotifyAccepted`` of a revived proposal, once one comes.
        self._retrying: dict[int, NotifyAccepted | None] = {}
        self._next_update = 0
        self._listeners: list[StateListener] = []
        self._nursery: trio.Nursery | None = None
        self.outbox = Outbox(
            store,
            self.links,
            on_note=self._notify,
            on_durable=self._on_durable,
            busy_poll=busy_poll,
        )
        self.inbound = Inbound(
            signer=signer,
            channels=self._channels,
            outbox=self.outbox,
            policy=self.policy,
            open_policy=open_policy,
            window=window,
            require_funding=require_funding,
            pump=self._pump,
            max_channels_per_peer=max_channels_per_peer,
            max_channels=max_channels,
        )
        self._load()

    # -- public API ---------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        return self.signer.node_id

    @property
    def address(self) -> bytes:
        return self.signer.address

    def peer_address(self, host: str | None = None) -> PeerAddress:
        """``pubkey@host:port`` at which this client accepts connections: the bound host,
        or ``host`` (the public name or address peers reach us at, when we listen on
        ``0.0.0.0`` or behind a NAT that keeps the port).  Raises ``LocalProtocolError``
        when the client does not listen, ``ValueError`` for a host no address can carry."""
        if self.listening is None:
            raise LocalProtocolError("the client is not listening")
        return PeerAddress(
            node_id=self.node_id,
            host=self.listening.host if host is None else host,
            port=self.listening.port,
        )

    def add_state_listener(self, fn: StateListener) -> None:
        """Call ``fn(params, signed)`` after every new co-signed state is durable."""
        self._listeners.append(fn)

    async def connect(self, address: PeerAddress) -> None:
        """Connect to a peer (and keep reconnecting if the link drops); returns once up.
        Raises ``PeerTimeout`` if no link came up within ``update_timeout`` (the client
        keeps redialling)."""
        await self.links.connect(address)

    async def open_channel(
        self,
        peer: PeerAddress | bytes,
        *,
        chain_id: int,
        adjudicator: bytes,
        challenge_duration: int,
        balances: Iterable[tuple[bytes, int, int]],
        app: bytes = b"\x00" * 20,
    ) -> bytes:
        """Open a channel with ``peer`` (a ``PeerAddress``, or the node id of a connected
        peer); ``balances`` are ``(asset, ours, theirs)``.  Returns the channel id once the
        peer has countersigned version 0.  Raises ``UpdateRejected``, ``PeerTimeout`` (no
        link, or no countersignature, within ``update_timeout``), ``TransportError`` (a
        node id that is not connected), ``ValueError`` (params or balances no channel can
        hold, e.g. an asset whose total exceeds uint256; raised before any dialling)."""
        if isinstance(peer, PeerAddress):
            node_id, addr = peer.node_id, str(peer)
        else:
            node_id, addr = peer, None
        try:
            peer_addr = address_of_node_id(node_id)
        except ValueError:
            raise ValueError(
                f"{node_id.hex()} is not a node id (a compressed public key)"
            ) from None
        params = Params.new(
            chain_id=chain_id,
            adjudicator=adjudicator,
            participants=(self.address, peer_addr),
            challenge_duration=challenge_duration,
            app=app,
        )
        initial = State.initial(params, [(asset, ours, theirs) for asset, ours, theirs in balances])
        if isinstance(peer, PeerAddress):
            await self.connect(peer)
        if not self.links.is_connected(node_id):
            raise TransportError(f"not connected to {node_id.hex()}")
        uid = self._new_update_id()
        machine, outputs = ChannelMachine.open(
            params=params,
            me=0,
            sign=self.signer.sign,
            initial=initial,
            update_id=uid,
            policy=self.policy,
            window=self.window,
            defer=True,
        )
        status = FUNDING if self.require_funding else OPEN
        self._channels[params.channel_id] = Lane(machine, node_id, addr, status)
        self.outbox.add_op(
            PersistChannel(params=params, me=0, peer_node_id=node_id, peer_addr=addr, status=status)
        )
        waiter = self._waiters[uid] = Waiter(trio.current_time() + self.update_timeout)
        self._emit(node_id, outputs)
        await self._await_result(waiter, params.channel_id, 0)
        return params.channel_id

    async def update(self, channel_id: bytes, fn: UpdateFn) -> SignedState:
        """Propose ``fn(tip)`` as the next state and return it once co-signed and durable.

        ``fn`` gets the state the proposal builds on (the latest co-signed one, or our
        last in-flight proposal when pipelining; a proposal of the peer's that awaits our
        countersignature is countersigned first) and may be called again if the update
        has to be retried after a conflict.  When the pipeline window is full the update
        waits in line, and ``fn`` runs when its turn comes.  Raises ``UpdateRejected``
        (the peer or its policy refused), ``LocalProtocolError`` (``fn`` broke
        conservation, or the channel is final), ``PeerTimeout`` (no answer within
        ``update_timeout``: the outcome is settled on reconnect); whatever ``fn`` raises
        is raised here.
        """
        ch = self._channel(channel_id)
        uid = self._new_update_id()
        try:
            return await self._update(ch, channel_id, fn, uid)
        except UpdateRejected:
            late = self._retrying.get(uid)
            if isinstance(late, NotifyAccepted):
                # Refused, and then the refused proposal came back co-signed (a peer
                # that countersigned what it refused): the update is made.
                return late.signed
            raise
        finally:
            self._retrying.pop(uid, None)

    async def _update(self, ch: Lane, channel_id: bytes, fn: UpdateFn, uid: int) -> SignedState:
        deadline = trio.current_time() + self.update_timeout
        granted = False  # the pump handed us the turn: skip the line
        while True:
            # Backpressure, as for the readers: while the flusher is behind, callers wait
            # for it instead of all signing their proposals in one long scheduler batch
            # (with 1,600 callers that batch took 100+ ms, and the peers idled meanwhile).
            await self.outbox.pace()
            if ch.status != OPEN:
                raise LocalProtocolError(f"channel {channel_id.hex()[:16]} is {ch.status}")
            m = ch.machine
            if not granted and (ch.queue or m.window_full() or not m.is_open or ch.held()):
                w = Waiter(trio.current_time() + self.update_timeout, fn, uid)
                ch.queue.append(w)
                self._pump(ch)
                await self._wait(ch, w)
                if w.go:
                    granted = True
                    continue
            else:
                granted = False
                if ch.held():
                    # We won the last conflict: give the peer one turn (its burst, until a
                    # quiet gap) before proposing again, for at most YIELD_HOLD.
                    await ch.give_turn(deadline)
                if m.window_full() or not m.is_open:
                    continue  # the line moved on meanwhile: queue up again
                w = Waiter(0.0, fn, uid)
                self._propose(ch, w)
                if len(m.pending) == 1:  # lock-step: nothing else of ours in flight here
                    self.outbox.flush_now()
                await self._wait(ch, w)
            if w.error is not None:
                raise w.error
            result = await self._result(w, channel_id, -1)
            if isinstance(result, NotifyAccepted):
                return result.signed
            if FUNDING_REFUSAL in result.reason and trio.current_time() < deadline:
                # The peer has not seen the deposits confirmed yet (see FUNDING_REFUSAL).
                await trio.sleep(FUNDING_RETRY)
                continue
            if not result.retryable:
                raise UpdateRejected(
                    f"channel {channel_id.hex()[:16]} v{result.version} rejected: {result.reason}",
                    reason=result.reason,
                )
            if trio.current_time() >= deadline:
                raise UpdateRejected(
                    f"channel {channel_id.hex()[:16]}: still conflicting after "
                    f"{self.update_timeout}s",
                    reason="conflict",
                )
            ch.conflict_at = trio.current_time()
            if m.should_yield:
                # Let the peer (lower address) finish its burst: wait for a quiet gap in
                # its proposals, but never longer than YIELD_HOLD (no starvation).
                with trio.move_on_after(YIELD_HOLD):
                    await ch.quiet_gap()

    def _propose(self, ch: Lane, w: Waiter) -> None:
        """Propose ``w``'s update now; a failure (``fn`` raised, conservation) goes to
        ``w.error`` and wakes its caller."""
        assert w.fn is not None
        m = ch.machine
        if m.deferred:
            # The peer's checked proposals are countersigned first, and ``fn`` sees the
            # state they reach: computed on the one before, our update would undo them.
            self._emit(ch.peer_node_id, m.handle(ActionCountersign()))
        try:
            tip = m.tip()
            upd = w.fn(tip)
            uid = w.uid
            outputs = m.handle(
                ActionPropose(
                    update_id=uid,
                    allocations=upd.allocations,
                    base_version=tip.version,
                    app_data=upd.app_data,
                    is_final=upd.is_final,
                )
            )
        except Exception as exc:  # the caller's own fn: its error is the caller's
            w.error = exc
            w.event.set()
            return
        w.deadline = trio.current_time() + self.update_timeout
        self._waiters[uid] = w
        self._emit(ch.peer_node_id, outputs)

    def _pump(self, ch: Lane) -> None:
        ch.pump(partial(self._propose, ch))

    async def _wait(self, ch: Lane, w: Waiter) -> None:
        try:
            await w.event.wait()
        except BaseException:
            w.cancelled = True
            if w.go:
                self._pump(ch)  # we were handed the turn: pass it on
            raise
        if w.stalled:
            raise PeerTimeout(
                f"channel {ch.machine.channel_id.hex()[:16]}: the pipeline window has "
                f"been full for {self.update_timeout}s with no answer from the peer"
            )

    async def _sweeper(self) -> None:
        """Time out waiters and stalled lines, so the hot path needs no cancel scopes."""
        step = max(0.01, min(0.25, self.update_timeout / 8))
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            expired = [w for w in self._waiters.values() if w.deadline <= now]
            for w in expired:
                if not w.event.is_set():
                    w.timed_out = True
                    w.event.set()
            for ch in self._channels.values():
                ch.expire_line(now, self.update_timeout)

    async def pay(self, channel_id: bytes, asset: bytes, amount: int) -> SignedState:
        """Move ``amount`` of ``asset`` from us to the peer."""
        me = self._channel(channel_id).machine.me

        def fn(tip: State) -> Update:
            if all(a.asset != asset for a in tip.allocations):
                raise LocalProtocolError(
                    f"channel {channel_id.hex()[:16]} holds no asset 0x{asset.hex()}"
                )
            allocs = []
            for a in tip.allocations:
                if a.asset == asset:
                    b = list(a.balances)
                    if b[me] < amount or amount < 0:
                        raise LocalProtocolError(
                            f"channel {channel_id.hex()[:16]}: cannot pay {amount}, balance {b[me]}"
                        )
                    b[me] -= amount
                    b[1 - me] += amount
                    a = Allocation(asset=a.asset, balances=(b[0], b[1]), locked=a.locked)
                allocs.append(a)
            return Update(allocations=tuple(allocs), app_data=tip.app_data)

        return await self.update(channel_id, fn)

    def _check_incoming(self, params: Params, old: State, new: State) -> str | None:
        ch = self._channels.get(params.channel_id)
        if ch is not None and ch.status == FUNDING:
            return FUNDING_REFUSAL
        if ch is not None and ch.status != OPEN:
            return f"channel is {ch.status}"
        if self.user_policy is not None:
            return ask_policy(self.user_policy, params, old, new)
        return default_policy(params.participants.index(self.address), old, new)

    async def wait_connected(self, node_id: bytes) -> None:
        """Wait until a connection to ``node_id`` is up (use a cancel scope to bound it)."""
        await self.links.wait_connected(node_id)

    # -- internals: channels --------------------------------------------------

    async def _await_result(
        self, waiter: Waiter, channel_id: bytes, version: int
    ) -> NotifyAccepted | NotifyRejected:
        await waiter.event.wait()
        return await self._result(waiter, channel_id, version)

    async def _result(
        self, waiter: Waiter, channel_id: bytes, version: int
    ) -> NotifyAccepted | NotifyRejected:
        """The outcome of a proposal whose waiter has fired (``version`` 0: the open)."""
        if waiter.timed_out:
            self._waiters = {k: w for k, w in self._waiters.items() if w is not waiter}
            ch = self._channels.get(channel_id)
            if ch is not None:
                # Force a resync: the outcome is settled when the link comes back.
                await self.links.drop(ch.peer_node_id)
            raise PeerTimeout(
                f"channel {channel_id.hex()[:16]}: no answer within {self.update_timeout}s; "
                "the outcome is settled when the peer reconnects"
            ) from None
        assert waiter.result is not None
        result = waiter.result
        if isinstance(result, NotifyRejected) and version == 0:
            raise UpdateRejected(f"channel open refused: {result.reason}", reason=result.reason)
        return result

    # -- internals: the outbox -----------------------------------------------

    def _emit(self, peer: bytes, outputs: Sequence[Output]) -> None:
        self.outbox.emit(peer, outputs)

    def _on_durable(self, op: PersistLatest) -> None:
        ch = self._channels.get(op.params.channel_id)
        if ch is None:
            return
        if ch.durable is None or op.signed.state.version > ch.durable.state.version:
            ch.durable = op.signed
        for fn in self._listeners:
            try:
                fn(op.params, op.signed)
            except Exception:
                log.exception("state listener failed")

    def _notify(self, note: Output) -> None:
        if isinstance(note, NotifyAccepted | NotifyRejected):
            waiter = self._waiters.pop(note.update_id, None)
            if waiter is not None:
                waiter.result = note
                waiter.event.set()
                if (
                    isinstance(note, NotifyRejected)
                    and waiter.fn is not None
                    and not waiter.cancelled  # its ``update`` has returned
                ):
                    # ``update`` may yet raise for it: until it is done, a revived
                    # proposal of this update must reach it (a retry of one the machine
                    # answers itself, see ``channel.revival.answer_made``).
                    self._retrying.setdefault(note.update_id, None)
            elif isinstance(note, NotifyAccepted):
                if note.update_id in self._retrying:
                    self._retrying[note.update_id] = note
                elif note.revived:
                    log.warning(
                        "channel %s: the peer countersigned v%d after refusing it: an "
                        "update reported rejected is made after all",
                        note.signed.state.channel_id.hex()[:16],
                        note.signed.state.version,
                    )
            cid = (
                note.signed.state.channel_id
                if isinstance(note, NotifyAccepted)
                else note.channel_id
            )
            ch = self._channels.get(cid)
            if ch is not None:
                ch.last_progress = trio.current_time()
                if isinstance(note, NotifyAccepted):
                    ch.note_accepted()
                else:
                    if note.retryable:
                        ch.note_conflict()
                    # Our Open refused, for whatever reason (a "conflict" too): the
                    # channel never existed (no-op for a channel that is open).
                    self._close_if_refused(cid)
                self._pump(ch)  # a slot freed (or the channel just opened)
        elif isinstance(note, NotifyReceived):
            ch = self._channels.get(note.signed.state.channel_id)
            if ch is not None:
                ch.note_incoming()
        elif isinstance(note, NotifyProtocolError):
            log.info("refused from peer: %s", note.error)
            if isinstance(note.error, ProposalConflict):
                ch = self._channels.get(note.channel_id)
                if ch is not None:
                    # The peer wants a turn: hold our next proposals briefly (see update()).
                    ch.conflict_at = trio.current_time()
                    ch.note_conflict()

    # -- lifecycle ------------------------------------------------------------

    async def _run(
        self, host: str, port: int | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.links.attach(nursery)
            nursery.start_soon(self.outbox.run)
            nursery.start_soon(self._sweeper)
            if port is not None:
                self.listening = await nursery.start(
                    partial(serve, self.signer, self.links.accept, host=host, port=port)
                )
            for ch in self._channels.values():
                if ch.peer_addr:
                    self.links.redial(PeerAddress.parse(ch.peer_addr))
            task_status.started()

    async def drain(self) -> None:
        """Wait until everything emitted so far is durable and handed to the sockets."""
        await self.outbox.drain()
        await trio.lowlevel.checkpoint()


def default_policy(me: int, old: State, new: State) -> str | None:
    """The acceptance policy of a client given none: a peer's proposal may add to our
    side and nothing else.  It is refused if it lowers our balance of any asset or
    changes a locked amount (those move under an app's own policy): a counterparty
    pays us, it never takes from us without our policy saying so."""
    for a in new.allocations:
        try:
            before = old.allocation(a.asset)
        except KeyError:
            return f"no policy set, and the proposal adds asset 0x{a.asset.hex()}"
        if a.balances[me] < before.balances[me]:
            return (
                f"no policy set, and the proposal takes {before.balances[me] - a.balances[me]}"
                f" of asset 0x{a.asset.hex()} from us"
            )
        if a.locked != before.locked:
            return f"no policy set, and the proposal changes the locked 0x{a.asset.hex()}"
    return None


@asynccontextmanager
async def open_client(
    signer: Signer,
    store_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = 0,
    policy: Policy | None = None,
    open_policy: OpenPolicy | None = None,
    update_timeout: float = UPDATE_TIMEOUT,
    window: int = PIPELINE_WINDOW,
    require_funding: bool = False,
    max_channels_per_peer: int = MAX_CHANNELS_PER_PEER,
    max_channels: int = MAX_CHANNELS,
    busy_poll: float = 0.0,
) -> AsyncIterator[Client]:
    """Run a client: load (or create) the store, listen on ``host:port`` (``port=None``
    to not listen), reconnect to known peers, and close everything cleanly on exit.

    ``require_funding``: new channels start as ``funding`` and accept no updates until
    ``channel.onchain.fund`` has seen both deposits confirmed on chain.

    ``max_channels_per_peer``, ``max_channels``: a peer's ``Open`` is refused (the
    opener gets ``UpdateRejected``) while that peer already has that many live (not
    closed) channels with us, or we have that many in all; our own opens are not capped.
    Without an ``open_policy`` any key gets its channels: keys cost nothing, so 625 of
    them can fill the 10,000 with channels never funded nor used, and those stay until
    closed.  A client that listens for strangers should pass an ``open_policy``.

    ``busy_poll``: seconds the Trio loop keeps polling its sockets, instead of blocking,
    after the client sent frames (``channel.busypoll``; off by default, ``BUSY_POLL`` =
    1 ms suggested): ~0.3 ms off a lock-step update here, for CPU (the loop uses its
    core fully while lock-step traffic flows).  For a client with a core to itself: on
    contended cores it stops polling by itself, but costs latency until it does.

    An exception that ends the client (from the block, or ``StoreError`` when the store
    stops committing) leaves the ``async with`` as itself; several at once leave as one
    ``BaseExceptionGroup``."""
    lock = StoreLock(store_path)  # first: a second client must not even migrate it
    try:
        store = Store(store_path, owner=signer.address)
    except BaseException:
        lock.release()
        raise
    try:
        # Before the first commit: every lock-step commit then writes over WAL blocks
        # the file has (see Store.warm_wal), from the first update after a start.
        await trio.to_thread.run_sync(store.warm_wal)
    except BaseException:
        store.close()
        lock.release()
        raise
    client = Client(
        signer,
        store,
        policy=policy,
        open_policy=open_policy,
        update_timeout=update_timeout,
        window=window,
        require_funding=require_funding,
        max_channels_per_peer=max_channels_per_peer,
        max_channels=max_channels,
        busy_poll=busy_poll,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run, host, port)
            try:
                yield client
                await client.drain()
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's nurseries wrap whatever ends it, the block's own exception too:
        # one exception comes out as itself, so that ``except UpdateRejected`` (or
        # ``StoreError``) around the block works; several come out as their one group.
        inner = _unwrap(group)
        if inner is group:
            raise
        raise inner from inner.__cause__
    finally:
        store.close()
        lock.release()


def _unwrap(exc: BaseException) -> BaseException:
    """``exc`` without the groups of one that wrap it: a lone exception, or the group
    of several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = [
    "CLOSED",
    "CLOSING",
    "FUNDING",
    "OPEN",
    "STATUSES",
    "ChannelInfo",
    "Client",
    "OpenPolicy",
    "StateListener",
    "Update",
    "UpdateFn",
    "default_policy",
    "open_client",
]
