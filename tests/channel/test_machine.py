"""The update machine, driven as two parties over a fake in-memory link (h11 style)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from channel import codec
from channel.codec import Accept, Open, Propose, Reject, Sync
from channel.eip712 import state_digest
from channel.errors import (
    ChannelFinal,
    ConservationError,
    FundsAtRiskError,
    InvalidSignature,
    LocalProtocolError,
    ProposalConflict,
    RemoteProtocolError,
    StaleVersion,
    UpdateRejected,
    WrongChannel,
)
from channel.keys import SECP256K1_N, Signer, verify
from channel.limits import MAX_BURNED, MAX_DEFERRED, MAX_FRAME, MAX_VERSION
from channel.machine import (
    REASON_CONFLICT,
    ActionConnected,
    ActionCountersign,
    ActionPropose,
    ChannelMachine,
    NotifyAccepted,
    NotifyProtocolError,
    NotifyReceived,
    NotifyRejected,
    Output,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    Policy,
    ReceiveAccept,
    ReceivePropose,
    ReceiveReject,
    ReceiveSync,
    SendMessage,
)
from channel.state import ETH, Address, Allocation, ChannelId, Params, SignedState, State

TOKEN = Address(b"\x70" * 20)
ALICE_KEY = b"\x01" * 32
BOB_KEY = b"\x02" * 32


# --- the fake link -------------------------------------------------------------


@attrs.define
class Durable:
    """What a driver would have made durable so far, from the Persist* outputs in order."""

    latest: int = -1
    proposals: dict[int, State] = attrs.Factory(dict)
    dead_from: int | None = None

    def apply(self, out: Output) -> None:
        if isinstance(out, PersistProposal):
            self.proposals[out.state.version] = out.state
        elif isinstance(out, PersistLatest):
            self.latest = max(self.latest, out.signed.state.version)
        elif isinstance(out, PersistDropProposals):
            self.dead_from = (
                out.from_version
                if self.dead_from is None
                else min(self.dead_from, out.from_version)
            )

    def check(self, out: Output) -> None:
        """Raise AssertionError if ``out`` depends on something not yet durable."""
        if isinstance(out, SendMessage):
            msg = out.msg
            if isinstance(msg, Propose | Open):
                assert self.proposals.get(msg.state.version) == msg.state, (
                    f"sent our proposal v{msg.state.version} before persisting it"
                )
            elif isinstance(msg, Accept):
                assert self.latest >= msg.version, f"sent Accept v{msg.version} before persisting"
            elif isinstance(msg, Sync):
                assert self.latest >= msg.latest.state.version
                for p in msg.pending:
                    assert self.proposals.get(p.state.version) == p.state
        elif isinstance(out, NotifyAccepted | NotifyReceived):
            v = out.signed.state.version
            assert self.latest >= v, f"notified v{v} before persisting it"
        elif isinstance(out, NotifyRejected):
            assert self.latest >= out.version or (
                self.dead_from is not None and self.dead_from <= out.version
            ), f"notified rejection of v{out.version} before persisting the drop"


def check_output_order(outputs: list[Output], durable: Durable) -> None:
    for out in outputs:
        if isinstance(out, PersistProposal | PersistLatest | PersistDropProposals):
            durable.apply(out)
        else:
            durable.check(out)


@attrs.frozen
class Update:
    """One ``Link.propose``: ``payer`` pays ``amount`` of ETH, the allocations computed on
    the state with digest ``parent``; ``digest`` is the state it proposed (None if the
    machine refused it before signing).  Update 0 is the Open (no parent)."""

    payer: int
    amount: int
    parent: bytes | None
    digest: bytes | None = None


@attrs.define(repr=False)
class Party:
    name: str
    me: int
    signer: Signer
    machine: ChannelMachine | None = None
    outbox: list[codec.Message] = attrs.Factory(list)
    outputs: list[Output] = attrs.Factory(list)
    durable: Durable = attrs.Factory(Durable)
    #: every state this party signed, by version (rule S: at most one per version)
    signed: dict[int, State] = attrs.Factory(dict)

    @property
    def m(self) -> ChannelMachine:
        assert self.machine is not None
        return self.machine

    def __repr__(self) -> str:
        return f"<{self.name}>"

    def of_type(self, cls: type) -> list[Any]:
        return [o for o in self.outputs if isinstance(o, cls)]

    def errors(self) -> list[Exception]:
        return [o.error for o in self.of_type(NotifyProtocolError)]


class Link:
    """Two machines and a FIFO queue per direction; tests deliver, hold, reorder or drop."""

    def __init__(
        self,
        *,
        policy_a: Policy | None = None,
        policy_b: Policy | None = None,
        window_a: int = 64,
        window_b: int = 64,
        balances: tuple[int, int] = (1000, 1000),
        defer: bool = False,
        keys: tuple[bytes, bytes] = (ALICE_KEY, BOB_KEY),
    ) -> None:
        #: Machines defer countersigning (the client's mode); like the client's reader,
        #: ``deliver`` then sends ActionCountersign once nothing more is queued for it.
        self.defer = defer
        #: ``keys``: participant 0's and 1's (the default gives participant 0 the lower address)
        self.a = Party("alice", 0, Signer.from_bytes(keys[0]))
        self.b = Party("bob", 1, Signer.from_bytes(keys[1]))
        self.params = Params.new(
            chain_id=31337,
            adjudicator=b"\xad" * 20,
            participants=(self.a.signer.address, self.b.signer.address),
            challenge_duration=3600,
            salt=b"\x5a" * 32,
        )
        self.policies = {0: policy_a, 1: policy_b}
        self.windows = {0: window_a, 1: window_b}
        self.initial = State.initial(
            self.params, [(ETH, balances[0], balances[1]), (TOKEN, 50, 50)]
        )
        #: co-signed states seen anywhere, by version (must be unique)
        self.cosigned: dict[int, State] = {}
        self.next_update_id = 1
        #: every update proposed through ``start`` and ``propose``, by update id
        self.updates: dict[int, Update] = {
            0: Update(0, 0, None, state_digest(self.params, self.initial))
        }
        #: how many ``propose`` calls found the proposer holding the peer's checked
        #: proposals (``deferred``): the case whose update must build on them
        self.proposed_while_holding = 0

    def other(self, p: Party) -> Party:
        return self.b if p is self.a else self.a

    def _record(self, p: Party, outputs: list[Output]) -> list[Output]:
        check_output_order(outputs, p.durable)
        p.outputs.extend(outputs)
        for out in outputs:
            if isinstance(out, SendMessage):
                p.outbox.append(out.msg)
            if isinstance(out, PersistProposal):
                self._signed_by(p, out.state)
            if isinstance(out, PersistLatest):
                self._cosigned(out.signed)
                self._signed_by(p, out.signed.state)
        return outputs

    def _signed_by(self, p: Party, state: State) -> None:
        prev = p.signed.setdefault(state.version, state)
        assert prev == state, f"{p.name} signed two states at v{state.version} (rule S)"

    def _cosigned(self, signed: SignedState) -> None:
        assert signed.fully_signed
        digest = state_digest(self.params, signed.state)
        for i in (0, 1):
            sig = signed.signatures[i]
            assert sig is not None
            verify(digest, sig, self.params.participants[i])
        prev = self.cosigned.setdefault(signed.state.version, signed.state)
        assert prev == signed.state, f"two co-signed states at v{signed.state.version}"

    # -- opening --------------------------------------------------------------

    def start(self) -> None:
        """Alice sends Open; nothing delivered yet."""
        m, outs = ChannelMachine.open(
            params=self.params,
            me=0,
            sign=self.a.signer.sign,
            initial=self.initial,
            update_id=0,
            policy=self.policies[0],
            window=self.windows[0],
            defer=self.defer,
        )
        self.a.machine = m
        self._record(self.a, outs)

    def open(self) -> None:
        """Open the channel and deliver everything: both hold v0 co-signed."""
        self.start()
        self.deliver_all()
        assert self.a.m.latest is not None and self.b.m.latest is not None

    # -- driving --------------------------------------------------------------

    def handle(self, p: Party, event: Any) -> list[Output]:
        return self._record(p, p.m.handle(event))

    def propose(self, p: Party, amount: int = 1, **kw: Any) -> list[Output]:
        """``p`` pays ``amount`` of ETH to the peer, on top of its tip."""
        uid = self.next_update_id
        self.next_update_id += 1
        tip = p.m.tip()
        allocs = transfer(tip, p.me, amount)
        self.proposed_while_holding += bool(p.m.deferred)
        self.updates[uid] = Update(p.me, amount, state_digest(self.params, tip))
        outs = self.handle(
            p, ActionPropose(update_id=uid, allocations=allocs, base_version=tip.version, **kw)
        )
        for o in outs:
            if isinstance(o, PersistProposal):
                digest = state_digest(self.params, o.state)
                self.updates[uid] = attrs.evolve(self.updates[uid], digest=digest)
        return outs

    def deliver(self, src: Party, index: int = 0, countersign: bool = True) -> list[Output]:
        """Deliver the ``index``-th queued message from ``src`` to its peer (via the codec).
        ``countersign=False``: the reader is not idle yet (more input may follow), so
        proposals it checked stay held even if nothing more is queued."""
        msg = codec.decode(codec.encode(src.outbox.pop(index)))
        dst = self.other(src)
        if isinstance(msg, Open):
            if dst.machine is not None:
                return []  # the driver answers a repeated Open from the store; not the machine's
            m, outs = ChannelMachine.accept_open(
                msg=msg,
                me=dst.me,
                sign=dst.signer.sign,
                policy=self.policies[dst.me],
                window=self.windows[dst.me],
                defer=self.defer,
            )
            dst.machine = m
            return self._record(dst, outs)
        if dst.machine is None:
            return []
        event = {
            Propose: ReceivePropose,
            Accept: ReceiveAccept,
            Reject: ReceiveReject,
            Sync: ReceiveSync,
        }[type(msg)](msg)
        outs = self.handle(dst, event)
        if self.defer and countersign and not src.outbox and dst.m.deferred:
            outs = outs + self.handle(dst, ActionCountersign())
        return outs

    def inject(self, dst: Party, msg: codec.Message) -> list[Output]:
        """Hand ``dst`` a message that did not come from its peer's machine."""
        src = self.other(dst)
        src.outbox.insert(0, msg)
        return self.deliver(src)

    def deliver_all(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if self.a.outbox:
                self.deliver(self.a)
            elif self.b.outbox:
                self.deliver(self.b)
            else:
                return
        raise AssertionError("link did not go quiet")

    def disconnect(self) -> None:
        self.a.outbox.clear()
        self.b.outbox.clear()

    def reconnect(self, first: Party | None = None) -> None:
        """Drop whatever is in flight, then both sides say ActionConnected."""
        self.disconnect()
        first = first or self.a
        for p in (first, self.other(first)):
            if p.machine is not None:
                self.handle(p, ActionConnected())


def transfer(tip: State, payer: int, amount: int, asset: bytes = ETH) -> tuple[Allocation, ...]:
    out = []
    for a in tip.allocations:
        if a.asset == asset:
            b = list(a.balances)
            b[payer] -= amount
            b[1 - payer] += amount
            a = attrs.evolve(a, balances=(b[0], b[1]))
        out.append(a)
    return tuple(out)


def swap_assets(tip: State, amount: int = 5) -> tuple[Allocation, ...]:
    """Participant 0's ETH turned into as much of the token: the sum over all assets is
    kept, but ETH's total falls by ``amount`` and the token's rises by as much."""
    out = []
    for a in tip.allocations:
        delta = -amount if a.asset == ETH else amount if a.asset == TOKEN else 0
        out.append(attrs.evolve(a, balances=(a.balances[0] + delta, a.balances[1])))
    return tuple(out)


def next_state(base: State, version: int, payer: int = 0, amount: int = 1, **kw: Any) -> State:
    return attrs.evolve(base, version=version, allocations=transfer(base, payer, amount), **kw)


def forge(link: Link, signer: Signer, base_version: int, state: State) -> Propose:
    return Propose(
        base_version=base_version,
        state=state,
        signature=signer.sign(state_digest(link.params, state)),
    )


def high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def snapshot(m: ChannelMachine) -> tuple[Any, ...]:
    return (m.latest, m.max_signed, tuple(m.pending))


# --- opening and lock-step -----------------------------------------------------


def test_open_cosigns_version_zero() -> None:
    """After Open and Accept both parties hold the same co-signed version 0."""
    link = Link()
    link.open()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.fully_signed
    assert link.a.m.latest.state.version == 0
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == [0]
    assert len(link.b.of_type(NotifyReceived)) == 1


def test_lock_step_updates() -> None:
    """Alternating single updates from both sides are each co-signed at version +1."""
    link = Link()
    link.open()
    for i in range(1, 11):
        p = link.a if i % 2 else link.b
        link.propose(p, amount=i)
        link.deliver_all()
        assert link.a.m.latest == link.b.m.latest
        assert link.a.m.latest is not None
        assert link.a.m.latest.state.version == i
        assert not link.a.m.pending and not link.b.m.pending
    latest = link.a.m.latest
    assert latest is not None
    eth = latest.state.allocation(ETH)
    assert eth.balances == (1000 - 25 + 30, 1000 + 25 - 30)
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)][1:] == [1, 3, 5, 7, 9]
    assert [n.update_id for n in link.b.of_type(NotifyAccepted)] == [2, 4, 6, 8, 10]


