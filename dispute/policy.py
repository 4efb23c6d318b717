"""The dispute policy and the fee schedule: pure functions of what the chain shows.

No I/O here (``tests/test_purity.py`` checks the imports): the client, the watchtower's
responder and the submitter feed in the head's timestamp, the registered dispute and our
best co-signed state, and act on the answer.

The decision (``decide``), with ``ours`` our best fully co-signed version, ``reg`` the
registered one, ``now`` the head's timestamp and ``deadline`` the dispute's::

    no dispute registered                         -> Nothing
    ours >  reg  and  now + margin <  deadline    -> Refute(best)     a block can still land
    ours >  reg  and  now + margin >= deadline    -> TooLate          funds at risk: surface it
    ours <= reg  and  now          <  deadline    -> Nothing          wait; settle at deadline
    ours <= reg  and  now          >= deadline    -> Settle           anyone may; we want out

``margin`` is the least time between the head and the next block that can carry our
transaction: 1 s on Ethereum (block timestamps strictly increase), 0 on chains whose
blocks may share a timestamp.  A refute is valid while ``block.timestamp < deadline``, so
once ``now + margin >= deadline`` no block we can still reach is early enough.

The fee curve (``fee_for``), for a window from ``started_at`` to ``deadline``:

* priority fee = ``priority_floor`` for the first ``escalate_after`` part of the window
  (default: the first half); over the rest it doubles ``doublings`` times (default 8) in
  equal steps, so it reaches ``priority_floor * 2**doublings`` at the deadline —
  a step function, monotone in ``now``;
* max fee = ``base_multiplier * base_fee + priority`` (default 2x: room for six full
  blocks of +12.5% base fee before the transaction becomes unincludable);
* both are capped by ``max_fee_cap`` (the priority fee never exceeds the max fee);
* with no deadline (``deadline is None``) the fees stay at the floor level.

``replacement_fees`` raises a replacement's fees to at least 12.5% above the pending
transaction's (nodes refuse a same-nonce replacement that bumps less: geth wants 10%).
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

import attrs

from channel.chain import Dispute
from channel.state import SignedState

DEFAULT_MARGIN = 1
"""Seconds from the head to the earliest block we can still land in (Ethereum: 1)."""

GWEI = 10**9


# ----------------------------------------------------------------- the decision


@attrs.frozen(kw_only=True)
class Nothing:
    """No action now.  ``until``: the chain time at which the answer may change (or None)."""

    reason: str
    until: int | None = None


@attrs.frozen(kw_only=True)
class Refute:
    """Send ``state`` (strictly newer than the registered one) before ``deadline``."""

    state: SignedState
    registered: Dispute
    deadline: int


@attrs.frozen(kw_only=True)
class Settle:
    """The window is over: settle by the registered state (anyone may)."""

    registered: Dispute


@attrs.frozen(kw_only=True)
class TooLate:
    """We held a newer state and the window closed (or no block can land in it).

    The caller must raise ``channel.errors.FundsAtRiskError`` (never swallow it); settling
    by the registered state is still the way to collect whatever it pays us.
    """

    ours: int
    registered: Dispute
    now: int


Action: TypeAlias = Nothing | Refute | Settle | TooLate


def decide(
    best: SignedState | None,
    registered: Dispute | None,
    now: int,
    *,
    margin: int = DEFAULT_MARGIN,
) -> Action:
    """What to do about a channel's dispute, given the head's timestamp ``now``.

    ``best`` is our best state; only a fully co-signed one counts (a half-signed state
    cannot be put on chain).  Pure; raises ``ValueError`` on a negative ``margin``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if registered is None:
        return Nothing(reason="no dispute registered")
    ours = best.state.version if best is not None and best.fully_signed else None
    newer = ours is not None and ours > registered.version
    if newer:
        assert best is not None and ours is not None
        if now + margin < registered.deadline:
            return Refute(state=best, registered=registered, deadline=registered.deadline)
        return TooLate(ours=ours, registered=registered, now=now)
    if now >= registered.deadline:
        return Settle(registered=registered)
    return Nothing(
        reason=f"registered v{registered.version} is our best or newer; settle at deadline",
        until=registered.deadline,
    )


# ----------------------------------------------------------------- fees


