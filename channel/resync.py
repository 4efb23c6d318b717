"""Resync on reconnect, for :mod:`channel.machine` (whose docstring states the rules).

Each side sends ``Sync`` (latest co-signed, ``max_signed``) and then its in-flight
proposals as ordinary ``Propose`` frames.  A newer co-signed state from the peer is
checked and adopted, which settles our proposals up to it; a different co-signed state
at our own latest version is ``FundsAtRiskError``.  No I/O here either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel import responder, revival
from channel.codec import Open, Propose, Sync
from channel.errors import ChannelError, FundsAtRiskError, WrongChannel
from channel.events import (
    NotifyProtocolError,
    Output,
    ReceivePropose,
    ReceiveSync,
)
from channel.revival import check_cosigned

if TYPE_CHECKING:
    from channel.machine import ChannelMachine


def sync_messages(m: ChannelMachine) -> list[Sync | Open | Propose]:
    """What we tell a peer on (re)connect: ``Open`` while the channel is opening
    (nothing once the peer refused it),
    else ``Sync`` (latest co-signed, ``max_signed``) followed by each in-flight
    proposal as its own ``Propose``.  Separate frames, so that a full window of
    proposals with large app data never has to fit in one frame; the peer handles
    them exactly as the proposals it would find inside a ``Sync``."""
    if m.latest is None:
        if not m.pending:
            return []  # our Open, refused by the peer: the channel never existed
        p = m.pending[0].proposal
        return [Open(params=m.params, state=p.state, signature=p.signature)]
    return [
        Sync(latest=m.latest, max_signed=m.max_signed, pending=()),
        *(f.proposal for f in m.pending),
    ]


def is_resent(m: ChannelMachine, p: Propose) -> bool:
    """Right after its ``Sync`` the peer re-sends its in-flight proposals; those at or
    below our latest co-signed version are settled by that ``Sync`` already (as
    proposals inside a ``Sync`` are), so they are skipped rather than refused."""
    return (
        m.latest is not None
        and p.state.channel_id == m.params.channel_id
        and p.state.version <= m.latest.state.version
    )


def on_sync(m: ChannelMachine, ev: ReceiveSync) -> list[Output]:
    s = ev.msg
    m.deferred.clear()  # the peer is about to send its proposals again
    out: list[Output] = []
    theirs = s.latest
    cid = m.params.channel_id.hex()[:16]
    mine_v = -1 if m.latest is None else m.latest.state.version
    if theirs.state.channel_id != m.params.channel_id:
        return [NotifyProtocolError(error=WrongChannel(f"Sync for another channel than {cid}"))]
    if theirs.state.version > mine_v:
        try:
            out.extend(revival.adopt(m, theirs))
        except ChannelError as err:
            return [NotifyProtocolError(error=err)]
    elif theirs.state.version == mine_v and m.latest is not None and theirs.state != m.latest.state:
        try:
            check_cosigned(m, theirs)
        except ChannelError as err:
            return [NotifyProtocolError(error=err)]
        return [
            NotifyProtocolError(
                error=FundsAtRiskError(
                    f"channel {cid}: the peer holds another co-signed state at v{mine_v} "
                    "than ours: our key signed two states at one version (a store restored "
                    "from an older copy, or the key in use elsewhere); stop, and settle the "
                    "channel on chain with the newest co-signed state"
                )
            )
        ]
    # The peer's own word on its highest signed version (a hint: bounded, so a peer
    # cannot push our versions towards the uint64 limit).
    base = -1 if m.latest is None else m.latest.state.version
    if base >= 0:
        m.peer_max_signed = max(m.peer_max_signed, min(s.max_signed, base + 1_000_000))
    for p in s.pending:
        if p.state.version > (-1 if m.latest is None else m.latest.state.version):
            out.extend(responder.on_propose(m, ReceivePropose(p)))
    if m.deferred:
        out.extend(responder.on_countersign(m))
    return out