def test_pipelined_updates_accepted_in_order() -> None:
    """Several proposals before any delivery are all accepted, in order, versions +1 each."""
    link = Link()
    link.open()
    for _ in range(10):
        link.propose(link.a)
    pending = link.a.m.pending
    assert [f.proposal.state.version for f in pending] == list(range(1, 11))
    assert [f.proposal.base_version for f in pending] == list(range(0, 10))
    link.deliver_all()
    accepted = link.a.of_type(NotifyAccepted)[1:]
    assert [n.signed.state.version for n in accepted] == list(range(1, 11))
    assert [n.update_id for n in accepted] == list(range(1, 11))
    assert link.a.m.latest == link.b.m.latest
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 10
    assert link.b.m.latest.state.allocation(ETH).balances == (990, 1010)


def test_pipelining_before_open_completes() -> None:
    """Proposals pipelined on top of the unacknowledged Open are accepted after it."""
    link = Link()
    link.start()
    link.propose(link.a)
    link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 2


def test_conservation_violation_by_caller_raises() -> None:
    """A caller's update that changes an asset's total raises LocalProtocolError, no effect."""
    link = Link()
    link.open()
    before = snapshot(link.a.m)
    tip = link.a.m.tip()
    minted = tuple(
        attrs.evolve(a, balances=(a.balances[0] + 1, a.balances[1])) for a in tip.allocations
    )
    dropped_asset = tip.allocations[:1]
    reordered = tuple(reversed(tip.allocations))
    for allocs in (minted, dropped_asset, reordered):
        with pytest.raises(LocalProtocolError):
            link.a.m.handle(
                ActionPropose(update_id=99, allocations=allocs, base_version=tip.version)
            )
        assert snapshot(link.a.m) == before
    assert not link.a.outbox


def _hold_bobs_pay(link: Link, amount: int) -> Propose:
    """Bob pays ``amount``; alice checks his proposal and holds it for countersigning, as
    the client's reader does until it has handled everything it read."""
    link.propose(link.b, amount)
    msg = codec.decode(codec.encode(link.b.outbox.pop(0)))
    assert isinstance(msg, Propose)
    assert link.handle(link.a, ReceivePropose(msg)) == []
    assert link.a.m.deferred
    return msg


def test_an_update_proposed_while_the_peers_awaits_countersignature_builds_on_it() -> None:
    """A proposal of ours made while the peer's checked proposal awaits our countersignature
    builds on that proposal: ``tip()`` is its state, and the end state holds both pays.
    (Computed on the older latest and numbered on top of the peer's, ours undid the
    peer's pay, which the peer had seen co-signed.)"""
    link = Link(defer=True)
    link.open()
    start = link.initial.allocations[0].balances
    held = _hold_bobs_pay(link, 4)
    assert link.a.m.tip() == held.state
    link.propose(link.a, 7)
    link.deliver_all()
    latest = link.a.m.latest
    assert latest is not None and latest == link.b.m.latest
    assert latest.state.allocations[0].balances == (start[0] + 4 - 7, start[1] - 4 + 7)
    assert latest.state.version == held.state.version + 1


def test_an_update_computed_on_a_state_that_is_no_longer_the_tip_is_refused() -> None:
    """An update computed on the latest while the peer's proposal is held is refused with
    LocalProtocolError before anything is signed: nothing changes, the held proposal is
    still held, and the channel goes on with the peer's pay in it."""
    link = Link(defer=True)
    link.open()
    _hold_bobs_pay(link, 4)
    latest = link.a.m.latest
    assert latest is not None
    before, held = snapshot(link.a.m), list(link.a.m.deferred)
    outputs_before = len(link.a.outputs)
    stale = ActionPropose(
        update_id=99, allocations=transfer(latest.state, 0, 7), base_version=latest.state.version
    )
    with pytest.raises(LocalProtocolError, match="computed on v0"):
        link.handle(link.a, stale)
    assert snapshot(link.a.m) == before and link.a.m.deferred == held
    assert len(link.a.outputs) == outputs_before
    link.handle(link.a, ActionCountersign())
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 1


def test_a_held_proposal_failing_its_signature_turns_ours_into_a_retryable_notice() -> None:
    """If the peer's held proposal fails its signature check when ours makes us countersign,
    it is rejected and the tip moves back: ours, computed on it, is not signed; it comes
    back as a retryable NotifyRejected (the client computes it again) beside the Reject."""
    link = Link(defer=True)
    link.open()
    held = _hold_bobs_pay(link, 4)
    link.a.m.deferred.clear()
    forged = attrs.evolve(held, signature=Signer.generate().sign(b"\x01" * 32))
    assert link.handle(link.a, ReceivePropose(forged)) == []
    max_signed = link.a.m.max_signed
    tip = link.a.m.tip()
    outs = link.handle(
        link.a,
        ActionPropose(update_id=42, allocations=transfer(tip, 0, 7), base_version=tip.version),
    )
    assert not any(isinstance(o, PersistProposal) for o in outs)
    assert link.a.m.max_signed == max_signed and not link.a.m.pending
    (reject,) = [o.msg for o in outs if isinstance(o, SendMessage)]
    assert isinstance(reject, Reject) and reject.reason.startswith("InvalidSignature")
    (notice,) = [o for o in outs if isinstance(o, NotifyRejected)]
    assert notice.update_id == 42 and notice.retryable


def test_an_accept_for_a_proposal_that_skipped_versions_completes_it() -> None:
    """In-flight versions need not be consecutive: a proposal made after learning of higher
    versions of the peer's (its crossing proposals, a Sync) numbers above them.  The
    peer's one Accept for it (deferred countersigning) completes it and every one before
    it; the index is looked up by version, not computed from the first one's."""
    link = Link(defer=True)
    link.open()
    link.propose(link.a)
    link.propose(link.a)
    link.a.m.peer_max_signed = 10  # as if the peer had signed (burned) v3..v10 meanwhile
    link.propose(link.a)
    assert [f.proposal.state.version for f in link.a.m.pending] == [1, 2, 11]
    link.deliver_all()
    assert not link.a.m.pending
    latest = link.a.m.latest
    assert latest is not None and latest.state.version == 11 and latest == link.b.m.latest
    accepted = [o.update_id for o in link.a.outputs if isinstance(o, NotifyAccepted)]
    assert len(accepted) == 4  # the open and the three pays


def test_moving_value_between_assets_is_refused_by_the_proposer() -> None:
    """Conservation holds per asset, not in sum: a caller's update that turns 5 ETH into
    5 tokens raises LocalProtocolError and has no effect (nothing signed, persisted or
    sent).  (The responder's side is the "asset-swap" bad case.)"""
    link = Link()
    link.open()
    tip = link.a.m.tip()
    allocs = swap_assets(tip)
    assert sum(a.total for a in allocs) == sum(a.total for a in tip.allocations)
    before = snapshot(link.a.m)
    outputs_before = len(link.a.outputs)
    with pytest.raises(LocalProtocolError, match="total"):
        link.handle(
            link.a, ActionPropose(update_id=99, allocations=allocs, base_version=tip.version)
        )
    assert snapshot(link.a.m) == before
    assert len(link.a.outputs) == outputs_before
    assert not link.a.outbox
    assert 1 not in link.a.signed


def test_window_full_raises() -> None:
    """With the pipeline window full, another proposal raises LocalProtocolError, no effect."""
    link = Link(window_a=3)
    link.open()
    for _ in range(3):
        link.propose(link.a)
    before = snapshot(link.a.m)
    with pytest.raises(LocalProtocolError):
        link.propose(link.a)
    assert snapshot(link.a.m) == before
    link.deliver_all()
    link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 4


def test_propose_on_final_state_raises() -> None:
    """After a final state is in flight or co-signed, proposing raises LocalProtocolError."""
    link = Link()
    link.open()
    link.propose(link.a, is_final=True)
    with pytest.raises(LocalProtocolError):
        link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest is not None and link.a.m.latest.state.is_final
    for p in (link.a, link.b):
        with pytest.raises(LocalProtocolError):
            link.propose(p)


# --- the responder refuses bad proposals -------------------------------------------


