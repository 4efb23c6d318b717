"""The deadline-aware transaction submitter (DESIGN §6).

``Submitter.submit(intent)`` gets one transaction mined and confirmed before the intent's
deadline, whatever the fee market and the chain do meanwhile:

1. **Stand down first.** ``intent.still_needed()`` false (the chain already holds an equal
   or newer state) -> :class:`StoodDown`, nothing sent.  It is asked again before every
   fresh nonce and whenever something reverts.
2. **Dry run.** ``eth_call`` from our address; a revert raises ``channel.errors.Reverted``
   (the backend names the custom error) and nothing is sent.  Then ``eth_estimateGas``
   plus a margin.
3. **Send and watch, one step per block.** At each new head the submitter looks for a
   receipt of any transaction it sent for the intent (replacements share the nonce, so at
   most one can be mined) and checks its block is still canonical:

   * mined and canonical: count confirmations; done at ``confirmations``;
   * mined but reorged out (the receipt vanished or its block hash is no longer the
     canonical one): back to pending — re-broadcast if the nonce is still ours to use;
   * the nonce was consumed by some other transaction: ask ``still_needed`` again, then
     send on a fresh nonce;
   * pending: replace it (same nonce) when it is underpriced for the head's base fee, the
     fee schedule (``dispute.policy.fee_for``) has escalated, or it has waited
     ``stuck_blocks`` blocks — with both fees at least 12.5% above the pending one's;
   * dropped from the node's pool (anvil drops what a base-fee spike priced out; a reorg
     drops the transactions of the lost blocks): send again, same nonce.

4. **Deadline.** Chain time is authoritative: once ``head.timestamp + margin >= deadline``
   with nothing mined, :class:`DeadlineMissed` (a ``FundsAtRiskError``) is raised.  A
   Trio cancel scope, re-armed at every head to the wall-clock estimate of the deadline,
   is the backstop when the node stops producing blocks.

Idempotent by ``intent.key``: a second ``submit`` with the same key while one is in
flight joins it; after a success it returns the recorded ``TxOutcome``.  Nonces are
managed per sending key by :class:`NonceManager`; an intent that ends with its
transaction unmined abandons its nonce, and the next intent takes it over (see there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Literal

import attrs
import trio

from channel.chain import Block, TxOutcome
from channel.errors import ChainError, FundsAtRiskError, Reverted
from dispute.eth import CallRequest, EthBackend, Receipt
from dispute.nonces import (
    NonceManager,
    SendUnknown,
    already_known,
    nonce_too_low,
    price_refused,
    shielded_send,
)
from dispute.policy import DEFAULT_MARGIN, Fees, FeeSchedule, replacement_fees, underpriced
from dispute.tx import KeyLike, SignedTx, TxParams, address_of, sign

log = logging.getLogger("dispute.submitter")

StillNeeded = Callable[[], Awaitable[bool]]

BACKSTOP_GRACE = 2.0
"""Seconds past the wall-clock estimate of the deadline before a silent node counts as
having missed it (the estimate is from the head's timestamp, so it errs late anyway)."""


async def _always_needed() -> bool:
    return True


@attrs.frozen(kw_only=True)
class Intent:
    """A transaction the caller needs mined: ``key`` makes it idempotent, e.g.
    ``(channel_id, version, "refute")``; ``deadline`` is chain time (unix seconds) by
    which it must be in a block, or None; ``still_needed`` returns False once the chain
    makes the transaction pointless (it already holds an equal or newer state);
    ``started_at`` is when the window began (the claim's block time) — the fee schedule
    escalates over ``started_at .. deadline``; None means when ``submit`` was called."""

    key: Hashable
    to: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    data: bytes = b""
    value: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    deadline: int | None = None
    still_needed: StillNeeded = attrs.field(default=_always_needed, eq=False)
    started_at: int | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or repr(self.key)


@attrs.frozen(kw_only=True)
class StoodDown:
    """``submit`` did not (or no longer needs to) get a transaction mined: the chain
    already holds what the intent was for.  Not an error."""

    key: Hashable
    reason: str


class DeadlineMissed(FundsAtRiskError):
    """An intent's transaction was not mined before its deadline.  Never swallow it."""


AttemptKind = Literal["send", "replace", "rebroadcast", "fresh-nonce"]


@attrs.frozen(kw_only=True)
class Attempt:
    """One transaction sent for an intent (statistics and logs)."""

    kind: AttemptKind
    nonce: int
    tx_hash: bytes
    fees: Fees
    head: int


# ----------------------------------------------------------------- the submitter


@attrs.define
class _Flight:
    done: trio.Event = attrs.Factory(trio.Event)
    result: TxOutcome | StoodDown | None = None
    error: Exception | None = None


@attrs.define
class _Track:
    """The live state of one intent's transaction (same nonce across replacements)."""

    nonce: int
    sent: list[SignedTx]
    sent_head: int
    mined: Receipt | None = None


class Submitter:
    """Sends intents from one key.  Construct once per key; share it between tasks.

    ``confirmations``: blocks on top of (and including) the receipt's before ``submit``
    returns.  ``stuck_blocks``: blocks a pending transaction may wait before it is
    replaced anyway.  ``margin``: seconds between the head and the next block (see
    ``dispute.policy``).  ``gas_margin_permille``: added to ``eth_estimateGas``.
    """

    def __init__(
        self,
        backend: EthBackend,
        signer: KeyLike,
        *,
        chain_id: int,
        confirmations: int = 3,
        poll_interval: float = 1.0,
        max_fee_cap: int | None = None,
        fees: FeeSchedule | None = None,
        stuck_blocks: int = 3,
        margin: int = DEFAULT_MARGIN,
        gas_margin_permille: int = 200,
    ) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be >= 1")
        schedule = fees or FeeSchedule()
        if max_fee_cap is not None:
            schedule = attrs.evolve(schedule, max_fee_cap=max_fee_cap)
        self.backend = backend
        self.chain_id = chain_id
        self.confirmations = confirmations
        self.poll_interval = poll_interval
        self.schedule = schedule
        self.stuck_blocks = stuck_blocks
        self.margin = margin
        self.gas_margin_permille = gas_margin_permille
        self._key = signer
        self.address = address_of(signer)
        self.nonces = NonceManager(backend, self.address)
        self._flights: dict[Hashable, _Flight] = {}
        self._done: dict[Hashable, TxOutcome] = {}
        self._attempts: dict[Hashable, list[Attempt]] = {}

    def attempts(self, key: Hashable) -> tuple[Attempt, ...]:
        """Every transaction sent for ``key`` so far, in order."""
        return tuple(self._attempts.get(key, ()))

    async def submit(self, intent: Intent) -> TxOutcome | StoodDown:
        """Get ``intent`` mined and confirmed; see the module docstring.

        Returns the ``TxOutcome`` (``success`` false if it was mined but reverted and
        ``still_needed`` still says it is needed), or ``StoodDown``.  Raises ``Reverted``
        when the dry run reverts, ``DeadlineMissed`` when the deadline passes first,
        ``ChainError`` when the node fails.
        """
        while True:
            if intent.key in self._done:
                return self._done[intent.key]
            flight = self._flights.get(intent.key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.result is not None:
                return flight.result
            # the first submitter was cancelled: take over

        flight = self._flights[intent.key] = _Flight()
        try:
            result = await self._run(intent)
        except Exception as exc:
            flight.error = exc
            raise
        else:
            flight.result = result
            if isinstance(result, TxOutcome) and result.success:
                self._done[intent.key] = result
            return result
        finally:
            del self._flights[intent.key]
            flight.done.set()

    # -------------------------------------------------------------- one intent

    async def _run(self, intent: Intent) -> TxOutcome | StoodDown:
        if not await intent.still_needed():
            return StoodDown(key=intent.key, reason="the chain already holds it")
        req = CallRequest(to=intent.to, data=intent.data, value=intent.value, sender=self.address)
        try:
            await self.backend.call(req)
            estimate = await self.backend.estimate_gas(req)
        except Reverted as exc:
            if not await intent.still_needed():
                return StoodDown(key=intent.key, reason=f"dry run reverted and not needed: {exc}")
            raise Reverted(f"{intent.name}: dry run reverted: {exc}", data=exc.data) from exc
        gas = estimate + math.ceil(estimate * self.gas_margin_permille / 1000)
        head = await self.backend.block("latest")
        started_at = head.timestamp if intent.started_at is None else intent.started_at
        track: _Track | None = None
        confirmed = False  # our transaction is mined, with its confirmations

        with trio.CancelScope() as backstop:
            try:
                track = await self._send(intent, gas, head, started_at, None, "send")
                # None: the node refused it for its price; retried at the next head
                while True:
                    # Armed only while nothing is mined: confirmations may come after the
                    # deadline.  The head's time lags the chain's, so this errs late.
                    if intent.deadline is not None and (track is None or track.mined is None):
                        backstop.deadline = (
                            trio.current_time()
                            + max(intent.deadline - head.timestamp, 0)
                            + max(10 * self.poll_interval, BACKSTOP_GRACE)
                        )
                    else:
                        backstop.deadline = math.inf
                    head = await self._wait_new_head(head)
                    outcome, track = await self._step(intent, gas, head, started_at, track)
                    if outcome is not None:
                        confirmed = track is not None and track.mined is not None
                        return outcome
            finally:
                if track is not None:
                    if confirmed:
                        self.nonces.release(track.nonce, intent.key)
                    else:  # ours may still be pending there (or be mined again, after a reorg)
                        self.nonces.abandon(track.nonce, intent.key, track.sent[-1])
        # the backstop fired: the node produced no block we could use before the deadline
        raise DeadlineMissed(
            f"{intent.name}: no block before the deadline {intent.deadline} "
            f"(last head #{head.number} at {head.timestamp})"
        )

    async def _step(
        self, intent: Intent, gas: int, head: Block, started_at: int, track: _Track | None
    ) -> tuple[TxOutcome | StoodDown | None, _Track | None]:
        """One block's worth of tracking; returns an outcome when the intent is done."""
        if track is None:
            self._check_deadline(intent, head, None)
            if not await intent.still_needed():
                return StoodDown(key=intent.key, reason="chain holds it"), None
            return None, await self._send(intent, gas, head, started_at, None, "fresh-nonce")
        receipt = await self._canonical_receipt(track)
        if receipt is not None:
            if track.mined is None or track.mined.block_hash != receipt.block_hash:
                log.info("%s: mined in #%d", intent.name, receipt.block_number)
            track.mined = receipt
            if receipt.status != 1:
                # mined but reverted: most likely someone else got there first
                if not await intent.still_needed():
                    return StoodDown(key=intent.key, reason="reverted: already on chain"), track
                if head.number - receipt.block_number + 1 >= self.confirmations:
                    return self._outcome(receipt, success=False), track
                return None, track
            if head.number - receipt.block_number + 1 >= self.confirmations:
                return self._outcome(receipt, success=True), track
            return None, track
        if track.mined is not None:
            log.warning("%s: reorged out of #%d; re-sending", intent.name, track.mined.block_number)
            track.mined = None

        if self._too_late(intent, head):
            needed = await intent.still_needed()
            receipt = await self._canonical_receipt(track)
            if receipt is not None:
                # Ours landed at the last moment (while we asked): neither a stand-down
                # nor a missed deadline; the next heads count its confirmations.
                track.mined = receipt
                return None, track
            if not needed:
                return StoodDown(key=intent.key, reason="window over; chain holds it"), track
            self._check_deadline(intent, head, track.nonce)

        latest = await self.backend.nonce(self.address, "latest")
        if latest > track.nonce:
            # the nonce was used — by us (a receipt appeared just now) or by someone else
            if await self._canonical_receipt(track) is not None:
                return None, track
            log.warning("%s: nonce %d taken by another transaction", intent.name, track.nonce)
            self.nonces.release(track.nonce, intent.key)
            if not await intent.still_needed():
                return StoodDown(key=intent.key, reason="nonce taken; chain holds it"), track
            return None, await self._send(intent, gas, head, started_at, None, "fresh-nonce")

        last = track.sent[-1]
        wanted = self.schedule.fees(
            now=head.timestamp,
            deadline=intent.deadline,
            base_fee=head.base_fee,
            started_at=started_at,
        )
        if latest < track.nonce and any(n < track.nonce for n in self.nonces.abandoned):
            # A transaction abandoned below ours holds it up: cancel it, at our fees.
            await self.nonces.unblock(track.nonce, self._cancel_builder(wanted), head.base_fee)
        known = await self.backend.transaction(last.tx_hash) is not None
        prev = last.params.fees
        needs_more = (
            underpriced(prev, head.base_fee)
            or wanted.max_priority_fee_per_gas > prev.max_priority_fee_per_gas
            or head.number - track.sent_head >= self.stuck_blocks
        )
        if not known and not needs_more:
            await self._broadcast(intent, last, head, "rebroadcast")
            track.sent_head = head.number
        elif needs_more:
            await self._send(intent, gas, head, started_at, track, "replace")
        return None, track

    # -------------------------------------------------------------- helpers

    def _too_late(self, intent: Intent, head: Block) -> bool:
        return intent.deadline is not None and head.timestamp + self.margin >= intent.deadline

    def _check_deadline(self, intent: Intent, head: Block, nonce: int | None) -> None:
        """Raise ``DeadlineMissed`` when no block we can still reach is before the deadline."""
        if self._too_late(intent, head):
            raise DeadlineMissed(
                f"{intent.name}: not mined by the deadline {intent.deadline} "
                f"(head #{head.number} at {head.timestamp}, nonce {nonce})"
            )

    async def _send(
        self,
        intent: Intent,
        gas: int,
        head: Block,
        started_at: int,
        track: _Track | None,
        kind: AttemptKind,
    ) -> _Track | None:
        """Send a new transaction: on a fresh nonce (``track`` None) or replacing
        ``track``'s latest one with higher fees.  Returns the (new) track, or None when
        the node refused a fresh transaction for its price (retried at the next head)."""
        wanted = self.schedule.fees(
            now=head.timestamp,
            deadline=intent.deadline,
            base_fee=head.base_fee,
            started_at=started_at,
        )

        def build(nonce: int, fees: Fees) -> SignedTx:
            params = TxParams(
                chain_id=self.chain_id,
                nonce=nonce,
                gas=gas,
                fees=fees,
                to=intent.to,
                value=intent.value,
                data=intent.data,
            )
            return sign(params, self._key)

        def fresh(nonce: int, outbid: Fees | None) -> SignedTx | None:
            if outbid is None:
                return build(nonce, wanted)
            fees = replacement_fees(outbid, wanted, self.schedule.max_fee_cap)
            return None if fees is None else build(nonce, fees)

        if track is None:
            try:
                tx = await self.nonces.send_new(intent.key, fresh)
            except ChainError as exc:
                if not price_refused(exc):
                    raise
                log.warning("%s: refused for its price (%s); next head retries", intent.name, exc)
                return None
            self._record(intent, kind, tx, head)
            return _Track(nonce=tx.params.nonce, sent=[tx], sent_head=head.number)

        fees = replacement_fees(track.sent[-1].params.fees, wanted, self.schedule.max_fee_cap)
        if fees is None:
            log.warning("%s: fee cap reached; waiting on the pending transaction", intent.name)
            return track
        tx = build(track.nonce, fees)
        try:
            accepted = await self._broadcast(intent, tx, head, kind)
        except SendUnknown:
            track.sent.append(tx)  # the node may hold it: outbid this one from now on
            raise
        if accepted:
            track.sent.append(tx)
            track.sent_head = head.number
        return track

    def _cancel_builder(self, wanted: Fees) -> Callable[[int, Fees], SignedTx | None]:
        """Builds a cancel: a transfer of nothing to ourselves at ``nonce``, outbidding
        the transaction there (None when the fee cap does not allow it)."""

        def build(nonce: int, outbid: Fees) -> SignedTx | None:
            fees = replacement_fees(outbid, wanted, self.schedule.max_fee_cap)
            if fees is None:
                return None
            params = TxParams(
                chain_id=self.chain_id, nonce=nonce, gas=21_000, fees=fees, to=self.address
            )
            return sign(params, self._key)

        return build

    async def _broadcast(
        self, intent: Intent, tx: SignedTx, head: Block, kind: AttemptKind
    ) -> bool:
        """Send ``tx``; False if the node refused it in a way the next block sorts out."""
        try:
            await shielded_send(self.backend, tx)
        except ChainError as exc:
            if already_known(exc):
                return True
            if nonce_too_low(exc) or price_refused(exc):
                log.info("%s: %s refused (%s); next block decides", intent.name, kind, exc)
                return False
            raise
        self._record(intent, kind, tx, head)
        return True

    def _record(self, intent: Intent, kind: AttemptKind, tx: SignedTx, head: Block) -> None:
        attempt = Attempt(
            kind=kind,
            nonce=tx.params.nonce,
            tx_hash=tx.tx_hash,
            fees=tx.params.fees,
            head=head.number,
        )
        self._attempts.setdefault(intent.key, []).append(attempt)
        log.info(
            "%s: %s nonce %d tx %s max fee %d priority %d at #%d",
            intent.name,
            kind,
            tx.params.nonce,
            tx.tx_hash.hex(),
            tx.params.fees.max_fee_per_gas,
            tx.params.fees.max_priority_fee_per_gas,
            head.number,
        )

    async def _canonical_receipt(self, track: _Track) -> Receipt | None:
        """The receipt of whichever of ``track``'s transactions is mined on the canonical
        chain, or None."""
        for tx in reversed(track.sent):
            receipt = await self.backend.receipt(tx.tx_hash)
            if receipt is None:
                continue
            try:
                block = await self.backend.block(receipt.block_number)
            except ChainError:
                continue  # the block is gone (the chain got shorter)
            if block.hash == receipt.block_hash:
                return receipt
        return None

    async def _wait_new_head(self, head: Block) -> Block:
        """Poll (once per ``poll_interval``) until the head changes."""
        while True:
            await trio.sleep(self.poll_interval)
            new = await self.backend.block("latest")
            if new.number != head.number or new.hash != head.hash:
                return new

    @staticmethod
    def _outcome(receipt: Receipt, *, success: bool) -> TxOutcome:
        return TxOutcome(
            tx_hash=receipt.tx_hash,
            block_number=receipt.block_number,
            gas_used=receipt.gas_used,
            success=success,
            error="" if success else "reverted on chain",
        )
