"""The chain port: what the channel client needs from an EVM chain, as interfaces and values.

``channel`` never imports a chain backend.  The client receives an object that
implements :class:`Adjudicator` (``dispute.adjudicator.AdjudicatorClient`` over the
JSON-RPC or the embedded backend) — go-perun's split between the channel core and its
chain backends.  Everything here is pure: frozen values and ``typing.Protocol``s.

Who may do what, when (the contract enforces it; ``docs/adjudicator.md`` has details):

* ``deposit`` any time; a channel is usable once both participants' deposits are
  confirmed.
* ``close``: a co-signed *final* state pays out at once.
* ``claim``: registers a co-signed state; the challenge window runs until
  ``claim time + challenge_duration`` and is never extended.
* ``refute``: anyone, while ``now < deadline``, with a strictly newer co-signed state.
* ``settle``: anyone, once ``now >= deadline``, pays out by the registered state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

import attrs

from channel.state import Params, SignedState, State

TxHash: TypeAlias = bytes


@attrs.frozen(kw_only=True)
class Block:
    number: int
    hash: bytes
    timestamp: int
    base_fee: int


@attrs.frozen(kw_only=True)
class Dispute:
    """A registered claim, as the contract commits to it (from ``Claimed``/``Refuted``)."""

    state_hash: bytes
    version: int
    deadline: int


@attrs.frozen(kw_only=True)
class EventMeta:
    """Where a log sits; ``removed`` is set when a reorg dropped it."""

    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int
    removed: bool = False


@attrs.frozen(kw_only=True)
class Deposited:
    meta: EventMeta
    channel_id: bytes
    asset: bytes
    new_total: int


@attrs.frozen(kw_only=True)
class Claimed:
    meta: EventMeta
    channel_id: bytes
    dispute: Dispute


@attrs.frozen(kw_only=True)
class Refuted:
    meta: EventMeta
    channel_id: bytes
    dispute: Dispute


@attrs.frozen(kw_only=True)
class Concluded:
    meta: EventMeta
    channel_id: bytes
    version: int
    cooperative: bool


@attrs.frozen(kw_only=True)
class Payout:
    meta: EventMeta
    channel_id: bytes
    asset: bytes
    to_a: int
    to_b: int


ChainEvent: TypeAlias = Deposited | Claimed | Refuted | Concluded | Payout


@attrs.frozen(kw_only=True)
class TxOutcome:
    """A mined transaction: ``success`` false means it reverted (``error`` says why)."""

    tx_hash: TxHash
    block_number: int
    gas_used: int
    success: bool
    error: str = ""


@attrs.frozen(kw_only=True)
class ClaimedState:
    """The params and state a claim or refute put on chain (decoded from its calldata)."""

    params: Params
    state: State


class Adjudicator(Protocol):
    """The adjudicator of one chain, as the channel client and the dispute module see it.

    Transaction methods return once the transaction is mined (``TxOutcome``); they raise
    ``channel.errors.ChainError`` if it cannot be sent or the dry run (``eth_call``) says
    it would revert.  Deadlines and fee escalation are the submitter's business.
    """

    @property
    def chain_id(self) -> int: ...

    @property
    def address(self) -> bytes: ...

    async def head(self) -> Block: ...

    async def holdings(self, channel_id: bytes, asset: bytes) -> int: ...

    async def dispute(self, channel_id: bytes) -> Dispute | None:
        """The registered dispute, rebuilt from events and checked against storage."""
        ...

    async def events(
        self, from_block: int, to_block: int, channel_ids: Sequence[bytes] | None = None
    ) -> list[ChainEvent]: ...

    async def claimed_state(self, tx_hash: TxHash) -> ClaimedState:
        """Decode the params and state from a claim/refute transaction's calldata."""
        ...

    async def deposit(self, channel_id: bytes, asset: bytes, amount: int) -> TxOutcome: ...

    async def close(self, params: Params, signed: SignedState) -> TxOutcome: ...

    async def claim(self, params: Params, signed: SignedState) -> TxOutcome: ...

    async def refute(self, params: Params, dispute: Dispute, signed: SignedState) -> TxOutcome: ...

    async def settle(self, params: Params, state: State, deadline: int) -> TxOutcome: ...

    async def withdraw(self, asset: bytes, to: bytes) -> TxOutcome: ...