def _bad_proposals(link: Link) -> dict[str, tuple[Propose, type[Exception]]]:
    """Proposals from (or pretending to be from) alice that bob must refuse, at latest v2."""
    latest = link.b.m.latest
    assert latest is not None
    base = latest.state
    v = link.b.m.max_signed + 1
    alice, bob = link.a.signer, link.b.signer
    stranger = Signer.from_bytes(b"\x03" * 32)
    good = next_state(base, v)
    honest = forge(link, alice, base.version, good)
    other_params = attrs.evolve(link.params, salt=b"\x00" * 32)
    other_chain = attrs.evolve(link.params, chain_id=1)
    other_adjudicator = attrs.evolve(link.params, adjudicator=Address(b"\xae" * 20))
    wrong_cid = attrs.evolve(good, channel_id=ChannelId(other_params.channel_id))
    minted = attrs.evolve(
        good, allocations=(attrs.evolve(good.allocations[0], locked=1), *good.allocations[1:])
    )
    swapped = attrs.evolve(good, allocations=swap_assets(base))
    assert sum(swapped.totals().values()) == sum(base.totals().values())
    prev_cosigned = link.b.m.latest
    assert prev_cosigned is not None
    return {
        "bad-signature": (attrs.evolve(honest, signature=b"\x11" * 64 + b"\x1b"), InvalidSignature),
        "sig-over-other-state": (
            attrs.evolve(honest, signature=alice.sign(state_digest(link.params, base))),
            InvalidSignature,
        ),
        "other-chain-id": (
            attrs.evolve(honest, signature=alice.sign(state_digest(other_chain, good))),
            InvalidSignature,
        ),
        "other-adjudicator": (
            attrs.evolve(honest, signature=alice.sign(state_digest(other_adjudicator, good))),
            InvalidSignature,
        ),
        "high-s": (attrs.evolve(honest, signature=high_s(honest.signature)), InvalidSignature),
        "v-0": (attrs.evolve(honest, signature=honest.signature[:64] + b"\x00"), InvalidSignature),
        "wrong-key-stranger": (forge(link, stranger, base.version, good), InvalidSignature),
        "wrong-key-own": (forge(link, bob, base.version, good), InvalidSignature),
        "replayed-version": (forge(link, alice, base.version - 1, base), StaleVersion),
        "rolled-back-version": (
            forge(link, alice, base.version, next_state(base, base.version - 1)),
            StaleVersion,
        ),
        "same-version": (
            forge(link, alice, base.version, next_state(base, base.version)),
            StaleVersion,
        ),
        "wrong-base-version": (forge(link, alice, base.version - 1, good), StaleVersion),
        "base-from-future": (forge(link, alice, base.version + 1, good), StaleVersion),
        "wrong-channel-id": (forge(link, alice, base.version, wrong_cid), WrongChannel),
        "conservation": (forge(link, alice, base.version, minted), ConservationError),
        "asset-dropped": (
            forge(link, alice, base.version, attrs.evolve(good, allocations=good.allocations[:1])),
            ConservationError,
        ),
        "asset-swap": (forge(link, alice, base.version, swapped), ConservationError),
        # A valid uint64 on the wire and signed, but past what a store can keep (SQLite's
        # int64): it used to stop the responder's client (OverflowError in the store).
        "version-past-int64": (
            forge(link, alice, base.version, next_state(base, MAX_VERSION + 1)),
            StaleVersion,
        ),
    }


BAD_CASES = [
    "bad-signature",
    "sig-over-other-state",
    "other-chain-id",
    "other-adjudicator",
    "high-s",
    "v-0",
    "wrong-key-stranger",
    "wrong-key-own",
    "replayed-version",
    "rolled-back-version",
    "same-version",
    "wrong-base-version",
    "base-from-future",
    "wrong-channel-id",
    "conservation",
    "asset-dropped",
    "asset-swap",
    "version-past-int64",
]


def test_a_proposal_built_on_a_held_one_must_be_newer_and_not_follow_a_final_one() -> None:
    """Checked against the peer's proposal that awaits our countersignature (the tip the
    next one builds on), a proposal at that same version, or after a final one, is
    refused: versions go up by one per state, and nothing follows a final state."""
    link = Link(defer=True)
    link.open()
    held = _hold_bobs_pay(link, 4)
    tip = held.state
    same = forge(link, link.b.signer, tip.version, next_state(tip, tip.version, payer=1))
    outs = link.handle(link.a, ReceivePropose(same))
    assert isinstance(outs[-1], NotifyProtocolError)
    assert isinstance(outs[-1].error, StaleVersion)
    # The held one, checked before, stays accepted: countersigned first.
    latest = link.a.m.latest
    assert latest is not None and latest.state == tip

    link = Link(defer=True)
    link.open()
    base = link.a.m.tip()
    final = next_state(base, base.version + 1, payer=1, is_final=True)
    held_final = forge(link, link.b.signer, base.version, final)
    assert link.handle(link.a, ReceivePropose(held_final)) == []
    after = forge(link, link.b.signer, final.version, next_state(final, final.version + 1, payer=1))
    outs = link.handle(link.a, ReceivePropose(after))
    assert isinstance(outs[-1], NotifyProtocolError)
    assert isinstance(outs[-1].error, ChannelFinal)
    latest = link.a.m.latest
    assert latest is not None and latest.state == final


def test_our_own_proposal_past_the_highest_version_is_refused_before_signing() -> None:
    """A channel whose versions reached MAX_VERSION takes no more updates of ours."""
    link = Link()
    link.open()
    link.a.m.peer_max_signed = MAX_VERSION
    before = snapshot(link.a.m)
    with pytest.raises(LocalProtocolError, match="used up its versions"):
        link.propose(link.a)
    assert snapshot(link.a.m) == before


def _open_at_v2(defer: bool = False) -> Link:
    link = Link(defer=defer)
    link.open()
    link.propose(link.a)
    link.deliver_all()
    link.propose(link.b)
    link.deliver_all()
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 2
    return link


DEFER = pytest.mark.parametrize("defer", [False, True], ids=["countersign-each", "deferred"])


@DEFER
@pytest.mark.parametrize("case", BAD_CASES)
def test_responder_rejects_bad_proposal_and_keeps_working(case: str, defer: bool) -> None:
    """A bad proposal gets a Reject and a typed NotifyProtocolError; state is unchanged and
    nothing is persisted; an honest proposal afterwards is accepted.  With ``defer`` (the
    client's mode) the link reads the proposal, then sends ActionCountersign as the reader
    goes idle, and the refusal is the same."""
    link = _open_at_v2(defer)
    proposal, err_type = _bad_proposals(link)[case]
    before = snapshot(link.b.m)
    outs = link.inject(link.b, proposal)
    assert snapshot(link.b.m) == before
    assert not link.b.m.deferred
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    reject = outs[0].msg
    assert isinstance(reject, Reject)
    assert reject.version == proposal.state.version
    assert reject.state_hash == state_digest(link.params, proposal.state)
    assert reject.reason.startswith(err_type.__name__)
    assert isinstance(outs[1].error, err_type)
    assert not any(
        isinstance(o, PersistLatest | PersistProposal | PersistDropProposals) for o in outs
    )
    # The Reject reaches alice, who never sent that proposal: she ignores it.
    a_before = snapshot(link.a.m)
    assert link.deliver(link.b) == []
    assert snapshot(link.a.m) == a_before
    # The channel keeps working with the honest peer.
    link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 3


@DEFER
@pytest.mark.parametrize("case", BAD_CASES)
def test_peer_rejections_are_remote_errors(case: str, defer: bool) -> None:
    """Every refusal of a peer's proposal is a RemoteProtocolError or ConservationError."""
    link = _open_at_v2(defer)
    proposal, _ = _bad_proposals(link)[case]
    outs = link.inject(link.b, proposal)
    assert isinstance(outs[1].error, RemoteProtocolError | ConservationError)


def _finalised() -> Link:
    link = Link()
    link.open()
    link.propose(link.a, is_final=True)
    link.deliver_all()
    assert link.b.m.latest is not None and link.b.m.latest.state.is_final
    return link


def test_proposal_on_final_state_rejected() -> None:
    """A peer's proposal on top of a final co-signed state is refused; state unchanged."""
    link = _finalised()
    latest = link.b.m.latest
    assert latest is not None
    bad = forge(link, link.a.signer, 1, next_state(latest.state, 2, is_final=False))
    before = snapshot(link.b.m)
    outs = link.inject(link.b, bad)
    assert snapshot(link.b.m) == before
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    assert isinstance(outs[0].msg, Reject)


def test_proposal_on_final_state_is_a_remote_error() -> None:
    """A peer's proposal on a final state is the peer's fault: a RemoteProtocolError."""
    link = _finalised()
    latest = link.b.m.latest
    assert latest is not None
    bad = forge(link, link.a.signer, 1, next_state(latest.state, 2, is_final=False))
    outs = link.inject(link.b, bad)
    assert isinstance(outs[1].error, RemoteProtocolError)


def test_policy_rejection() -> None:
    """A policy veto answers with a non-retryable Reject carrying the reason (UpdateRejected);
    the proposer drops it and the next acceptable proposal goes through."""
    limit = 5

    def policy(params: Params, latest: State, proposed: State) -> str | None:
        paid = latest.allocation(ETH).balances[0] - proposed.allocation(ETH).balances[0]
        return f"risk limit: {paid} > {limit}" if paid > limit else None

    link = Link(policy_b=policy)
    link.open()
    link.propose(link.a, amount=10)
    link.deliver(link.a)
    errs = link.b.errors()
    assert len(errs) == 1 and isinstance(errs[0], UpdateRejected)
    assert errs[0].reason == "risk limit: 10 > 5"
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 0
    link.deliver_all()
    (rej,) = link.a.of_type(NotifyRejected)
    assert rej.version == 1 and not rej.retryable and "risk limit" in rej.reason
    assert not link.a.m.pending
    assert link.a.m.max_signed == 1  # burned
    link.propose(link.a, amount=3)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 2


def test_bad_accept_is_ignored() -> None:
    """An Accept with a bad signature, wrong channel or unexpected version changes nothing."""
    link = Link()
    link.open()
    link.propose(link.a)
    honest = link.b.m
    assert honest.latest is not None
    prop = link.a.m.pending[0]
    cases = [
        Accept(channel_id=prop.proposal.state.channel_id, version=1, signature=b"\x01" * 65),
        Accept(
            channel_id=prop.proposal.state.channel_id,
            version=1,
            signature=Signer.from_bytes(b"\x03" * 32).sign(prop.digest),
        ),
        Accept(
            channel_id=prop.proposal.state.channel_id,
            version=1,
            signature=high_s(link.b.signer.sign(prop.digest)),
        ),
        Accept(
            channel_id=ChannelId(b"\x00" * 32), version=1, signature=link.b.signer.sign(prop.digest)
        ),
        Accept(
            channel_id=prop.proposal.state.channel_id,
            version=2,
            signature=link.b.signer.sign(prop.digest),
        ),
    ]
    for acc in cases:
        before = snapshot(link.a.m)
        outs = link.inject(link.a, acc)
        assert snapshot(link.a.m) == before
        assert [type(o) for o in outs] == [NotifyProtocolError]
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 1


def test_unknown_input_raises_type_error() -> None:
    """An input type the machine does not know is a bug and raises TypeError."""
    link = Link()
    link.open()
    with pytest.raises(TypeError):
        link.a.m.handle(object())  # type: ignore[arg-type]


# --- conflicts ---------------------------------------------------------------------


