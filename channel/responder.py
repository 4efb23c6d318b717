"""The responder's side of the update machine: the peer's proposals, checked, held and
countersigned (rules 1-7, "Countersign with defer" and "Conflict" in
:mod:`channel.machine`).  Functions of the machine, as :mod:`channel.resync` is: no I/O,
and every output goes back through ``ChannelMachine.handle``'s caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel import codec, revival
from channel.codec import Accept, Propose, Reject
from channel.eip712 import state_digest
from channel.errors import (
    ChannelError,
    ChannelFinal,
    InvalidSignature,
    ProposalConflict,
    StaleVersion,
    UpdateRejected,
    WrongChannel,
)
from channel.events import (
    ROW_NEW,
    ActionCountersign,
    NotifyProtocolError,
    NotifyReceived,
    Output,
    PersistLatest,
    ReceivePropose,
    SendMessage,
)
from channel.keys import verify
from channel.limits import MAX_DEFERRED, MAX_VERSION
from channel.state import SignedState, State

if TYPE_CHECKING:
    from channel.machine import ChannelMachine

#: The reason a crossing proposal is refused with (retryable: see "Conflict").
REASON_CONFLICT = ProposalConflict.__name__


def reject(m: ChannelMachine, state: State, digest: bytes, err: ChannelError) -> list[Output]:
    reason = f"{type(err).__name__}: {err}"[: codec.MAX_REASON]
    return [
        SendMessage(
            Reject(
                channel_id=m.params.channel_id,
                version=state.version,
                state_hash=digest,
                reason=reason,
            )
        ),
        NotifyProtocolError(error=err, channel_id=m.params.channel_id),
    ]


def on_propose(m: ChannelMachine, ev: ReceivePropose) -> list[Output]:
    p = ev.msg
    state = p.state
    digest = state_digest(m.params, state)
    err: ChannelError | None = None
    try:
        _check_proposal(m, p, digest)
        if not m.defer:
            verify(digest, p.signature, m.peer_address)
    except ProposalConflict as exc:
        _note_peer_version(m, p, digest)
        err = exc
    except ChannelError as exc:
        err = exc
    if err is None and m.policy is not None and m.latest is not None:
        reason = m.policy(m.params, peer_tip(m), state)
        if reason is not None:
            err = UpdateRejected(reason, reason=reason)
    if err is not None:
        # What was checked before stays accepted: its Accept goes first.
        done = on_countersign(m) if m.deferred else []
        return [*done, *reject(m, state, digest, err)]
    out: list[Output] = []
    if m.pending:  # we yield: our crossing proposals are dead, theirs wins
        out = m._drop_from(0, f"{REASON_CONFLICT}: the peer's proposal won", True)
    if not m.defer:
        return [*out, *_countersign(m, p, digest)]
    m.deferred.append((p, digest))
    if len(m.deferred) >= MAX_DEFERRED:
        out.extend(on_countersign(m))
    return out


def peer_tip(m: ChannelMachine) -> State:
    """The state the peer's next proposal must build on."""
    if m.deferred:
        return m.deferred[-1][0].state
    assert m.latest is not None
    return m.latest.state


def on_countersign(m: ChannelMachine, ev: ActionCountersign | None = None) -> list[Output]:
    """Countersign the newest deferred proposal whose signature holds; each one above
    it that fails rule 6 is rejected."""
    bad: list[Output] = []
    while m.deferred:
        p, digest = m.deferred[-1]
        try:
            verify(digest, p.signature, m.peer_address)
            break
        except InvalidSignature as err:
            m.deferred.pop()
            bad[:0] = reject(m, p.state, digest, err)  # oldest first
    if not m.deferred:
        return bad
    p, digest = m.deferred[-1]
    m.deferred.clear()
    return [*_countersign(m, p, digest), *bad]


def _countersign(m: ChannelMachine, p: Propose, digest: bytes) -> list[Output]:
    """Sign the peer's checked proposal ``p``: it becomes our latest co-signed state."""
    state = p.state
    my_sig = m._sign(digest)
    sigs: list[bytes | None] = [None, None]
    sigs[m.me] = my_sig
    sigs[m.peer] = p.signature
    signed = SignedState(state=state, signatures=(sigs[0], sigs[1]))
    if m.content is not None and m.latest is not None:
        revival.note_countersigned(m, state.version, m.latest.state.version)
    m.latest = signed
    m.max_signed = state.version
    out: list[Output] = [
        PersistLatest(params=m.params, signed=signed, row=ROW_NEW),
        SendMessage(
            Accept(channel_id=m.params.channel_id, version=state.version, signature=my_sig)
        ),
        NotifyReceived(signed=signed),
    ]
    if m.content is not None:
        out.extend(revival.after_latest(m))
    return out


def _yields_to(m: ChannelMachine, p: Propose) -> bool:
    """Whether we (the higher address) let the peer's crossing proposal win: it builds on
    our latest and its version is above all we signed, so accepting it keeps rule S; our
    own in-flight proposals are then dropped (and retried by the client)."""
    return (
        m.should_yield
        and m.latest is not None
        and p.base_version == m.latest.state.version
        and p.state.version > m.max_signed
    )


def _note_peer_version(m: ChannelMachine, p: Propose, digest: bytes) -> None:
    """Remember a version the peer signed (if the signature is genuine)."""
    if p.state.version <= m.peer_max_signed or p.state.channel_id != m.channel_id:
        return
    try:
        verify(digest, p.signature, m.peer_address)
    except InvalidSignature:
        return
    m.peer_max_signed = p.state.version


def _check_proposal(m: ChannelMachine, p: Propose, digest: bytes) -> None:
    state = p.state
    cid = m.params.channel_id.hex()[:16]
    if state.channel_id != m.params.channel_id:
        raise WrongChannel(f"proposal names channel {state.channel_id.hex()[:16]}, not {cid}")
    if m.latest is None:
        raise StaleVersion(f"channel {cid} is still opening")
    if m.latest.state.is_final:
        raise ChannelFinal(f"channel {cid} is final at v{m.latest.state.version}")
    if m.pending and not _yields_to(m, p):
        raise ProposalConflict(
            f"channel {cid} v{state.version} crosses our own proposal "
            f"v{m.pending[0].proposal.state.version}"
        )
    tip = peer_tip(m)
    if p.base_version != tip.version:
        raise StaleVersion(
            f"channel {cid} v{state.version}: built on v{p.base_version}, "
            f"our latest is v{tip.version}"
        )
    if tip.is_final:  # a final proposal of the peer's awaits our countersignature
        raise ChannelFinal(f"channel {cid}: v{tip.version} is final")
    if state.version <= tip.version:
        raise StaleVersion(f"channel {cid} v{state.version} is not above v{tip.version}")
    if tip.version < state.version <= m.max_signed:
        # Built on our latest, but we signed that version ourselves (a crossing
        # proposal of ours, now burned): a conflict the proposer retries above it.
        raise ProposalConflict(
            f"channel {cid} v{state.version} collides with our own signed v{m.max_signed}"
        )
    if state.version > MAX_VERSION:
        raise StaleVersion(
            f"channel {cid} v{state.version}: above the highest version, v{MAX_VERSION}"
        )
    if state.version <= m.max_signed:
        raise StaleVersion(
            f"channel {cid} v{state.version}: replayed or rolled back "
            f"(we have signed up to v{m.max_signed})"
        )
    tip.check_successor(state)
