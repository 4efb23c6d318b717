"""The client's receive side: what its links hand it.

Every frame from an authenticated peer is decoded and routed to its channel's
machine, and the machine's outputs go to the outbox.  An ``Open`` from a new
counterparty is vetted (it must name us, come from its first participant's key, fit
under the caps on live channels, and pass the open policy) before a channel exists.  A
frame that is refused gets an ``Error`` reply and changes nothing; only
``FundsAtRiskError`` escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeAlias

from channel import codec
from channel.codec import Accept, Error, Open, Propose, Reject, Sync
from channel.eip712 import state_digest
from channel.errors import (
    ChannelError,
    ConservationError,
    FundsAtRiskError,
    InvalidSignature,
    StaleVersion,
    UnknownPeer,
    WrongChannel,
)
from channel.keys import Signer, address_of_node_id
from channel.lane import CLOSED, FUNDING, OPEN, Lane
from channel.limits import MAX_CHANNELS, MAX_CHANNELS_PER_PEER
from channel.machine import (
    ActionConnected,
    ActionCountersign,
    ChannelMachine,
    NotifyProtocolError,
    Output,
    Policy,
    ReceiveAccept,
    ReceivePropose,
    ReceiveReject,
    ReceiveSync,
)
from channel.outbox import Outbox
from channel.state import Params, State
from channel.store import PersistChannel

log = logging.getLogger("optichannel.client")

#: Refusals no honest peer causes, counted like malformed frames (``links.MAX_PEER_ERRORS``):
#: a forged or broken signature (an ``Accept``, a ``Sync``'s state, a proposal), a state
#: that mints or burns funds, a message about a channel the peer has no part in.  A stale
#: version, a conflict or a policy refusal can happen to an honest peer and does not count.
CULPABLE = (InvalidSignature, ConservationError, WrongChannel)

#: ``open_policy(params, initial_state) -> None`` to accept a new channel, or a reason.
OpenPolicy: TypeAlias = Callable[[Params, State], "str | None"]


def ask_policy(policy: Callable[..., str | None], *args: Any) -> str | None:
    """A policy that raises refuses (and is logged): user code never brings a client down."""
    try:
        return policy(*args)
    except Exception as exc:
        log.exception("acceptance policy failed")
        return f"policy failed: {type(exc).__name__}"


class Inbound:
    """Routes what the links deliver into the channels of one client.

    ``channels`` is the client's own table (shared, not copied): an accepted ``Open``
    adds its channel there.  ``pump`` proposes the next update in line on a channel
    whose window just got a free slot."""

    def __init__(
        self,
        *,
        signer: Signer,
        channels: dict[bytes, Lane],
        outbox: Outbox,
        policy: Policy,
        open_policy: OpenPolicy | None,
        window: int,
        require_funding: bool,
        pump: Callable[[Lane], None],
        max_channels_per_peer: int = MAX_CHANNELS_PER_PEER,
        max_channels: int = MAX_CHANNELS,
    ) -> None:
        self.signer = signer
        self.channels = channels
        self.outbox = outbox
        self.policy = policy
        self.open_policy = open_policy
        self.window = window
        self.require_funding = require_funding
        self.pump = pump
        self.max_channels_per_peer = max_channels_per_peer
        self.max_channels = max_channels
        #: Per peer, the channels holding its proposals checked but not countersigned.
        self._deferred: dict[bytes, dict[bytes, Lane]] = {}
        #: Per peer, the frames handled since its reader was last idle.
        self._since_idle: dict[bytes, int] = {}
        #: The peers whose frames since then were more than one lone update.
        self._not_lone: set[bytes] = set()
        #: Per peer, refusals of its messages no honest peer causes (see ``CULPABLE``),
        #: not yet counted by its link (``take_strikes``).
        self._strikes: dict[bytes, int] = {}
        #: (peer, channel) whose repeated ``Open`` was answered on the peer's current link.
        self._answered_opens: set[tuple[bytes, bytes]] = set()

    def on_connected(self, node_id: bytes) -> None:
        """A link to ``node_id`` is up: every channel with that peer resyncs.  What an
        earlier link's reader left half counted (it stopped mid-burst) is forgotten: the
        machines drop their deferred proposals on the resync too."""
        self._since_idle.pop(node_id, None)
        self._not_lone.discard(node_id)
        self._deferred.pop(node_id, None)
        self._answered_opens = {k for k in self._answered_opens if k[0] != node_id}
        for ch in self.channels.values():
            if ch.peer_node_id == node_id:
                self.outbox.emit(node_id, ch.machine.handle(ActionConnected()))

    def on_idle(self, node_id: bytes) -> None:
        """Every frame read from ``node_id`` is handled: countersign, on each channel,
        the newest of its proposals (one signature, one fsync, one ``Accept``); then, if
        that is all there is to do, commit and send it before the reader waits.

        "All there is" means lock-step traffic: one frame was read, and it was a lone
        proposal, or an ``Accept`` that leaves none of ours in flight.  In pipelined
        traffic an fsync on the loop would hold up the reading of the next frames, and
        each inline commit would send a train of one update that the peer then answers
        on its own (after a lock-step phase, a pipelined one made ~4 times the fsyncs)."""
        lone = self._since_idle.pop(node_id, 0) <= 1
        if node_id in self._not_lone:
            self._not_lone.discard(node_id)
            lone = False
        for ch in self._deferred.pop(node_id, {}).values():
            if ch.machine.deferred:
                lone = lone and len(ch.machine.deferred) == 1
                self._emit(node_id, ch.machine.handle(ActionCountersign()))
        if lone:
            self.outbox.flush_now()

    def on_frame(self, node_id: bytes, frame: bytes) -> bool:
        """Handle one frame from ``node_id``; a refused one gets an ``Error`` reply and
        returns False (the links count those and drop a peer that sends too many)."""
        self._since_idle[node_id] = self._since_idle.get(node_id, 0) + 1
        try:
            self.dispatch(node_id, codec.decode(frame))
        except FundsAtRiskError:
            raise
        except ChannelError as exc:  # whatever the peer sent, it is refused, never fatal
            log.info("from %s: %s", node_id.hex()[:16], exc)
            reason = f"{type(exc).__name__}: {exc}"[: codec.MAX_REASON]
            self.outbox.add_send(node_id, codec.encode(Error(reason=reason)))
            return False
        return True

    def dispatch(self, node_id: bytes, msg: codec.Message) -> None:
        """Hand a decoded message to its channel; raises ``ChannelError`` to refuse it."""
        if isinstance(msg, Propose):
            ch = self._route(node_id, msg.state.channel_id)
            self._emit(node_id, ch.machine.handle(ReceivePropose(msg)))
            if ch.machine.deferred:
                self._deferred.setdefault(node_id, {})[msg.state.channel_id] = ch
        elif isinstance(msg, Accept):
            ch = self._route(node_id, msg.channel_id)
            self._emit(node_id, ch.machine.handle(ReceiveAccept(msg)))
            # The slot is free now: the next update in line joins the same group commit
            # as this completion (nothing of either leaves before that commit).
            self.pump(ch)
            if ch.machine.pending:
                self._not_lone.add(node_id)  # pipelined: leave the commit to the flusher
        elif isinstance(msg, Reject):
            ch = self._route(node_id, msg.channel_id)
            self.outbox.emit(node_id, ch.machine.handle(ReceiveReject(msg)))
        elif isinstance(msg, Sync):
            ch = self._route(node_id, msg.latest.state.channel_id)
            self._emit(node_id, ch.machine.handle(ReceiveSync(msg)))
        elif isinstance(msg, Open):
            self._on_open(node_id, msg)
        elif isinstance(msg, Error):
            log.info("peer %s reports: %s", node_id.hex()[:16], msg.reason)
        else:  # pragma: no cover - the codec only returns the types above
            raise TypeError(type(msg).__name__)

    def _emit(self, node_id: bytes, outputs: list[Output]) -> None:
        """Queue a machine step's outputs, counting the peer's culpable refusals."""
        for out in outputs:
            if isinstance(out, NotifyProtocolError):
                if isinstance(out.error, FundsAtRiskError):
                    raise out.error  # never swallowed: it ends the client (see on_frame)
                if isinstance(out.error, CULPABLE):
                    self._strikes[node_id] = self._strikes.get(node_id, 0) + 1
        self.outbox.emit(node_id, outputs)

    def take_strikes(self, node_id: bytes) -> int:
        """The peer's culpable refusals since the last call (its link counts them)."""
        return self._strikes.pop(node_id, 0)

    def _route(self, node_id: bytes, channel_id: bytes) -> Lane:
        ch = self.channels.get(channel_id)
        if ch is None:
            raise WrongChannel(f"no channel {channel_id.hex()[:16]} with {node_id.hex()[:16]}")
        if ch.peer_node_id != node_id:
            raise UnknownPeer(
                f"{node_id.hex()[:16]} is not the counterparty of channel {channel_id.hex()[:16]}"
            )
        return ch

    def _over_cap(self, node_id: bytes) -> str | None:
        """Why a new channel with ``node_id`` would be one too many, or None."""
        live = with_peer = 0
        for ch in self.channels.values():
            if ch.status != CLOSED:
                live += 1
                with_peer += ch.peer_node_id == node_id
        if with_peer >= self.max_channels_per_peer:
            cap = self.max_channels_per_peer
            return f"too many channels with this peer: {with_peer} live, the cap is {cap}"
        if live >= self.max_channels:
            return f"too many channels: {live} live, the cap is {self.max_channels}"
        return None

    def _on_open(self, node_id: bytes, msg: Open) -> None:
        params = msg.params
        cid = params.channel_id
        existing = self.channels.get(cid)
        if existing is not None:
            if existing.peer_node_id != node_id:
                raise UnknownPeer(f"{node_id.hex()[:16]} is not a party to {cid.hex()[:16]}")
            # A repeated Open (the opener restarted): answer with where we stand, once
            # per link (each answer re-sends our proposals in flight: repeated, it would
            # be a peer's lever to make us send far more than it does).
            key = (node_id, cid)
            if key in self._answered_opens:
                raise StaleVersion(f"Open for {cid.hex()[:16]} repeated on one link")
            self._answered_opens.add(key)
            self.outbox.emit(node_id, existing.machine.handle(ActionConnected()))
            return
        if params.participants[1] != self.signer.address:
            raise UnknownPeer("Open does not name us as the second participant")
        if params.participants[0] != address_of_node_id(node_id):
            raise UnknownPeer("Open comes from a key that is not its first participant")
        ChannelMachine.check_open(msg, 1)  # invalid: refused before any policy is asked
        reason = self._over_cap(node_id)
        if reason is None and self.open_policy is not None:
            reason = ask_policy(self.open_policy, params, msg.state)
        if reason is not None:
            # A refusal costs the sender nothing and us a scan of our channels: it
            # counts against the link, as a refused frame does (MAX_PEER_ERRORS).
            self._strikes[node_id] = self._strikes.get(node_id, 0) + 1
            refusal = Reject(
                channel_id=cid,
                version=msg.state.version,  # 0 unless the Open is invalid too
                state_hash=state_digest(params, msg.state),
                reason=f"UpdateRejected: {reason}",
            )
            self.outbox.add_send(node_id, codec.encode(refusal))
            return
        machine, outputs = ChannelMachine.accept_open(
            msg=msg,
            me=1,
            sign=self.signer.sign,
            policy=self.policy,
            window=self.window,
            defer=True,
        )
        status = FUNDING if self.require_funding else OPEN
        lane = self.channels[cid] = Lane(machine, node_id, None, status)
        lane.durable = None  # v0 is co-signed, not yet durable: ``latest()`` waits for it
        self.outbox.add_op(PersistChannel(params=params, me=1, peer_node_id=node_id, status=status))
        self.outbox.emit(node_id, outputs)