def test_conflict_both_rejected_and_retry_succeeds() -> None:
    """Crossing proposals are both refused as retryable conflicts, neither latest moves, both
    versions are burned, and a retry then succeeds."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.propose(link.b)
    link.deliver_all()
    for p in (link.a, link.b):
        (rej,) = p.of_type(NotifyRejected)
        assert rej.retryable and rej.version == 1
        assert rej.reason.startswith(ProposalConflict.__name__)
        assert any(isinstance(e, ProposalConflict) for e in p.errors())
        assert p.m.latest is not None and p.m.latest.state.version == 0
        assert p.m.max_signed == 1
        assert not p.m.pending
    # exactly one side yields
    assert link.a.m.should_yield != link.b.m.should_yield
    retrier = link.b if link.a.m.should_yield else link.a
    link.propose(retrier)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 2


def test_pipelined_proposals_after_conflict_all_dropped() -> None:
    """When the head of a pipeline is rejected, every proposal built on it is dropped too."""
    link = Link()
    link.open()
    for _ in range(4):
        link.propose(link.a)
    link.propose(link.b)
    link.deliver_all()
    rejected = link.a.of_type(NotifyRejected)
    assert [r.version for r in rejected] == [1, 2, 3, 4]
    assert all(r.retryable for r in rejected)
    assert not link.a.m.pending and link.a.m.max_signed == 4
    drops = link.a.of_type(PersistDropProposals)
    assert drops and drops[0].from_version == 1
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 0
    link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 5


# --- who wins a conflict: the lower address ------------------------------------------

#: The lower address is participant 0's, or participant 1's (the two keys swapped); the
#: second value is the winner's index, checked against the addresses by ``_winner_and_loser``.
ORDERS = pytest.mark.parametrize(
    ("keys", "winner_index"),
    [((ALICE_KEY, BOB_KEY), 0), ((BOB_KEY, ALICE_KEY), 1)],
    ids=["lower-is-0", "lower-is-1"],
)


def _winner_and_loser(link: Link, winner_index: int) -> tuple[Party, Party]:
    """The party with the lower address (the winner of a conflict), and the other."""
    winner = min((link.a, link.b), key=lambda p: p.signer.address)
    loser = link.other(winner)
    assert winner.me == winner_index
    assert not winner.m.should_yield and loser.m.should_yield
    return winner, loser


def _refuse_payments_over(payer: int, limit: int) -> Policy:
    def policy(params: Params, latest: State, proposed: State) -> str | None:
        paid = latest.allocation(ETH).balances[payer] - proposed.allocation(ETH).balances[payer]
        return f"risk limit: {paid} > {limit}" if paid > limit else None

    return policy


def _winner_burned_a_version(
    keys: tuple[bytes, bytes], winner_index: int, defer: bool
) -> tuple[Link, Party, Party]:
    """An open channel where the loser's policy refused the winner's v1: the winner has
    signed (burned) v1, the loser has signed nothing above v0 and never saw v1 signed — so
    the winner's next proposal is numbered above everything the loser signed."""
    policy = _refuse_payments_over(winner_index, 5)
    link = Link(
        keys=keys,
        defer=defer,
        policy_a=policy if winner_index == 1 else None,
        policy_b=policy if winner_index == 0 else None,
    )
    link.open()
    w, lo = _winner_and_loser(link, winner_index)
    link.propose(w, amount=10)
    link.deliver_all()
    (refused,) = w.of_type(NotifyRejected)
    assert refused.version == 1 and not refused.retryable
    assert (w.m.max_signed, lo.m.max_signed, lo.m.peer_max_signed) == (1, 0, 0)
    assert w.m.latest == lo.m.latest
    assert lo.m.latest is not None and lo.m.latest.state.version == 0
    return link, w, lo


def _only_proposal(p: Party) -> Propose:
    (msg,) = p.outbox
    assert isinstance(msg, Propose)
    return msg


def _retryable_conflicts(p: Party) -> list[int]:
    """The versions of ``p``'s updates dropped as retryable conflicts, in order."""
    out = []
    for n in p.of_type(NotifyRejected):
        if n.retryable and n.reason.startswith(ProposalConflict.__name__):
            out.append(n.version)
    return out


def _both_hold(link: Link, state: State) -> None:
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.fully_signed
    assert link.a.m.latest.state == state
    assert not link.a.m.pending and not link.b.m.pending


def _retry_both(link: Link, w: Party, lo: Party) -> None:
    """The winner retries first, then the loser (the client's turn-taking); each lands on
    top of the one before and both end on the same co-signed state."""
    for p, amount in ((w, 2), (lo, 3)):
        start = p.m.latest
        assert start is not None
        uid = link.next_update_id
        link.propose(p, amount=amount)
        link.deliver_all()
        latest = p.m.latest
        assert latest is not None
        assert latest.state.version > start.state.version
        assert latest.state.allocations == transfer(start.state, p.me, amount)
        assert [n.signed for n in p.of_type(NotifyAccepted) if n.update_id == uid] == [latest]
        _both_hold(link, latest.state)


@DEFER
@ORDERS
def test_the_loser_yields_to_a_crossing_proposal_above_all_it_signed(
    keys: tuple[bytes, bytes], winner_index: int, defer: bool
) -> None:
    """Both propose at once and the lower address wins: the loser countersigns the winner's
    crossing proposal (it builds on the loser's latest and is numbered above all the loser
    signed) and drops its own as a retryable conflict; the winner refuses the loser's and
    keeps its own.  Both then hold the winner's state co-signed; the loser's retry lands on
    top of it."""
    link, w, lo = _winner_burned_a_version(keys, winner_index, defer)
    link.propose(w, amount=2)
    link.propose(lo, amount=3)
    win, lose = _only_proposal(w), _only_proposal(lo)
    assert (win.base_version, win.state.version) == (0, 2)
    assert (lose.base_version, lose.state.version) == (0, 1)
    win_uid, lose_uid = w.m.pending[0].update_id, lo.m.pending[0].update_id
    loser_errors = len(lo.errors())

    outs = link.deliver(w)  # the loser reads the winner's proposal: it yields
    assert [type(o) for o in outs] == [
        PersistDropProposals,
        NotifyRejected,
        PersistLatest,
        SendMessage,
        NotifyReceived,
    ]
    dropped = outs[1]
    assert (dropped.update_id, dropped.version) == (lose_uid, 1)
    assert dropped.retryable and dropped.reason.startswith(ProposalConflict.__name__)
    assert isinstance(outs[3].msg, Accept) and outs[3].msg.version == 2
    assert not lo.m.pending
    assert lo.m.latest is not None and lo.m.latest.state == win.state

    outs = link.deliver(lo)  # the winner reads the loser's: refused, its own stays in flight
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    reject = outs[0].msg
    assert isinstance(reject, Reject) and reject.version == 1
    assert reject.reason.startswith(ProposalConflict.__name__)
    assert isinstance(outs[1].error, ProposalConflict)
    assert [f.proposal for f in w.m.pending] == [win]

    link.deliver_all()  # the loser's Accept reaches the winner; its Reject finds nothing
    _both_hold(link, win.state)
    assert link.cosigned == {0: link.initial, 2: win.state}
    assert [n.signed.state for n in w.of_type(NotifyAccepted) if n.update_id == win_uid] == [
        win.state
    ]
    assert lo.of_type(NotifyRejected) == [dropped]
    assert not [n for n in lo.of_type(NotifyAccepted) if n.update_id == lose_uid]
    assert len(lo.errors()) == loser_errors
    assert lo.signed[1] == lose.state and lo.signed[2] == win.state
    _retry_both(link, w, lo)


@DEFER
@ORDERS
def test_a_same_version_crossing_is_refused_by_both_then_retries_land(
    keys: tuple[bytes, bytes], winner_index: int, defer: bool
) -> None:
    """Both propose the same version at once: the loser cannot take the winner's proposal,
    having signed that version itself (rule S), so each side refuses the other's as a
    retryable conflict.  Neither is co-signed, both stay on the same latest, each knows the
    version the other burned, and the retries (the winner's first) land on top."""
    link = Link(keys=keys, defer=defer)
    link.open()
    w, lo = _winner_and_loser(link, winner_index)
    link.propose(w, amount=2)
    link.propose(lo, amount=3)
    win, lose = _only_proposal(w), _only_proposal(lo)
    assert win.state.version == lose.state.version == 1
    for src in (w, lo):  # each reads the other's proposal and refuses it
        before = snapshot(link.other(src).m)
        outs = link.deliver(src)
        assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
        assert isinstance(outs[0].msg, Reject)
        assert outs[0].msg.reason.startswith(ProposalConflict.__name__)
        assert isinstance(outs[1].error, ProposalConflict)
        assert snapshot(link.other(src).m) == before
    link.deliver_all()
    for p, own in ((w, win), (lo, lose)):
        assert _retryable_conflicts(p) == [1]
        assert p.signed[1] == own.state
        assert (p.m.max_signed, p.m.peer_max_signed) == (1, 1)
    _both_hold(link, link.initial)
    assert 1 not in link.cosigned
    _retry_both(link, w, lo)
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 3


@DEFER
@ORDERS
def test_the_loser_refuses_a_crossing_proposal_not_built_on_its_latest(
    keys: tuple[bytes, bytes], winner_index: int, defer: bool
) -> None:
    """The loser yields only to a proposal built on its latest co-signed state: the winner's
    second pipelined proposal, delivered first by the network, is refused as a retryable
    ProposalConflict (the loser keeps its own in flight); the first, arriving next, is taken.
    After the retries both hold the same state."""
    link, w, lo = _winner_burned_a_version(keys, winner_index, defer)
    link.propose(w, amount=2)
    link.propose(w, amount=2)
    link.propose(lo, amount=3)
    first, second = w.outbox
    assert isinstance(first, Propose) and isinstance(second, Propose)
    assert (first.base_version, first.state.version) == (0, 2)
    assert (second.base_version, second.state.version) == (2, 3)
    before = snapshot(lo.m)
    outs = link.deliver(w, 1)  # reordered: the second one first
    assert snapshot(lo.m) == before
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    assert isinstance(outs[0].msg, Reject) and outs[0].msg.version == 3
    assert outs[0].msg.reason.startswith(ProposalConflict.__name__)
    assert isinstance(outs[1].error, ProposalConflict)
    assert 3 not in lo.signed
    link.deliver(w)  # the first: on the loser's latest, above all it signed
    assert lo.m.latest is not None and lo.m.latest.state == first.state
    link.deliver_all()
    _both_hold(link, first.state)
    assert _retryable_conflicts(w) == [3]
    assert _retryable_conflicts(lo) == [1]
    assert link.cosigned == {0: link.initial, 2: first.state}
    _retry_both(link, w, lo)


@DEFER
@ORDERS
def test_the_loser_refuses_a_proposal_colliding_with_a_version_it_signed(
    keys: tuple[bytes, bytes], winner_index: int, defer: bool
) -> None:
    """A proposal built on our latest, at a version we signed ourselves (our crossing
    proposal, already refused and dropped), is a retryable ProposalConflict: neither taken
    (rule S) nor called a replay.  Here the winner's Reject overtakes its own proposal."""
    link = Link(keys=keys, defer=defer)
    link.open()
    w, lo = _winner_and_loser(link, winner_index)
    link.propose(w, amount=2)
    link.propose(lo, amount=3)
    win, lose = _only_proposal(w), _only_proposal(lo)
    link.deliver(lo)  # the winner refuses the loser's v1; its Reject queues behind its v1
    assert [type(m) for m in w.outbox] == [Propose, Reject]
    link.deliver(w, 1)  # reordered: the loser reads the Reject first and drops its v1
    assert not lo.m.pending and lo.m.max_signed == 1
    assert _retryable_conflicts(lo) == [1]
    before = snapshot(lo.m)
    outs = link.deliver(w)  # now the winner's v1, built on the loser's latest v0
    assert snapshot(lo.m) == before
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    assert isinstance(outs[0].msg, Reject) and outs[0].msg.version == 1
    assert outs[0].msg.reason.startswith(ProposalConflict.__name__)
    assert isinstance(outs[1].error, ProposalConflict)
    assert lo.signed[1] == lose.state
    link.deliver_all()
    assert _retryable_conflicts(w) == [1]
    assert w.signed[1] == win.state
    _both_hold(link, link.initial)
    assert 1 not in link.cosigned
    _retry_both(link, w, lo)


