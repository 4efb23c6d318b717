"""The pure dispute policy and fee schedule (no chain, no I/O)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channel.chain import Dispute
from channel.hashing import ZERO_ADDRESS
from channel.state import Address, Allocation, Params, SignedState, State
from dispute.policy import (
    Fees,
    FeeSchedule,
    Nothing,
    Refute,
    Settle,
    TooLate,
    bumped,
    decide,
    escalation_steps,
    fee_for,
    replacement_fees,
    underpriced,
)

GWEI = 10**9
SIG = b"\x01" * 65
PARAMS = Params.new(
    chain_id=1,
    adjudicator=b"\xaa" * 20,
    participants=(b"\x01" * 20, b"\x02" * 20),
    challenge_duration=3600,
    app=ZERO_ADDRESS,
    salt=os.urandom(32),
)


def signed(version: int, *, both: bool = True) -> SignedState:
    state = State(
        channel_id=PARAMS.channel_id,
        version=version,
        allocations=(Allocation(asset=Address(ZERO_ADDRESS), balances=(5, 5), locked=0),),
        app_data=b"",
        is_final=False,
    )
    return SignedState(state=state, signatures=(SIG, SIG if both else None))


def dispute(version: int, deadline: int) -> Dispute:
    return Dispute(state_hash=b"\x00" * 32, version=version, deadline=deadline)


# ----------------------------------------------------------------- decide


def test_no_dispute_means_nothing() -> None:
    """With no claim registered there is nothing to do, whatever we hold."""
    assert isinstance(decide(signed(9), None, now=10), Nothing)


def test_newer_state_inside_window_is_refuted() -> None:
    """A claim older than our latest co-signed state is refuted while a block can still
    land before the deadline."""
    best = signed(5)
    action = decide(best, dispute(3, 1000), now=998)
    assert action == Refute(state=best, registered=dispute(3, 1000), deadline=1000)


def test_newer_state_when_no_block_can_land_is_too_late() -> None:
    """With the head one second before the deadline, the next block is at the deadline:
    too late (margin 1) — but a chain that allows equal timestamps (margin 0) still can."""
    assert isinstance(decide(signed(5), dispute(3, 1000), now=999), TooLate)
    assert isinstance(decide(signed(5), dispute(3, 1000), now=999, margin=0), Refute)
    late = decide(signed(5), dispute(3, 1000), now=1500)
    assert late == TooLate(ours=5, registered=dispute(3, 1000), now=1500)


def test_equal_or_older_state_waits_then_settles() -> None:
    """When the registered claim is our best (or newer), wait for the deadline, then settle."""
    for ours in (3, 2):
        assert decide(signed(ours), dispute(3, 1000), now=999) == Nothing(
            reason="registered v3 is our best or newer; settle at deadline", until=1000
        )
        assert decide(signed(ours), dispute(3, 1000), now=1000) == Settle(
            registered=dispute(3, 1000)
        )


def test_half_signed_state_does_not_count() -> None:
    """A state missing the peer's signature cannot go on chain, so it never triggers a refute."""
    assert isinstance(decide(signed(9, both=False), dispute(3, 1000), now=10), Nothing)
    assert isinstance(decide(None, dispute(3, 1000), now=1000), Settle)


def test_negative_margin_is_refused() -> None:
    with pytest.raises(ValueError):
        decide(signed(1), dispute(0, 10), now=0, margin=-1)


@given(
    ours=st.none() | st.integers(0, 2**64 - 1),
    reg=st.integers(0, 2**64 - 1),
    deadline=st.integers(0, 2**40),
    now=st.integers(0, 2**40),
    margin=st.integers(0, 30),
)
def test_decide_partitions_the_cases(
    ours: int | None, reg: int, deadline: int, now: int, margin: int
) -> None:
    """Exactly one action applies and it matches the table: refute iff newer and a block
    can still land; too late iff newer and none can; settle iff not newer and the window
    is over; else nothing."""
    best = None if ours is None else signed(ours)
    action = decide(best, dispute(reg, deadline), now=now, margin=margin)
    newer = ours is not None and ours > reg
    if newer and now + margin < deadline:
        assert isinstance(action, Refute) and action.state == best
    elif newer:
        assert isinstance(action, TooLate)
    elif now >= deadline:
        assert isinstance(action, Settle)
    else:
        assert isinstance(action, Nothing)


# ----------------------------------------------------------------- fees


def test_fee_curve_flat_then_doubling() -> None:
    """The priority fee is the floor for the first half of the window, then doubles in
    eight equal steps to 256x the floor at the deadline; max fee = 2 * base + priority."""
    kw = dict(deadline=1600, base_fee=10 * GWEI, priority_floor=GWEI, started_at=0)
    cap = 10**6 * GWEI
    assert fee_for(now=0, max_fee_cap=cap, **kw) == Fees(21 * GWEI, GWEI)
    assert fee_for(now=800, max_fee_cap=cap, **kw) == Fees(21 * GWEI, GWEI)
    assert fee_for(now=801, max_fee_cap=cap, **kw).max_priority_fee_per_gas == 2 * GWEI
    assert fee_for(now=900, max_fee_cap=cap, **kw).max_priority_fee_per_gas == 2 * GWEI
    assert fee_for(now=901, max_fee_cap=cap, **kw).max_priority_fee_per_gas == 4 * GWEI
    assert fee_for(now=1599, max_fee_cap=cap, **kw).max_priority_fee_per_gas == 256 * GWEI
    assert fee_for(now=1600, max_fee_cap=cap, **kw) == Fees(276 * GWEI, 256 * GWEI)
    assert fee_for(now=1600, max_fee_cap=100 * GWEI, **kw) == Fees(100 * GWEI, 100 * GWEI)


