"""The client's table of channels: what it holds and how it reads and records them.

:class:`ChannelTable` is the part of :class:`~channel.client.Client` that knows the
channels as records: it loads them from the store on start, answers the queries of
the public API (status, latest state, params, the listing), records statuses and peer
addresses, prunes history, and closes a channel whose ``Open`` the peer refused.
Proposing, receiving and the outbox's rule (persist, send, notify) stay in the client.
"""

from __future__ import annotations

import logging

import attrs

from channel.errors import LocalProtocolError
from channel.keys import Signer
from channel.lane import CLOSED, STATUSES, Lane
from channel.links import Links
from channel.machine import ChannelMachine, Policy
from channel.outbox import Outbox
from channel.state import Params, SignedState
from channel.store import PersistPeerAddress, PersistStatus, Store
from channel.transport import PeerAddress

log = logging.getLogger("optichannel.client")


@attrs.frozen(kw_only=True)
class ChannelInfo:
    channel_id: bytes
    params: Params
    peer_node_id: bytes
    latest: SignedState | None
    in_flight: int
    connected: bool


class ChannelTable:
    """Channels by id (each a :class:`~channel.lane.Lane`), for the client that
    extends this class and sets these attributes up."""

    signer: Signer
    store: Store
    policy: Policy
    window: int
    links: Links
    outbox: Outbox
    _channels: dict[bytes, Lane]
    _next_update: int

    def status(self, channel_id: bytes) -> str:
        """``funding``, ``open``, ``closing`` or ``closed``."""
        return self._channel(channel_id).status

    def set_status(self, channel_id: bytes, status: str) -> None:
        """Record a new status (durable with the next group commit; see :meth:`drain`)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self._channel(channel_id).status = status
        self.outbox.add_op(PersistStatus(channel_id=channel_id, status=status))

    def me(self, channel_id: bytes) -> int:
        """Our participant index (0 or 1) in the channel."""
        return self._channel(channel_id).machine.me

    def latest(self, channel_id: bytes) -> SignedState | None:
        """The latest co-signed state that is durable in our store."""
        return self._channel(channel_id).durable

    async def prune_history(self, channel_id: bytes | None = None) -> int:
        """Delete the stored history of a channel (default: of every channel): each state
        below its latest co-signed one, save our proposals still in flight; returns how
        many went.  What a dispute needs stays, and rule S holds without the rows.  Runs
        between commits, ``outbox.PRUNE_CHUNK`` states at a time; export the audit trail
        first (``Store.signed_states``) if you need it."""
        ids = list(self._channels) if channel_id is None else [channel_id]
        for cid in ids:
            self._channel(cid)  # LocalProtocolError for an unknown channel
        return await self.outbox.prune_history(ids)

    def params(self, channel_id: bytes) -> Params:
        return self._channel(channel_id).machine.params

    def channels(self) -> list[ChannelInfo]:
        return [
            ChannelInfo(
                channel_id=cid,
                params=ch.machine.params,
                peer_node_id=ch.peer_node_id,
                latest=ch.durable,
                in_flight=len(ch.machine.pending),
                connected=self.links.is_connected(ch.peer_node_id),
            )
            for cid, ch in self._channels.items()
        ]

    def _known_peers(self) -> set[bytes]:
        """The peers we hold a channel with (any status): not strangers."""
        return {ch.peer_node_id for ch in self._channels.values()}

    def _channel(self, channel_id: bytes) -> Lane:
        try:
            return self._channels[channel_id]
        except KeyError:
            raise LocalProtocolError(f"no channel {channel_id.hex()[:16]}") from None

    def _new_update_id(self) -> int:
        self._next_update += 1
        return self._next_update

    def _load(self) -> None:
        for rec in self.store.load():
            if rec.revived and rec.latest is not None:
                log.warning(
                    "channel %s: the latest state v%d is a proposal of ours the peer "
                    "refused and brought back co-signed: an update reported rejected may "
                    "be made in it (check latest())",
                    rec.params.channel_id.hex()[:16],
                    rec.latest.state.version,
                )
            pending = [attrs.evolve(f, update_id=self._new_update_id()) for f in rec.in_flight]
            machine = ChannelMachine(
                params=rec.params,
                me=rec.me,
                sign=self.signer.sign,
                latest=rec.latest,
                max_signed=rec.max_signed,
                pending=pending,
                policy=self.policy,
                window=self.window,
                defer=True,
            )
            self._channels[rec.params.channel_id] = Lane(
                machine, rec.peer_node_id, rec.peer_addr, rec.status
            )
            self._close_if_refused(rec.params.channel_id)  # a crash came before its status

    def _close_if_refused(self, channel_id: bytes) -> None:
        """An ``Open`` of ours the peer refused leaves a channel with no state at all:
        it never existed, so it is closed (it holds no slot under the peer's caps, and
        nothing about it is said on reconnect)."""
        ch = self._channels[channel_id]
        if ch.status != CLOSED and not ch.machine.is_open and not ch.machine.pending:
            self.set_status(channel_id, CLOSED)

    def remember_peer_address(self, channel_id: bytes, address: PeerAddress) -> None:
        """Where to reach the peer of ``channel_id`` from now on (say, of a channel the
        peer opened, whose address we never learnt, or a peer that moved): the next start
        redials it there, and so does a redial loop running now.  Durable with the next
        commit (``drain`` waits for it).  Raises ``LocalProtocolError`` for a channel we
        do not hold or an address of another key than the channel's peer."""
        lane = self._channel(channel_id)
        if address.node_id != lane.peer_node_id:
            raise LocalProtocolError(
                f"channel {channel_id.hex()[:16]}: {address} is not the channel's peer"
            )
        lane.peer_addr = str(address)
        self.outbox.add_op(PersistPeerAddress(channel_id=channel_id, peer_addr=str(address)))
        if address.node_id in self.links.dialing:
            self.links.redial(address)