# --- resync ------------------------------------------------------------------------


def test_resync_after_lost_accept() -> None:
    """When the proposer's Accept is lost, Sync brings it to the same latest and notifies it."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.deliver(link.a)  # bob accepts; his Accept is now queued
    link.disconnect()  # ... and lost
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 0
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest.state.version == 1
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == [0, 1]
    assert not link.a.m.pending
    assert not link.a.errors() and not link.b.errors()


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_resync_completes_undelivered_proposal(first: str) -> None:
    """A proposal that never reached the peer is completed through Sync after reconnect."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.reconnect(first=link.a if first == "alice" else link.b)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 1
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == [0, 1]


def test_resync_completes_undelivered_pipeline() -> None:
    """A whole undelivered pipeline is completed through Sync, in order."""
    link = Link()
    link.open()
    for _ in range(5):
        link.propose(link.a)
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 5
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == [0, 1, 2, 3, 4, 5]


def test_resync_after_open_accept_lost() -> None:
    """If bob's Accept of the Open is lost, Sync finishes opening on alice's side."""
    link = Link()
    link.start()
    link.deliver(link.a)
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 0


def test_resync_both_pending() -> None:
    """When both sides have an undelivered proposal, Sync resolves them: same latest after."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.propose(link.b)
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert not link.a.m.pending and not link.b.m.pending
    link.propose(link.a)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest


def test_resync_both_pending_one_delivered() -> None:
    """One side's proposal was accepted before the drop, the other's not: resync converges."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.deliver(link.a)  # bob accepts v1
    link.propose(link.b)  # bob proposes v2 on v1; alice still awaits Accept v1
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert not link.a.m.pending and not link.b.m.pending
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 2


def test_resync_after_lost_accepts_of_pipeline() -> None:
    """Every pipelined proposal the peer accepted is reported accepted after resync."""
    link = Link()
    link.open()
    for _ in range(3):
        link.propose(link.a)
    for _ in range(3):
        link.deliver(link.a)  # bob accepts v1..v3; all three Accepts get lost
    link.reconnect()
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 3
    assert not link.a.of_type(NotifyRejected)
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == [0, 1, 2, 3]


def test_resync_of_a_window_larger_than_one_frame() -> None:
    """Twenty in-flight proposals with 8 KB of app data each (160 KB, far over one
    frame) all resync: the Sync and each re-sent proposal are frames of their own."""
    link = Link()
    link.open()
    for _ in range(20):
        link.propose(link.a, app_data=b"\x5a" * 8000)
    link.reconnect()
    assert all(len(codec.encode(m)) <= MAX_FRAME for m in link.a.outbox)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 20
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)] == list(range(21))
    assert not link.a.errors() and not link.b.errors()


def test_replayed_proposal_is_still_refused_outside_a_resync() -> None:
    """Skipping re-sent proposals is only for the ones right after a Sync: the same old
    proposal replayed later is refused as stale, and nothing changes."""
    link = Link()
    link.open()
    link.propose(link.a)
    old = link.a.outbox[0]
    link.deliver_all()
    link.reconnect()
    link.deliver_all()
    before = link.b.m.latest
    link.propose(link.a)
    link.deliver_all()  # an Accept: the resync is over
    outs = link.inject(link.b, old)
    assert any(isinstance(o, SendMessage) and isinstance(o.msg, Reject) for o in outs)
    assert isinstance(link.b.errors()[-1], StaleVersion)
    assert link.b.m.latest is not None and link.b.m.latest.state.version == 2
    assert before is not None and before.state.version == 1


def _forged_sync(link: Link, mutate: Callable[[SignedState, State], SignedState]) -> Sync:
    latest = link.b.m.latest
    assert latest is not None
    newer = next_state(latest.state, latest.state.version + 1)
    digest = state_digest(link.params, newer)
    honest = SignedState(
        state=newer, signatures=(link.a.signer.sign(digest), link.b.signer.sign(digest))
    )
    return Sync(latest=mutate(honest, newer), max_signed=newer.version, pending=())


@pytest.mark.parametrize(
    "case",
    [
        "bad-sig-0",
        "bad-sig-1",
        "missing-sig",
        "high-s",
        "wrong-key",
        "minted",
        "asset-swap",
        "other-channel",
    ],
)
def test_sync_with_forged_newer_state_refused(case: str) -> None:
    """A Sync carrying a newer 'co-signed' state that is not genuinely co-signed (or breaks
    conservation, or names another channel) is refused with a typed error; nothing changes."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.deliver_all()
    stranger = Signer.from_bytes(b"\x03" * 32)

    def mutate(s: SignedState, st_: State) -> SignedState:
        sig0, sig1 = s.signatures
        assert sig0 is not None and sig1 is not None
        d = state_digest(link.params, st_)
        if case == "bad-sig-0":
            return attrs.evolve(s, signatures=(b"\x01" * 65, sig1))
        if case == "bad-sig-1":
            return attrs.evolve(s, signatures=(sig0, sig1[:-1] + b"\x1c"))
        if case == "missing-sig":
            return attrs.evolve(s, signatures=(None, sig1))
        if case == "high-s":
            return attrs.evolve(s, signatures=(high_s(sig0), sig1))
        if case == "wrong-key":
            return attrs.evolve(s, signatures=(stranger.sign(d), sig1))
        if case == "minted":
            bad = attrs.evolve(
                st_, allocations=(attrs.evolve(st_.allocations[0], locked=7), *st_.allocations[1:])
            )
            bd = state_digest(link.params, bad)
            return SignedState(
                state=bad, signatures=(link.a.signer.sign(bd), link.b.signer.sign(bd))
            )
        if case == "asset-swap":
            bad = attrs.evolve(st_, allocations=swap_assets(st_))
            bd = state_digest(link.params, bad)
            return SignedState(
                state=bad, signatures=(link.a.signer.sign(bd), link.b.signer.sign(bd))
            )
        other = attrs.evolve(st_, channel_id=ChannelId(b"\x00" * 32))
        return attrs.evolve(s, state=other)

    expected = {
        "minted": ConservationError,
        "asset-swap": ConservationError,
        "other-channel": WrongChannel,
    }.get(case, InvalidSignature)
    sync = _forged_sync(link, mutate)
    before = snapshot(link.a.m)
    outs = link.inject(link.a, sync)
    assert snapshot(link.a.m) == before
    assert [type(o) for o in outs] == [NotifyProtocolError]
    assert isinstance(outs[0].error, expected)
    # still works with the honest peer
    link.propose(link.b)
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 2


def test_sync_with_conflicting_cosigned_state_raises_funds_at_risk() -> None:
    """A genuinely co-signed state at our latest version but different is FundsAtRiskError."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.deliver_all()
    latest = link.a.m.latest
    assert latest is not None
    twin = next_state(link.initial, 1, payer=1, amount=7)
    d = state_digest(link.params, twin)
    forged = SignedState(state=twin, signatures=(link.a.signer.sign(d), link.b.signer.sign(d)))
    before = snapshot(link.a.m)
    outs = link.inject(link.a, Sync(latest=forged, max_signed=1, pending=()))
    assert snapshot(link.a.m) == before
    assert [type(o) for o in outs] == [NotifyProtocolError]
    assert isinstance(outs[0].error, FundsAtRiskError)


def test_sync_pending_with_bad_signature_rejected() -> None:
    """A forged half-signed proposal carried in a Sync is refused like a direct Propose."""
    link = Link()
    link.open()
    latest = link.b.m.latest
    assert latest is not None
    bad = forge(link, Signer.from_bytes(b"\x03" * 32), 0, next_state(latest.state, 1))
    before = snapshot(link.b.m)
    outs = link.inject(link.b, Sync(latest=latest, max_signed=1, pending=(bad,)))
    assert snapshot(link.b.m) == before
    assert isinstance(outs[-1], NotifyProtocolError)
    assert isinstance(outs[-1].error, InvalidSignature)


def test_repeated_sync_is_idempotent() -> None:
    """Reconnecting again and again when nothing is pending changes nothing and raises nothing."""
    link = Link()
    link.open()
    link.propose(link.a)
    link.deliver_all()
    before = (snapshot(link.a.m), snapshot(link.b.m))
    for _ in range(3):
        link.reconnect()
        link.deliver_all()
    assert (snapshot(link.a.m), snapshot(link.b.m)) == before
    assert not link.a.errors() and not link.b.errors()


# --- output order ------------------------------------------------------------------


def test_output_order_rule_on_every_path() -> None:
    """Persist* outputs come before any Send*/Notify* that depends on them, on each path
    (checked by the link on every step; this test walks the paths explicitly)."""
    link = Link()
    link.start()
    assert [type(o) for o in link.a.outputs] == [PersistProposal, SendMessage]
    link.deliver(link.a)
    assert [type(o) for o in link.b.outputs] == [PersistLatest, SendMessage, NotifyReceived]
    link.deliver_all()
    outs = link.propose(link.a)
    assert [type(o) for o in outs] == [PersistProposal, SendMessage]
    outs = link.deliver(link.a)
    assert [type(o) for o in outs] == [PersistLatest, SendMessage, NotifyReceived]
    outs = link.deliver(link.b)
    assert [type(o) for o in outs] == [PersistLatest, NotifyAccepted]
    link.propose(link.a)
    link.propose(link.b)
    link.deliver(link.a)
    outs = link.deliver(link.b)  # alice: bob's crossing proposal -> Reject
    assert [type(o) for o in outs] == [SendMessage, NotifyProtocolError]
    outs = link.deliver(link.b)  # alice: bob's Reject of hers -> drop
    assert [type(o) for o in outs] == [PersistDropProposals, NotifyRejected]


def test_output_order_checker_catches_violations() -> None:
    """The order checker itself fails on a Send before its Persist (a control)."""
    link = Link()
    link.open()
    tip = link.a.m.tip()
    outs = link.a.m.handle(
        ActionPropose(update_id=5, allocations=transfer(tip, 0, 1), base_version=tip.version)
    )
    with pytest.raises(AssertionError):
        check_output_order(list(reversed(outs)), Durable(latest=0))


# --- deferred countersigning (the client's mode) ----------------------------------


def _deferred_link(**kw: Any) -> Link:
    link = Link(defer=True, **kw)
    link.open()
    return link


def _deliver_queued(link: Link, src: Party) -> None:
    """Deliver every message queued at ``src`` (the reader's whole read)."""
    while src.outbox:
        link.deliver(src)