def test_no_deadline_stays_at_floor() -> None:
    """Without a deadline there is nothing to escalate towards."""
    fees = FeeSchedule(priority_floor=3, max_fee_cap=10**20).fees(
        now=10**9, deadline=None, base_fee=7, started_at=0
    )
    assert fees == Fees(17, 3)


@given(
    start=st.integers(0, 10**6),
    window=st.integers(0, 10**6),
    t1=st.integers(0, 3 * 10**6),
    t2=st.integers(0, 3 * 10**6),
    base=st.integers(0, 10**13),
    base2=st.integers(0, 10**13),
    floor=st.integers(0, 10**11),
    cap=st.integers(1, 10**15),
    permille=st.integers(0, 1000),
    doublings=st.integers(0, 12),
)
def test_fees_monotone_and_capped(
    start: int,
    window: int,
    t1: int,
    t2: int,
    base: int,
    base2: int,
    floor: int,
    cap: int,
    permille: int,
    doublings: int,
) -> None:
    """Fees never fall as time passes or the base fee rises, never pass the cap, the
    priority fee never exceeds the max fee, and uncapped the max fee covers 2x base."""
    deadline = start + window
    lo_t, hi_t = sorted((t1, t2))
    lo_b, hi_b = sorted((base, base2))
    sched = FeeSchedule(
        priority_floor=floor,
        max_fee_cap=cap,
        escalate_after_permille=permille,
        doublings=doublings,
    )
    a = sched.fees(now=lo_t, deadline=deadline, base_fee=lo_b, started_at=start)
    b = sched.fees(now=hi_t, deadline=deadline, base_fee=hi_b, started_at=start)
    for f in (a, b):
        assert f.max_priority_fee_per_gas <= f.max_fee_per_gas <= cap
    assert a.max_fee_per_gas <= b.max_fee_per_gas
    assert a.max_priority_fee_per_gas <= b.max_priority_fee_per_gas
    if b.max_fee_per_gas < cap:
        assert b.max_fee_per_gas >= 2 * hi_b + b.max_priority_fee_per_gas
    steps = escalation_steps(
        now=hi_t,
        deadline=deadline,
        started_at=start,
        escalate_after_permille=permille,
        doublings=doublings,
    )
    assert 0 <= steps <= doublings
    if hi_t >= deadline:
        assert steps == doublings


@given(
    prev_max=st.integers(0, 10**13),
    prev_prio=st.integers(0, 10**13),
    want_max=st.integers(0, 10**13),
    want_prio=st.integers(0, 10**13),
    cap=st.integers(1, 10**14),
)
def test_replacement_bumps_both_fees_by_an_eighth(
    prev_max: int, prev_prio: int, want_max: int, want_prio: int, cap: int
) -> None:
    """A replacement offers at least 12.5% more on both fields than the pending
    transaction (what nodes demand), at least what the schedule wants, and stays under
    the cap — or there is no replacement."""
    prev = Fees(prev_max, min(prev_prio, prev_max))
    wanted = Fees(want_max, min(want_prio, want_max))
    new = replacement_fees(prev, wanted, cap)
    if new is None:
        assert max(bumped(prev.max_fee_per_gas), wanted.max_fee_per_gas) > cap or (
            bumped(prev.max_priority_fee_per_gas) > cap
        )
        return
    assert new.max_fee_per_gas * 8 >= prev.max_fee_per_gas * 9
    assert new.max_priority_fee_per_gas * 8 >= prev.max_priority_fee_per_gas * 9
    assert new.max_fee_per_gas > prev.max_fee_per_gas
    assert new.max_priority_fee_per_gas > prev.max_priority_fee_per_gas
    assert new.max_fee_per_gas >= wanted.max_fee_per_gas
    assert new.max_priority_fee_per_gas >= wanted.max_priority_fee_per_gas
    assert new.max_priority_fee_per_gas <= new.max_fee_per_gas <= cap


def test_underpriced() -> None:
    """A transaction whose max fee is below the base fee cannot enter the block."""
    assert underpriced(Fees(9, 1), 10)
    assert not underpriced(Fees(10, 1), 10)


def test_policy_module_is_pure() -> None:
    """dispute.policy imports no trio, sockets, sqlite, httpx or web3 (DESIGN §1)."""
    import ast
    from pathlib import Path

    import dispute.policy

    tree = ast.parse(Path(dispute.policy.__file__).read_text())
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    assert not mods & {"trio", "socket", "sqlite3", "web3", "httpx"}
    assert mods <= {"__future__", "typing", "attrs", "channel"}