class Fees(NamedTuple):
    """EIP-1559 fee fields, wei per gas."""

    max_fee_per_gas: int
    max_priority_fee_per_gas: int


@attrs.frozen(kw_only=True)
class FeeSchedule:
    """The tunables of :func:`fee_for` (see the module docstring for the curve)."""

    priority_floor: int = attrs.field(default=1 * GWEI, validator=attrs.validators.ge(0))
    max_fee_cap: int = attrs.field(default=10_000 * GWEI, validator=attrs.validators.gt(0))
    escalate_after_permille: int = attrs.field(
        default=500, validator=[attrs.validators.ge(0), attrs.validators.le(1000)]
    )
    doublings: int = attrs.field(
        default=8, validator=[attrs.validators.ge(0), attrs.validators.le(64)]
    )
    base_multiplier: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def fees(self, *, now: int, deadline: int | None, base_fee: int, started_at: int) -> Fees:
        return fee_for(
            now=now,
            deadline=deadline,
            base_fee=base_fee,
            priority_floor=self.priority_floor,
            started_at=started_at,
            max_fee_cap=self.max_fee_cap,
            escalate_after_permille=self.escalate_after_permille,
            doublings=self.doublings,
            base_multiplier=self.base_multiplier,
        )


def escalation_steps(
    *, now: int, deadline: int, started_at: int, escalate_after_permille: int, doublings: int
) -> int:
    """How many times the priority fee has doubled at ``now`` (0..``doublings``)."""
    if now >= deadline:
        return doublings
    window = max(deadline - started_at, 1)
    calm = window * escalate_after_permille // 1000
    elapsed = now - started_at
    if elapsed <= calm or doublings == 0:
        return 0
    rush = max(window - calm, 1)
    # ceil((elapsed - calm) * doublings / rush): the first doubling comes right after calm.
    steps = -(-(elapsed - calm) * doublings // rush)
    return min(steps, doublings)


def fee_for(
    *,
    now: int,
    deadline: int | None,
    base_fee: int,
    priority_floor: int,
    started_at: int,
    max_fee_cap: int,
    escalate_after_permille: int = 500,
    doublings: int = 8,
    base_multiplier: int = 2,
) -> Fees:
    """The fees to offer at chain time ``now`` for a transaction due by ``deadline``.

    Monotone non-decreasing in ``now`` and in ``base_fee``; never above ``max_fee_cap``;
    the priority fee never above the max fee.  Raises ``ValueError`` on negative inputs.
    """
    if base_fee < 0 or priority_floor < 0 or max_fee_cap <= 0:
        raise ValueError("fees must be non-negative and the cap positive")
    steps = 0
    if deadline is not None:
        steps = escalation_steps(
            now=now,
            deadline=deadline,
            started_at=started_at,
            escalate_after_permille=escalate_after_permille,
            doublings=doublings,
        )
    priority = priority_floor << steps
    max_fee = min(base_multiplier * base_fee + priority, max_fee_cap)
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=min(priority, max_fee))


REPLACEMENT_BUMP_NUM = 9
REPLACEMENT_BUMP_DEN = 8


def bumped(value: int) -> int:
    """``value`` raised by 12.5%, rounded up, and by at least 1 wei."""
    return max(-(-value * REPLACEMENT_BUMP_NUM // REPLACEMENT_BUMP_DEN), value + 1)


def replacement_fees(previous: Fees, wanted: Fees, max_fee_cap: int) -> Fees | None:
    """Fees for a same-nonce replacement of ``previous``: ``wanted`` or a 12.5% bump of
    both fields, whichever is higher.  ``None`` when the bump would pass ``max_fee_cap``
    (then no replacement is possible; keep waiting on the pending transaction).
    """
    max_fee = max(wanted.max_fee_per_gas, bumped(previous.max_fee_per_gas))
    priority = max(wanted.max_priority_fee_per_gas, bumped(previous.max_priority_fee_per_gas))
    max_fee = max(max_fee, priority)
    if max_fee > max_fee_cap:
        return None
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=priority)


def underpriced(fees: Fees, base_fee: int) -> bool:
    """True when a transaction with ``fees`` cannot enter a block with ``base_fee``."""
    return fees.max_fee_per_gas < base_fee