def test_one_accept_covers_every_proposal_read() -> None:
    """Proposals read together are countersigned once, at the newest: the responder signs
    and persists that version only, and its Accept accepts every proposal up to it, each
    caller getting that co-signed state."""
    link = _deferred_link()
    for _ in range(5):
        link.propose(link.a)
    signed_before = dict(link.b.signed)
    _deliver_queued(link, link.a)
    assert [m.version for m in link.b.outbox if isinstance(m, Accept)] == [5]
    assert [o.signed.state.version for o in link.b.of_type(PersistLatest)] == [0, 5]
    assert set(link.b.signed) - set(signed_before) == {5}  # rule S: it signed v5 only
    assert link.b.m.max_signed == 5
    _deliver_queued(link, link.b)
    accepted = link.a.of_type(NotifyAccepted)[1:]
    assert [n.update_id for n in accepted] == [1, 2, 3, 4, 5]
    assert {n.signed.state.version for n in accepted} == {5}
    assert [o.signed.state.version for o in link.a.of_type(PersistLatest)][-1] == 5
    assert not link.a.m.pending
    assert link.a.m.latest == link.b.m.latest
    assert link.b.m.latest is not None
    assert link.b.m.latest.state.allocation(ETH).balances == (995, 1005)


def test_a_lone_proposal_is_countersigned_when_read() -> None:
    """Lock-step traffic is answered at once: nothing waits for a later frame."""
    link = _deferred_link()
    link.propose(link.a)
    outs = link.deliver(link.a)
    assert [type(o) for o in outs if isinstance(o, SendMessage | PersistLatest)] == [
        PersistLatest,
        SendMessage,
    ]
    assert not link.b.m.deferred


def test_checks_chain_through_deferred_proposals() -> None:
    """Each deferred proposal is checked against the one before it: the policy sees that
    one as the old state, and a proposal not built on it is refused (StaleVersion) while
    the earlier ones still get their Accept, first."""
    seen: list[tuple[int, int]] = []

    def policy(params: Params, old: State, new: State) -> str | None:
        seen.append((old.version, new.version))
        return None

    link = _deferred_link(policy_b=policy)
    link.propose(link.a)
    link.propose(link.a)
    stale = forge(link, link.a.signer, 0, next_state(link.a.m.tip(), 3, amount=2))
    link.a.outbox.append(stale)
    link.propose(link.a)  # v3 of alice's own, sent after the forged v3 on v0
    link.deliver(link.a)
    link.deliver(link.a)
    assert len(link.b.m.deferred) == 2
    outs = link.deliver(link.a)  # the forged one
    sent = [o.msg for o in outs if isinstance(o, SendMessage)]
    assert [type(m) for m in sent] == [Accept, Reject]
    assert isinstance(sent[0], Accept) and sent[0].version == 2
    assert isinstance(link.b.errors()[-1], StaleVersion)
    link.deliver_all()
    assert seen == [(0, 1), (1, 2), (2, 3)]
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 3


def test_a_bad_signature_on_the_newest_falls_back_to_the_one_before() -> None:
    """At countersign time the newest proposal's signature is checked; if it fails, that
    proposal is rejected (InvalidSignature) and the one before it is countersigned."""
    link = _deferred_link()
    link.propose(link.a)
    link.propose(link.a)
    link.deliver(link.a)
    bad = link.a.outbox.pop(0)
    assert isinstance(bad, Propose)
    link.a.outbox.append(attrs.evolve(bad, signature=high_s(bad.signature)))
    outs = link.deliver(link.a)
    sent = [o.msg for o in outs if isinstance(o, SendMessage)]
    assert [type(m) for m in sent] == [Accept, Reject]
    assert isinstance(sent[0], Accept) and sent[0].version == 1
    assert isinstance(sent[1], Reject) and sent[1].version == 2
    assert 2 not in link.b.signed
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 1
    assert [n.version for n in link.a.of_type(NotifyRejected)] == [2]


def test_at_most_max_deferred_wait() -> None:
    """A long read is countersigned every MAX_DEFERRED proposals, not only at its end."""
    link = _deferred_link(window_a=MAX_DEFERRED * 2)
    for _ in range(MAX_DEFERRED + 3):
        link.propose(link.a)
    _deliver_queued(link, link.a)
    assert [m.version for m in link.b.outbox if isinstance(m, Accept)] == [
        MAX_DEFERRED,
        MAX_DEFERRED + 3,
    ]


def test_a_reconnect_forgets_deferred_proposals_and_they_come_again() -> None:
    """Deferred proposals were neither signed nor stored: a reconnect drops them, the
    proposer re-sends them after its Sync, and both end on the newest."""
    link = _deferred_link()
    for _ in range(3):
        link.propose(link.a)
    for _ in range(2):
        link.b.m.handle(ReceivePropose(link.a.outbox.pop(0)))
    assert len(link.b.m.deferred) == 2
    link.reconnect(first=link.b)
    assert not link.b.m.deferred
    assert link.b.m.max_signed == 0
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 3
    assert [n.update_id for n in link.a.of_type(NotifyAccepted)][1:] == [1, 2, 3]


def test_the_responder_countersigns_before_proposing_itself() -> None:
    """A responder that proposes while it holds deferred proposals countersigns them first,
    and builds its own proposal on the newest."""
    link = _deferred_link()
    link.propose(link.a)
    link.propose(link.a)
    for _ in range(2):
        link.b.m.handle(ReceivePropose(link.a.outbox.pop(0)))
    outs = link.propose(link.b)
    sent = [o.msg for o in outs if isinstance(o, SendMessage)]
    assert [type(m) for m in sent] == [Accept, Propose]
    assert isinstance(sent[1], Propose) and sent[1].base_version == 2
    link.deliver_all()
    assert link.a.m.latest == link.b.m.latest
    assert link.a.m.latest is not None and link.a.m.latest.state.version == 3


def test_an_accept_beyond_what_is_in_flight_is_refused() -> None:
    """An Accept for a version we never proposed is a StaleVersion and changes nothing."""
    link = _deferred_link()
    link.propose(link.a)
    before = snapshot(link.a.m)
    link.inject(link.a, Accept(channel_id=link.a.m.channel_id, version=2, signature=b"\x11" * 65))
    assert isinstance(link.a.errors()[-1], StaleVersion)
    assert snapshot(link.a.m) == before


