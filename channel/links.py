"""Live links to peers: dialling (and redialling), accepting, one reader and one writer
per connection.

The client owns the channels and the machines; a :class:`Links` owns the connections.
It calls back into the client with every frame a peer sends (``on_frame``) and every
time a link comes up (``on_connected``), and takes the frames the client's flusher has
released (``queue``).  One link per peer: a newer connection from the same key
replaces the older one, but for one: when both sides dial, the link dialled by the
party with the lower node id is kept, while it is fresh (``FRESH_LINK``), and a redial
loop waits while any link to its peer is up (two dialling sides otherwise kept
replacing each other's link, a hundred times a second).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection

import trio

from channel.errors import (
    FundsAtRiskError,
    LocalProtocolError,
    OversizeError,
    PeerTimeout,
    TransportError,
)
from channel.keys import Signer
from channel.limits import MAX_STRANGERS, STRANGER_GRACE
from channel.transport import Connection, PeerAddress, connect

log = logging.getLogger("optichannel.links")

#: Frames queued for one peer before it counts as stalled and is disconnected.
SEND_QUEUE_LIMIT = 100_000
#: Frames handled from one connection before the flusher gets a turn.
READ_BURST = 4
#: Refused frames tolerated from one connection before it is dropped: malformed ones,
#: and well-formed ones no honest peer sends (a forged signature, minted funds).
MAX_PEER_ERRORS = 100
#: Seconds since a link's last frame (or its start) during which it is not replaced by
#: a crossing link dialled the other way, if it is the one dialled by the lower node id.
#: A link that quiet may be dead on the far side (its host gone): the new one wins.
FRESH_LINK = 2.0

#: ``on_frame(node_id, frame) -> bool``: handle one frame; False if it was refused.
OnFrame = Callable[[bytes, bytes], bool]
OnConnected = Callable[[bytes], None]
#: ``await pace()`` after each handled frame: returns at once, or once the client's
#: flusher has caught up (backpressure from the outbox to every reader).
Pace = Callable[[], Awaitable[None]]


class Peer:
    """One live connection and its writer task's queue."""

    def __init__(self, conn: Connection, epoch: int, *, dialled: bool) -> None:
        self.conn = conn
        self.dialled = dialled  # we dialled it (else we accepted it)
        self.last_frame = trio.current_time()  # when it came up, or its last frame came
        self.frames = 0
        #: Which link to this peer it is (1, 2, ...): see ``Links.epoch``.
        self.epoch = epoch
        self.send, self.recv = trio.open_memory_channel[list[bytes]](math.inf)
        self.queued = 0
        self.errors = 0
        self.dropping = False
        self.closed = trio.Event()


