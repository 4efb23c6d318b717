"""Resync on reconnect, for :mod:`channel.machine` (whose docstring states the rules).

Each side sends ``Sync`` (latest co-signed, ``max_signed``) and then its in-flight
proposals as ordinary ``Propose`` frames.  A newer co-signed state from the peer is
checked and adopted, which settles our proposals up to it; a different co-signed state
at our own latest version is ``FundsAtRiskError``.  No I/O here either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel import responder
from channel.codec import Open, Propose, Sync
from channel.eip712 import state_digest
from channel.errors import ChannelError, FundsAtRiskError, InvalidSignature, WrongChannel
from channel.events import (
    InFlight,
    NotifyAccepted,
    NotifyProtocolError,
    NotifyRejected,
    Output,
    PersistLatest,
    ReceivePropose,
    ReceiveSync,
)
from channel.keys import verify
from channel.state import SignedState

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
            check_cosigned(m, theirs)
        except ChannelError as err:
            return [NotifyProtocolError(error=err)]
        m.latest = theirs
        m.max_signed = max(m.max_signed, theirs.state.version)
        out.append(PersistLatest(params=m.params, signed=theirs))
        out.extend(_settle(m, theirs, mine_v))
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


def _settle(m: ChannelMachine, theirs: SignedState, mine_v: int) -> list[Output]:
    """Our proposals once ``theirs`` (newer than our ``mine_v``) is adopted.

    The updates it holds are ours along its chain of ``base_version``: ``theirs`` may be
    one of our proposals, in flight or burned (see "Burned" in ``channel.machine``), each
    built on the one before, down to a state we had co-signed.  Those updates are done;
    our other proposals up to its version are superseded (retryable), and so are the
    ones in flight above it unless they build on it.  A proposal in flight that retries
    an update ``theirs`` made is dropped with no notice: the update is done."""
    v = theirs.state.version
    settled: list[InFlight] = []
    while m.pending and m.pending[0].proposal.state.version <= v:
        settled.append(m.pending.pop(0))
    ours = {f.proposal.state.version: f for f in (*m.burned, *settled)}
    chain: list[InFlight] = []  # newest first
    f = ours.get(v)
    if f is not None and f.proposal.state == theirs.state:
        while f is not None:
            chain.append(f)
            base = f.proposal.base_version
            f = ours.get(base) if mine_v < base < f.proposal.state.version else None
    in_flight = {id(g) for g in settled}
    done: dict[int, bool] = {}  # update id -> revived (it was reported rejected), oldest first
    for f in reversed(chain):
        done.setdefault(f.update_id, id(f) not in in_flight)
    out: list[Output] = []
    for f in settled:
        if f.update_id in done:
            continue
        out.append(
            NotifyRejected(
                channel_id=m.params.channel_id,
                update_id=f.update_id,
                version=f.proposal.state.version,
                reason="superseded on resync",
                retryable=True,
            )
        )
    # A settled update is done, burned or not; one in flight too is still awaited.
    for uid, revived in done.items():
        out.append(NotifyAccepted(update_id=uid, signed=theirs, revived=revived))
    m.burned.extend(f for f in settled if f.update_id not in done)
    m.prune_burned()
    cut = next(
        (
            i
            for i, f in enumerate(m.pending)
            if f.update_id in done or (i == 0 and f.proposal.base_version != v)
        ),
        -1,
    )
    if cut >= 0:
        out.extend(m._drop_from(cut, "superseded on resync", True, frozenset(done)))
    return out


def check_cosigned(m: ChannelMachine, signed: SignedState) -> None:
    if not signed.fully_signed:
        raise InvalidSignature("a co-signed state must carry both signatures")
    digest = state_digest(m.params, signed.state)
    for i in (0, 1):
        sig = signed.signatures[i]
        assert sig is not None
        verify(digest, sig, m.params.participants[i])
    if m.latest is not None:
        m.latest.state.check_successor(signed.state)
    elif m.pending:
        m.pending[0].proposal.state.check_successor(signed.state)