# --- the safety property -------------------------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("propose"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("deliver"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("deliver"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("drop"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("reconnect"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("countersign"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("read"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("read-pay"), st.sampled_from([0, 1]), st.integers(0, 3)),
    ),
    max_size=60,
)
#: adversarial network: also reorders and duplicates messages
HOSTILE_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("propose"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("deliver"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("drop"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("dup"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("reconnect"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("countersign"), st.sampled_from([0, 1]), st.just(0)),
        st.tuples(st.just("read"), st.sampled_from([0, 1]), st.integers(0, 3)),
        st.tuples(st.just("read-pay"), st.sampled_from([0, 1]), st.integers(0, 3)),
    ),
    max_size=60,
)


def _check_invariants(link: Link) -> None:
    for p in (link.a, link.b):
        m = p.machine
        if m is None:
            continue
        if m.latest is not None:
            assert m.max_signed >= m.latest.state.version
            v = m.latest.state.version
            for f in m.pending:
                assert f.proposal.state.version > v
            if m.pending:
                assert m.pending[0].proposal.base_version == v
        for f, g in zip(m.pending, m.pending[1:], strict=False):
            assert g.proposal.base_version == f.proposal.state.version
            assert g.proposal.state.version > f.proposal.state.version


def _pay(link: Link, p: Party, amount: int) -> None:
    """``p`` pays ``amount`` on its ``tip()`` if the machine lets it.  The update id in
    app_data makes every proposed state distinct, so the accounting can tell which
    update a state is."""
    if p.machine is not None:
        with contextlib.suppress(LocalProtocolError):
            link.propose(p, amount=amount, app_data=link.next_update_id.to_bytes(4, "big"))


def _run_schedule(link: Link, steps: list[tuple[str, int, int]]) -> bool:
    """Run ``steps``: ``propose`` (``who`` pays ``arg`` on its ``tip()``), ``deliver`` (and
    countersign, with ``defer``, once nothing more is queued), ``read`` (deliver, the
    reader not idle yet: a proposal it checks stays held), ``read-pay`` (``who`` reads
    the peer's next message so, then pays ``arg``: with ``defer``, on top of the peer's
    proposal it holds), ``countersign``, ``drop``, ``dup``, ``reconnect``; then full
    syncs until quiet.  Returns whether a ``drop`` lost a ``Sync`` (see
    ``_check_accounting``)."""
    seen_latest = {0: -1, 1: -1}
    lost_sync = False
    for kind, who, arg in steps:
        p = link.a if who == 0 else link.b
        if kind == "propose":
            _pay(link, p, arg)
        elif kind == "read-pay":
            if link.other(p).outbox:
                link.deliver(link.other(p), countersign=False)
            _pay(link, p, arg)
        elif kind in ("deliver", "read") and p.outbox:
            link.deliver(p, min(arg, len(p.outbox) - 1), countersign=kind == "deliver")
        elif kind == "drop" and p.outbox:
            lost_sync |= isinstance(p.outbox.pop(min(arg, len(p.outbox) - 1)), Sync)
        elif kind == "dup" and p.outbox:
            p.outbox.insert(0, p.outbox[min(arg, len(p.outbox) - 1)])
        elif kind == "reconnect":
            link.reconnect(first=p)
        elif kind == "countersign" and p.machine is not None:
            link.handle(p, ActionCountersign())
        _check_invariants(link)
        for q in (link.a, link.b):
            if q.machine is not None and q.machine.latest is not None:
                v = q.machine.latest.state.version
                assert v >= seen_latest[q.me], f"{q.name}'s latest went back"
                seen_latest[q.me] = v
    # a final full sync; repeated, since the first may leave rejections to deliver
    for _ in range(3):
        link.reconnect()
        link.deliver_all()
    return lost_sync


def _check_accounting(link: Link, *, proposers_told_the_truth: bool) -> None:
    """The final co-signed state holds exactly the updates the parties were told are
    co-signed, each once: its ETH balances are the initial ones plus those payments.
    Run once both parties hold the same latest and nothing is pending.

    Which updates a state holds is its lineage: each update records the state its
    allocations were computed on, so from a state back to the Open its ancestors are
    the updates whose payments it holds, once each.  "Told" is: ``NotifyAccepted`` for
    an update (to its proposer), and each co-signed state a party was shown
    (``NotifyReceived``, ``NotifyAccepted``) with its whole lineage — a responder that
    countersigns proposals read together (``defer``) is shown the newest only, and it
    holds the ones before.  So: every update reported accepted, and every state shown
    co-signed, lies in the final state's lineage (nothing co-signed is undone: the
    fixed bug numbered a pay computed on the older state on top of a co-signed pay of
    the peer's, which the final state then lacked); the final state was shown to a
    party, so nothing is in it that nobody was told of; and so is every state
    co-signed at any time.

    ``proposers_told_the_truth``: each proposer's own word is exact, too —
    ``NotifyAccepted`` for its update iff the final state holds it, never
    ``NotifyRejected`` (a client retries those: it would pay twice).  This needs a link
    that loses nothing but by disconnecting.  A responder answers a second copy of a
    proposal it has already countersigned (or holds) with a Reject naming it, and a
    proposer that still has that proposal in flight when the Reject comes drops it as
    rejected (with the ones built on it); the next Sync then brings the co-signed state
    without a notice.  On an order-keeping link a second copy comes only re-sent right
    after the proposer's Sync, which the responder skips — unless a ``drop`` lost that
    Sync while the connection went on, as no stream does; on the hostile network a
    duplicate's Reject can overtake the original's Accept, or a re-sent copy the Sync.
    Then only the responder's word (the lineage of what it was shown) covers them."""
    latest = link.a.m.latest
    assert latest is not None and latest == link.b.m.latest
    assert not link.a.m.pending and not link.b.m.pending
    final = latest.state
    by_digest: dict[bytes, int] = {}
    for uid, u in link.updates.items():
        if u.digest is not None:
            assert by_digest.setdefault(u.digest, uid) == uid, "two updates, one state"

    def lineage(state: State) -> set[int]:
        out: list[int] = []
        uid: int | None = by_digest[state_digest(link.params, state)]
        while uid is not None:
            assert uid not in out, f"update {uid} twice in the lineage of v{state.version}"
            out.append(uid)
            parent = link.updates[uid].parent
            uid = None if parent is None else by_digest[parent]
        assert out[-1] == 0, "the lineage ends at the Open"
        return set(out)

    included = lineage(final)
    accepted = [n for p in (link.a, link.b) for n in p.of_type(NotifyAccepted)]
    received = [n for p in (link.a, link.b) for n in p.of_type(NotifyReceived)]
    told = {n.update_id for n in accepted}
    for n in accepted + received:
        told |= lineage(n.signed.state)
    assert included == told, (
        f"final v{final.version} holds updates {sorted(included)}, but the parties were told "
        f"{sorted(told)} are co-signed: missing {sorted(told - included)}, "
        f"never reported {sorted(included - told)}"
    )
    balances = list(link.initial.allocation(ETH).balances)
    for uid in told:
        u = link.updates[uid]
        balances[u.payer] -= u.amount
        balances[1 - u.payer] += u.amount
    assert final.allocation(ETH).balances == tuple(balances), (
        f"final v{final.version} ETH {final.allocation(ETH).balances}, but the updates "
        f"reported co-signed ({sorted(told)}) make {tuple(balances)}"
    )
    assert final.allocation(TOKEN) == link.initial.allocation(TOKEN)
    for v, state in link.cosigned.items():
        assert lineage(state) <= included, f"co-signed v{v} is not in the final state"
    if proposers_told_the_truth:
        for p in (link.a, link.b):
            mine = {uid for uid, u in link.updates.items() if u.payer == p.me and uid}
            ok = {n.update_id for n in p.of_type(NotifyAccepted)} - {0}
            rejected = {n.update_id for n in p.of_type(NotifyRejected)}
            assert ok == mine & included, (
                f"{p.name} was told {sorted(ok)} are co-signed; "
                f"the final state holds {sorted(mine & included)} of its updates"
            )
            assert not rejected & included, (
                f"{p.name} was told {sorted(rejected & included)} were rejected, "
                f"but the final state holds them"
            )


def _terminal_notifications(p: Party) -> dict[int, list[Output]]:
    out: dict[int, list[Output]] = {}
    for o in p.outputs:
        if isinstance(o, NotifyAccepted | NotifyRejected):
            out.setdefault(o.update_id, []).append(o)
    return out


def test_schedules_pay_while_holding_the_peers_proposals() -> None:
    """The schedules reach the case of the fixed bug: alice holds bob's two pipelined pays
    (deferred: her read is not finished) when she pays on her ``tip()``, his newest; she
    countersigns it first, hers goes on top, and the accounting finds every pay once."""
    link = Link(window_a=4, window_b=4, defer=True)
    link.open()
    steps = [("propose", 1, 2), ("propose", 1, 3), ("read", 1, 0), ("read-pay", 0, 1)]
    assert not _run_schedule(link, steps)
    assert link.proposed_while_holding == 1
    latest = link.a.m.latest
    assert latest is not None and latest.state.version == 3
    assert latest.state.allocation(ETH).balances == (1000 + 5 - 1, 1000 - 5 + 1)
    _check_accounting(link, proposers_told_the_truth=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, start_open=st.booleans())
@pytest.mark.parametrize("defer", [False, True], ids=["countersign-each", "deferred"])
def test_random_schedules_never_fork(
    steps: list[tuple[str, int, int]], start_open: bool, defer: bool
) -> None:
    """Under any interleaving of proposals from both sides, deliveries, drops and reconnects: no
    two different states are co-signed at one version, no party signs two states at one
    version, latest never goes back, each update is settled at most once, and after a final
    full sync both parties hold the same latest and nothing is pending.  With deferred
    countersigning too (a ``countersign`` step stands for a reader that went idle; a
    ``read-pay`` for a pay made while the peer's proposal is held).  And the accounting
    holds: the final state holds exactly the updates the parties were told are co-signed,
    each proposer told the truth about its own (``_check_accounting``)."""
    link = Link(window_a=4, window_b=4, defer=defer)
    if start_open:
        link.open()
    else:
        link.start()
    lost_sync = _run_schedule(link, steps)
    if link.proposed_while_holding:
        event("paid while holding the peer's proposal")
    assert link.b.machine is not None
    assert link.a.m.latest is not None
    assert link.a.m.latest == link.b.m.latest
    assert not link.a.m.pending and not link.b.m.pending
    for p in (link.a, link.b):
        for uid, notes in _terminal_notifications(p).items():
            assert len(notes) == 1, f"{p.name}: update {uid} settled twice: {notes}"
    assert not [e for e in link.a.errors() + link.b.errors() if isinstance(e, FundsAtRiskError)]
    _check_accounting(link, proposers_told_the_truth=not lost_sync)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=HOSTILE_STEPS)
@pytest.mark.parametrize("defer", [False, True], ids=["countersign-each", "deferred"])
def test_hostile_network_never_forks(steps: list[tuple[str, int, int]], defer: bool) -> None:
    """Even when the network reorders and duplicates messages, no two different states are
    co-signed at one version, no party signs twice at one version, a final full sync
    brings both parties to the same latest, and the final state holds exactly the updates
    either party was told are co-signed (a proposer's own word may be wrong here: see
    ``_check_accounting``)."""
    link = Link(window_a=4, window_b=4, defer=defer)
    link.open()
    _run_schedule(link, steps)
    assert link.a.m.latest == link.b.m.latest
    assert not [e for e in link.a.errors() + link.b.errors() if isinstance(e, FundsAtRiskError)]
    _check_accounting(link, proposers_told_the_truth=False)


# -- a peer that countersigns a proposal it rejected ("Burned") -----------------------


def _countersign_and_reject(link: Link, reason: str, index: int = 0) -> SignedState:
    """Bob, dishonest, takes alice's ``index``-th queued proposal, countersigns it in
    private, and tells her he rejected it.  Returns the co-signed state he keeps."""
    p = link.a.outbox.pop(index)
    assert isinstance(p, Propose)
    digest = state_digest(link.params, p.state)
    signed = SignedState(state=p.state, signatures=(p.signature, link.b.signer.sign(digest)))
    reject = Reject(
        channel_id=link.params.channel_id,
        version=p.state.version,
        state_hash=digest,
        reason=reason,
    )
    link.handle(link.a, ReceiveReject(reject))
    return signed


def _revive(link: Link, kept: SignedState) -> list[Output]:
    """Bob's ``Sync`` on the next connect: the state he kept, as his latest co-signed."""
    sync = Sync(latest=kept, max_signed=kept.state.version, pending=())
    return link.handle(link.a, ReceiveSync(codec.decode(codec.encode(sync))))  # type: ignore[arg-type]


def _paid_by_alice(link: Link) -> int:
    latest = link.a.m.latest
    assert latest is not None
    return link.initial.allocation(ETH).balances[0] - latest.state.allocation(ETH).balances[0]


def test_a_retried_update_is_not_made_twice_when_the_peer_revives_the_rejected_proposal() -> None:
    """Alice pays 10 (v1).  Bob countersigns v1 in private and answers with a retryable
    conflict; alice's client retries the update (same update id) as v2 on v0.  Bob's
    ``Sync`` then brings v1 co-signed.  Alice must adopt v1 (the adjudicator would
    honour it), report the update done with v1, and drop her retry v2 without a
    retryable notice: else her client pays 10 again on top of v1 (20 for one pay)."""
    link = Link()
    link.open()
    link.propose(link.a, 10)
    uid = link.next_update_id - 1
    kept = _countersign_and_reject(link, f"{REASON_CONFLICT}: the peer's proposal won")
    assert [(n.update_id, n.retryable) for n in link.a.of_type(NotifyRejected)] == [(uid, True)]
    tip = link.a.m.tip()
    link.handle(
        link.a,
        ActionPropose(update_id=uid, allocations=transfer(tip, 0, 10), base_version=tip.version),
    )
    assert [f.proposal.state.version for f in link.a.m.pending] == [2]
    before = len(link.a.outputs)
    outs = _revive(link, kept)
    assert link.a.m.latest == kept
    assert _paid_by_alice(link) == 10
    assert not link.a.m.pending
    assert [o for o in outs if isinstance(o, NotifyRejected)] == [], (
        "the retry was reported rejected: the client would make the update a third time"
    )
    accepted = [o for o in outs if isinstance(o, NotifyAccepted)]
    assert [(n.update_id, n.signed, n.revived) for n in accepted] == [(uid, kept, True)]
    assert any(
        isinstance(o, PersistDropProposals) and o.from_version == 2 for o in outs
    ), "the dropped retry must burn durably"
    assert len(link.a.outputs) > before and not link.a.errors()


def test_an_update_reported_rejected_and_then_revived_is_reported_accepted() -> None:
    """A refusal that is not retryable (the peer's policy), then the refused proposal
    co-signed after all: alice's caller was told ``UpdateRejected``, so the update comes
    back as ``NotifyAccepted(revived=True)`` for the client to surface."""
    link = Link()
    link.open()
    link.propose(link.a, 7)
    uid = link.next_update_id - 1
    kept = _countersign_and_reject(link, "over the risk limit")
    assert [(n.update_id, n.retryable) for n in link.a.of_type(NotifyRejected)] == [(uid, False)]
    outs = _revive(link, kept)
    assert link.a.m.latest == kept and _paid_by_alice(link) == 7
    assert [(n.update_id, n.revived) for n in outs if isinstance(n, NotifyAccepted)] == [
        (uid, True)
    ]
    # Nothing is remembered below the new latest version.
    assert link.a.m.burned == []


def test_a_pipelined_update_under_a_revived_proposal_is_not_reported_superseded() -> None:
    """Alice pays 1 (v1) and 2 (v2 on v1).  Bob rejects v2 alone but keeps it co-signed,
    and his ``Sync`` brings it: v2 holds both pays.  Both updates are done; reporting v1
    "superseded" (retryable) would make the client pay 1 again."""
    link = Link()
    link.open()
    link.propose(link.a, 1)
    link.propose(link.a, 2)
    first, second = link.next_update_id - 2, link.next_update_id - 1
    kept = _countersign_and_reject(link, "no", index=1)
    assert [f.proposal.state.version for f in link.a.m.pending] == [1]
    outs = _revive(link, kept)
    assert link.a.m.latest == kept and _paid_by_alice(link) == 3
    assert [o for o in outs if isinstance(o, NotifyRejected)] == []
    assert [(n.update_id, n.revived) for n in outs if isinstance(n, NotifyAccepted)] == [
        (first, False),
        (second, True),
    ]
    assert not link.a.m.pending


def test_a_proposer_stops_signing_when_the_peer_co_signs_nothing() -> None:
    """The burned proposals a machine must remember are bounded: with ``MAX_BURNED`` of
    them and no newer co-signed state, it refuses to sign another."""
    link = Link()
    link.open()
    m = link.a.m
    for _ in range(MAX_BURNED):
        link.propose(link.a, 1)
        _countersign_and_reject(link, "no")
    assert len(m.burned) == MAX_BURNED
    with pytest.raises(LocalProtocolError, match="refused"):
        link.propose(link.a, 1)
    # A newer co-signed state (the peer relents) frees the machine.
    _revive(link, _last_burned_cosigned(link))
    assert m.burned == []
    outs = link.propose(link.a, 1)
    assert [o.state.version for o in outs if isinstance(o, PersistProposal)] == [MAX_BURNED + 1]


def _last_burned_cosigned(link: Link) -> SignedState:
    f = link.a.m.burned[-1]
    digest = state_digest(link.params, f.proposal.state)
    return SignedState(
        state=f.proposal.state, signatures=(f.proposal.signature, link.b.signer.sign(digest))
    )


def _cosign_in_private(link: Link, index: int = 0) -> SignedState:
    """Bob countersigns alice's ``index``-th queued proposal and says nothing."""
    p = link.a.outbox.pop(index)
    assert isinstance(p, Propose)
    digest = state_digest(link.params, p.state)
    return SignedState(state=p.state, signatures=(p.signature, link.b.signer.sign(digest)))


def _notes(outs: list[Output]) -> list[tuple[str, int, bool]]:
    return [
        ("accepted", o.update_id, o.revived)
        if isinstance(o, NotifyAccepted)
        else ("rejected", o.update_id, o.retryable)
        for o in outs
        if isinstance(o, NotifyAccepted | NotifyRejected)
    ]


def _two_kept_in_private() -> tuple[Link, tuple[int, SignedState], tuple[int, SignedState]]:
    """Alice pays 10 (A, v1), which bob countersigns in private and refuses as a
    conflict, then 3 (B, v2 on v0), which bob countersigns in private and leaves
    unanswered: the link and each update's id with bob's co-signed copy."""
    link = Link()
    link.open()
    link.propose(link.a, 10)
    upd_a = link.next_update_id - 1
    kept_a = _countersign_and_reject(link, f"{REASON_CONFLICT}: the peer's proposal won")
    link.propose(link.a, 3)
    upd_b = link.next_update_id - 1
    return link, (upd_a, kept_a), (upd_b, _cosign_in_private(link))


def test_a_revived_update_is_reported_only_once_nothing_burned_can_undo_it() -> None:
    """Alice pays 10 (A, v1); bob countersigns it in private and refuses it.  Alice
    pays 3 (B, v2 on v0); bob keeps that one too, unanswered.  Bob's Sync brings v1:
    A is made, but v2 (B without A) is burned and newer, so A is held, not reported.
    His next Sync brings v2: A is undone (reported, retryable: it is not in the state)
    and B is made.  Reporting A at the first Sync would have told its caller a pay was
    made that the channel then dropped."""
    link, (upd_a, kept_a), (upd_b, kept_b) = _two_kept_in_private()
    a = link.a
    outs = _revive(link, kept_a)
    assert a.m.latest == kept_a
    assert ("accepted", upd_a, True) not in _notes(outs), "A reported while v2 could undo it"
    assert _notes(outs) == [("rejected", upd_b, True)]  # B's v2 was built on v0: superseded
    outs = _revive(link, kept_b)
    assert a.m.latest == kept_b and _paid_by_alice(link) == 3
    assert _notes(outs) == [("rejected", upd_a, True), ("accepted", upd_b, True)]
    assert not a.m.held and a.m.content is None  # nothing burned is left: tracking stops


def test_a_held_update_is_reported_when_the_next_state_is_co_signed() -> None:
    """As above up to the first Sync; then alice pays 1 (C, built on v1, above every
    burned version) and bob countersigns it honestly: nothing can undo A any more, and
    A is reported made with C's state, which holds it."""
    link, (upd_a, kept_a), _ = _two_kept_in_private()
    a = link.a
    _revive(link, kept_a)
    assert upd_a in a.m.held
    link.disconnect()
    link.reconnect()
    link.deliver_all()
    link.propose(a, 1)
    upd_c = link.next_update_id - 1
    before = len(a.outputs)
    link.deliver_all()
    notes = _notes(a.outputs[before:])
    assert ("accepted", upd_c, False) in notes and ("accepted", upd_a, True) in notes
    assert _paid_by_alice(link) == 11 and not a.m.held


def test_a_retry_of_an_update_the_latest_state_holds_is_answered_not_signed() -> None:
    """The update's proposal came back co-signed before the client retried it: the retry
    (same update id) is answered as made, and nothing is signed."""
    link = Link()
    link.open()
    a = link.a
    link.propose(a, 10)
    uid = link.next_update_id - 1
    kept = _countersign_and_reject(link, f"{REASON_CONFLICT}: x")
    _revive(link, kept)
    tip = a.m.tip()
    outs = link.handle(
        a, ActionPropose(update_id=uid, allocations=transfer(tip, 0, 10), base_version=tip.version)
    )
    assert not [o for o in outs if isinstance(o, PersistProposal)]
    assert _notes(outs) == [("accepted", uid, True)]
    assert _paid_by_alice(link) == 10


def test_a_late_accept_for_a_refused_proposal_is_adopted() -> None:
    """Bob refuses alice's v1, then sends an ``Accept`` for it after all: he holds it
    co-signed, so alice adopts it (as from a Sync) and reports the update made."""
    link = Link()
    link.open()
    link.propose(link.a, 10)
    uid = link.next_update_id - 1
    kept = _countersign_and_reject(link, "no")
    late = Accept(channel_id=link.params.channel_id, version=1, signature=kept.signatures[1] or b"")
    outs = link.handle(link.a, ReceiveAccept(late))
    assert link.a.m.latest == kept and _paid_by_alice(link) == 10
    assert _notes(outs) == [("accepted", uid, True)]
    assert not link.a.errors()


def test_a_revived_state_of_no_proposal_of_this_run_is_reported() -> None:
    """A refused proposal that the machine no longer knows (it restarted from its store
    since) comes back co-signed: adopted, and reported as update 0, for the client to
    warn that an update reported rejected is made after all."""
    link = Link()
    link.open()
    link.propose(link.a, 10)
    kept = _countersign_and_reject(link, "no")
    m = link.a.m
    restarted = ChannelMachine(
        params=m.params, me=0, sign=link.a.signer.sign, latest=m.latest, max_signed=m.max_signed
    )
    link.a.machine = restarted
    outs = _revive(link, kept)
    assert restarted.latest == kept
    assert [(o.update_id, o.revived) for o in outs if isinstance(o, NotifyAccepted)] == [(0, True)]


def _reject_msg(link: Link, p: Propose, reason: str) -> ReceiveReject:
    digest = state_digest(link.params, p.state)
    return ReceiveReject(
        Reject(
            channel_id=link.params.channel_id,
            version=p.state.version,
            state_hash=digest,
            reason=reason,
        )
    )


def _late_accept(link: Link, p: Propose) -> ReceiveAccept:
    sig = link.b.signer.sign(state_digest(link.params, p.state))
    cid = link.params.channel_id
    return ReceiveAccept(Accept(channel_id=cid, version=p.state.version, signature=sig))


def test_a_late_accept_never_takes_the_latest_state_back() -> None:
    """Alice pipelines v1 (pay 1), v2, v3; bob refuses v3, then v1 (v2 burns with it, so
    the burned list is v3, v1, v2: not in version order), then sends late Accepts for v2
    and for v1.  v2 is adopted; v1 is older than that and is refused, and the retry of
    pay 1, which v2 holds, is answered without signing (adopting v1 reported pays 1 and
    10 undone, and the retry made pay 1 twice)."""
    link = Link()
    link.open()
    a = link.a
    for amount in (1, 10, 100):
        link.propose(a, amount)
    props = [m for m in a.outbox if isinstance(m, Propose)]
    a.outbox.clear()
    first = link.next_update_id - 3
    link.handle(a, _reject_msg(link, props[2], "no"))
    link.handle(a, _reject_msg(link, props[0], f"{REASON_CONFLICT}: x"))
    link.handle(a, _late_accept(link, props[1]))
    assert a.m.latest is not None and a.m.latest.state == props[1].state
    assert all(f.proposal.state.version > 2 for f in a.m.burned)
    outs = link.handle(a, _late_accept(link, props[0]))
    assert a.m.latest.state == props[1].state
    assert [type(e) for e in a.errors()][-1:] == [StaleVersion]
    assert not [o for o in outs if isinstance(o, NotifyRejected)]
    tip = a.m.tip()
    outs = link.handle(
        a, ActionPropose(update_id=first, allocations=transfer(tip, 0, 1), base_version=tip.version)
    )
    assert not [o for o in outs if isinstance(o, PersistProposal)]
    assert _paid_by_alice(link) == 11


def test_a_revived_state_refuses_the_peer_proposals_checked_against_the_old_latest() -> None:
    """Defer mode (the client's): bob's proposal on v0 is checked and held, then his late
    Accept for alice's refused v1 makes v1 the latest.  The held proposal was judged
    against v0 and built on it: it is refused, never countersigned on top of v1 (which
    dropped alice's pay from the state her caller was told holds it)."""
    link = Link(defer=True)
    link.open()
    a, b = link.a, link.b
    v0 = a.m.tip()
    link.propose(a, 10)
    uid = link.next_update_id - 1
    kept = _countersign_and_reject(link, "no")
    p = forge(link, b.signer, 0, next_state(v0, 2, payer=1, amount=1))
    link.handle(a, ReceivePropose(p))
    assert a.m.deferred
    late = Accept(channel_id=link.params.channel_id, version=1, signature=kept.signatures[1] or b"")
    outs = link.handle(a, ReceiveAccept(late))
    assert not a.m.deferred
    refused = [o.msg for o in outs if isinstance(o, SendMessage) and isinstance(o.msg, Reject)]
    assert [r.version for r in refused] == [2]
    link.handle(a, ActionCountersign())
    assert a.m.latest == kept and _paid_by_alice(link) == 10
    assert ("accepted", uid, True) in _notes(outs)


def test_a_peer_that_keeps_a_proposal_burned_does_not_grow_the_tracking() -> None:
    """Each round bob refuses alice's second pipelined proposal and then accepts the
    first: one proposal stays burned above the latest at all times, so tracking stays
    on; what every tracked state holds is dropped from it, so its sets stay small
    (they grew by every update, and each new proposal copied one)."""
    link = Link(window_a=64, balances=(10**9, 10**9))
    link.open()
    a = link.a
    for _ in range(300):
        link.propose(a, 1)
        link.propose(a, 1)
        p1, p2 = a.outbox.pop(0), a.outbox.pop(0)
        assert isinstance(p1, Propose) and isinstance(p2, Propose)
        link.handle(a, _reject_msg(link, p2, "no"))
        link.handle(a, _late_accept(link, p1))
    content = a.m.content
    assert content is not None and len(content) <= 4
    assert max(len(c) for c in content.values()) <= 2 and len(a.m.reported) <= 2
    assert _paid_by_alice(link) == 300