class Links:
    def __init__(
        self,
        signer: Signer,
        *,
        on_frame: OnFrame,
        on_connected: OnConnected,
        timeout: float,
        pace: Pace | None = None,
        on_idle: OnConnected | None = None,
        take_strikes: Callable[[bytes], int] | None = None,
        known_peers: Callable[[], Collection[bytes]] | None = None,
    ) -> None:
        """``on_idle(node_id)``: every frame read from that peer so far is handled, and
        its reader is about to wait for more.  ``take_strikes(node_id)``: how many more
        of the peer's frames were refused since it was last asked (those the frame
        handler accepted as well-formed, and found forged when it handled them, even
        later in ``on_idle``); they count towards ``MAX_PEER_ERRORS`` too.
        ``known_peers()``: the peers we hold a channel with; an accepted link from a
        key that is not one (a stranger) is one of at most ``max_strangers`` (a new one
        closes the oldest), and is closed after ``stranger_grace`` seconds unless a
        channel came of it."""
        self.signer = signer
        self.on_frame = on_frame
        self.on_connected = on_connected
        self.pace = pace
        self.on_idle = on_idle
        self.take_strikes = take_strikes
        self.known_peers = known_peers
        self.max_strangers = MAX_STRANGERS
        self.stranger_grace = STRANGER_GRACE
        #: Keys that were strangers when their links came, oldest first, each with its
        #: accepted connections (running or waiting to replace the one that runs).
        self._strangers: dict[bytes, set[Connection]] = {}
        #: Per peer, the newest connection waiting to replace its link: an older one that
        #: wakes to find a newer one here gives way to it (each new connection then costs
        #: one replacement, however many come at once).
        self._claims: dict[bytes, Connection] = {}
        self.timeout = timeout
        self.peers: dict[bytes, Peer] = {}
        self._epochs: dict[bytes, int] = {}
        #: The peers a redial loop runs for, and the address it dials next (the latest
        #: one ``connect`` or ``redial`` was given: a peer may move).
        self.dialing: dict[bytes, PeerAddress] = {}
        #: Set to make a redial loop try its (new) address now instead of after its backoff.
        self._redial_now: dict[bytes, trio.Event] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run dial loops in ``nursery`` (the client's)."""
        self._nursery = nursery

    def is_connected(self, node_id: bytes) -> bool:
        return node_id in self.peers

    def epoch(self, node_id: bytes) -> int:
        """How many links to ``node_id`` have come up (0: none yet).  A frame is made for
        the link of its moment and is never sent on a later one (see ``queue``)."""
        return self._epochs.get(node_id, 0)

    async def connect(self, address: PeerAddress) -> None:
        """Connect (and keep redialling if the link drops); return once it is up.

        Raises ``PeerTimeout`` after ``timeout`` seconds without a link (the redial loop
        goes on: a later ``connect`` or ``wait_connected`` sees the link come up)."""
        if self._nursery is None:
            raise LocalProtocolError("the client is not running")
        # Even when the peer's own link is up: after it drops, we redial this address.
        self.redial(address)
        if address.node_id in self.peers:
            return
        with trio.move_on_after(self.timeout):
            await self.wait_connected(address.node_id)
            return
        raise PeerTimeout(f"no link to {address} within {self.timeout:g}s; still redialling it")

    def redial(self, address: PeerAddress) -> None:
        """Dial ``address`` and keep redialling it, without waiting.  A peer that a
        redial loop already runs for is dialled at this address from now on, at once:
        never a second loop for one peer (two would keep replacing each other's link)."""
        if self._nursery is None:
            return
        node_id = address.node_id
        if node_id in self.dialing:
            if self.dialing[node_id] != address:
                self.dialing[node_id] = address
                self._redial_now[node_id].set()
            return
        self.dialing[node_id] = address
        self._redial_now[node_id] = trio.Event()
        self._nursery.start_soon(self._dial_loop, node_id)

    async def wait_connected(self, node_id: bytes) -> None:
        """Wait until a link to ``node_id`` is up (bound it with a cancel scope)."""
        while node_id not in self.peers:
            await self._changed_event().wait()

    def queue(self, node_id: bytes, frames: list[bytes], *, epoch: int) -> bool:
        """Hand ``frames``, made while link ``epoch`` to the peer was the latest, to the
        peer's writer; False if the peer is offline or stalled, or if a newer link has
        come up since (then the reconnect ``Sync`` carries everything that matters).  A
        stalled peer is disconnected (by a task of its own: this never waits).

        Never on a newer link: a frame made for the old one (say a proposal whose commit
        outlasted the link) would reach the peer ahead of the new link's ``Sync``, be
        refused against state the peer dropped on reconnect, and then be countersigned
        from the re-sent copy: an update reported refused, yet made."""
        p = self.peers.get(node_id)
        if p is None or p.epoch != epoch:
            return False
        if p.queued == 0:
            # The writer has nothing waiting: write on this task, now, rather than wake
            # it (a scheduler pass before the bytes leave); it only finishes a write the
            # socket buffer could not take.
            try:
                sent = p.conn.send_now(frames)
            except TransportError:
                return False  # the link is failing; its writer and reader close it
            except OversizeError:  # pragma: no cover - codec.encode refuses them first
                log.error("dropping an oversize frame batch for %s", node_id.hex()[:16])
                return False
            if sent:
                if p.conn.send_pending:
                    p.send.send_nowait([])
                return True
        p.queued += len(frames)
        if p.queued > SEND_QUEUE_LIMIT:
            if not p.dropping:
                log.warning("peer %s stalled; disconnecting", node_id.hex()[:16])
                p.dropping = True
                if self._nursery is not None:
                    self._nursery.start_soon(trio.aclose_forcefully, p.conn)
            return False
        p.send.send_nowait(frames)
        return True

    async def drop(self, node_id: bytes) -> None:
        """Close the link to ``node_id`` (a dialled peer is redialled: a fresh resync)."""
        p = self.peers.get(node_id)
        if p is not None:
            await trio.aclose_forcefully(p.conn)

    async def accept(self, conn: Connection) -> None:
        """The server's handler for an incoming, authenticated connection."""
        try:
            await self._accept(conn)
        except FundsAtRiskError as exc:
            # ``serve`` logs and drops what a handler raises (one peer must not take the
            # listener down); this one must end the client, as on a dialled link.
            if self._nursery is not None:
                self._nursery.start_soon(_reraise, exc)
            raise

    async def _accept(self, conn: Connection) -> None:
        node_id = conn.remote_node_id
        known = self.known_peers() if self.known_peers is not None else None
        if known is None or node_id in known:
            await self._run_peer(conn, dialled=False)
            return
        self._strangers = {n: c for n, c in self._strangers.items() if n not in known}
        conns = self._strangers.get(node_id)
        victims: set[Connection] = set()
        if conns is None:
            if len(self._strangers) >= self.max_strangers:
                # Make room by closing the oldest stranger's links: an honest stranger
                # sends its Open right after the handshake, so it must be outpaced to be
                # shut out (refusing the newest instead would let a few idle keys shut
                # out everyone).
                oldest = next(iter(self._strangers))
                victims = self._strangers.pop(oldest)
                log.info(
                    "closing the link of %s: %d newer strangers",
                    oldest.hex()[:16],
                    len(self._strangers),
                )
            conns = self._strangers[node_id] = set()  # counted before anything awaits
        conns.add(conn)
        try:
            for victim in victims:
                await trio.aclose_forcefully(victim)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expel_stranger, conn)
                await self._run_peer(conn, dialled=False)
                nursery.cancel_scope.cancel()
        finally:
            conns.discard(conn)
            if not conns and self._strangers.get(node_id) is conns:
                del self._strangers[node_id]

    async def _expel_stranger(self, conn: Connection) -> None:
        """Close a stranger's link after ``stranger_grace`` if no channel came of it."""
        await trio.sleep(self.stranger_grace)
        node_id = conn.remote_node_id
        if self.known_peers is not None and node_id not in self.known_peers():
            log.info("closing the link of %s: no channel within the grace", node_id.hex()[:16])
            await trio.aclose_forcefully(conn)

    async def _dial_loop(self, node_id: bytes) -> None:
        backoff = 0.05
        try:
            while True:
                # A link the peer dialled is as good: dial only while there is none.
                if (up := self.peers.get(node_id)) is not None:
                    while up is not None:
                        await up.closed.wait()
                        up = self.peers.get(node_id)
                    backoff = 0.05
                address = self.dialing[node_id]
                try:
                    conn = await connect(self.signer, address)
                except TransportError as exc:
                    log.info("dial %s failed: %s", address, exc)
                    await self._backoff(node_id, backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                carried = False
                try:
                    carried = await self._run_peer(conn, dialled=True)
                except FundsAtRiskError:
                    raise
                except Exception:  # as for accepted links: a link's failure is not ours
                    log.exception("link to %s failed", address)
                if carried:
                    backoff = 0.05
                    await self._backoff(node_id, 0.01)
                else:  # closed before a frame came: refused, or the peer is failing
                    await self._backoff(node_id, backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            del self.dialing[node_id]
            del self._redial_now[node_id]

    async def _backoff(self, node_id: bytes, seconds: float) -> None:
        """Sleep before the next dial, unless a new address for the peer comes first."""
        with trio.move_on_after(seconds):
            await self._redial_now[node_id].wait()
        if self._redial_now[node_id].is_set():
            self._redial_now[node_id] = trio.Event()

    def _struck(self, peer: Peer, node_id: bytes, *, ok: bool) -> bool:
        """Count the peer's refused frames; True once they are too many (disconnect)."""
        peer.errors += (not ok) + (self.take_strikes(node_id) if self.take_strikes else 0)
        if peer.errors > MAX_PEER_ERRORS:
            log.warning("peer %s sent too many bad frames; disconnecting", node_id.hex())
            return True
        return False

    def _changed_event(self) -> trio.Event:
        """An event set on the next link that comes up or goes down."""
        if self._changed.is_set():
            self._changed = trio.Event()
        return self._changed

    def _keeps(self, old: Peer, node_id: bytes, *, dialled: bool) -> bool:
        """A new link crossing ``old`` (dialled the other way) leaves it up: ``old`` is
        the one dialled by the lower node id, and fresh."""
        return (
            old.dialled != dialled
            and old.dialled == (self.signer.node_id < node_id)
            and not old.conn.closed
            and trio.current_time() - old.last_frame < FRESH_LINK
        )

    async def _run_peer(self, conn: Connection, *, dialled: bool) -> bool:
        """Run the link until it ends; True if it carried a frame from the peer."""
        node_id = conn.remote_node_id
        old = self.peers.get(node_id)
        if old is not None and self._keeps(old, node_id, dialled=dialled):
            log.info("keeping the link to %s; closing a crossing one", node_id.hex()[:16])
            await trio.aclose_forcefully(conn)
            return False
        # Replace the live link.  Several new connections at once: the newest claims the
        # key, and each older one gives way to it as it wakes (none runs untracked).
        self._claims[node_id] = conn
        try:
            while (old := self.peers.get(node_id)) is not None:
                await trio.aclose_forcefully(old.conn)
                await old.closed.wait()
                if self._claims.get(node_id) is not conn:
                    break
            if self._claims.get(node_id) is not conn or conn.closed:
                await trio.aclose_forcefully(conn)  # superseded, or closed (evicted)
                return False
        except BaseException:
            await trio.aclose_forcefully(conn)
            raise
        finally:
            if self._claims.get(node_id) is conn:
                del self._claims[node_id]
        self._epochs[node_id] = epoch = self._epochs.get(node_id, 0) + 1
        peer = Peer(conn, epoch, dialled=dialled)
        self.peers[node_id] = peer
        self._changed.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, peer)
                self.on_connected(node_id)
                await self._reader(peer)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader's FundsAtRiskError comes out as itself, for the callers above
            # (the dial loop, ``accept``) to tell it from a link's failure.
            far = _funds_at_risk(group)
            if far is not None:
                raise far from None
            raise
        finally:
            if self.peers.get(node_id) is peer:
                del self.peers[node_id]
                self._changed.set()
            peer.closed.set()
            await trio.aclose_forcefully(conn)
        return peer.frames > 0

    async def _writer(self, peer: Peer) -> None:
        async for frames in peer.recv:
            peer.queued -= len(frames)
            try:
                await peer.conn.send_many(frames)
            except TransportError:
                await trio.aclose_forcefully(peer.conn)
                return

    async def _reader(self, peer: Peer) -> None:
        """Feed the peer's frames to the client until the link fails; never raises."""
        node_id = peer.conn.remote_node_id
        burst = 0
        while True:
            burst += 1
            if burst >= READ_BURST:
                # Let the flusher commit and answer what we have so far while we go on
                # reading: both parties then work at the same time instead of in turns.
                burst = 0
                await trio.lowlevel.checkpoint()
            frame = peer.conn.receive_buffered()
            if frame is None:
                # Everything read so far is handled: before waiting for more bytes, the
                # client answers it (countersigns the newest of the peer's proposals).
                if self.on_idle is not None:
                    self.on_idle(node_id)
                    if self._struck(peer, node_id, ok=True):
                        return
                try:
                    frame = await peer.conn.receive()
                except (TransportError, OversizeError) as exc:
                    # EOF, a failed MAC, a truncated or oversized frame: the connection is
                    # closed; the peer's next link resyncs.
                    log.info(
                        "peer %s disconnected: %s: %s", node_id.hex()[:16], type(exc).__name__, exc
                    )
                    return
            peer.frames += 1
            peer.last_frame = trio.current_time()
            if self._struck(peer, node_id, ok=self.on_frame(node_id, frame)):
                return
            if self.pace is not None:
                await self.pace()


async def _reraise(exc: BaseException) -> None:
    raise exc


def _funds_at_risk(exc: BaseException) -> FundsAtRiskError | None:
    """The first ``FundsAtRiskError`` in ``exc`` and the groups within it, if any."""
    if isinstance(exc, FundsAtRiskError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _funds_at_risk(inner)
            if found is not None:
                return found
    return None
