"""Nonces of one sending key (DESIGN §6), shared by every intent the submitter sends.

:class:`NonceManager` hands each intent a nonce of its own, re-syncing with the node's
view of the key, and hands an abandoned one (a transaction left unmined in the pool) to
the next intent.  The helpers classify a node's refusal of a raw transaction by its
message (nodes differ in the wording, not in the meaning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import trio

from channel.errors import ChainError
from dispute.eth import EthBackend
from dispute.policy import Fees
from dispute.tx import SignedTx

log = logging.getLogger("dispute.submitter")


class NonceManager:
    """The next nonce of one sending address, kept locally.

    A nonce belongs to one intent from the moment its transaction is accepted by the node
    until the intent releases it; no other intent gets it meanwhile, even when the node
    forgets the transaction (a reorg, a pool eviction).  The local view re-syncs from the
    node's ``pending`` count at every allocation, so a transaction sent from the same key
    elsewhere is skipped over, and a nonce nobody owns any more is used again.

    An intent that ends with its transaction still unmined (it stood down, missed its
    deadline, or its caller cancelled it) *abandons* the nonce: the transaction may sit in
    the pool, and every later nonce of the key waits behind it — a refute priced for
    yesterday's base fee would hold up today's urgent one until it is mined (and then
    land, or revert and burn gas, long after anyone wanted it).  The next intent takes an
    abandoned nonce over: its own transaction at that nonce, with fees above the
    abandoned one's, so the abandoned one can never be mined.
    """

    def __init__(self, backend: EthBackend, address: bytes) -> None:
        self.address = address
        self._backend = backend
        self._owned: dict[int, Hashable] = {}
        #: Abandoned nonces and the transaction last sent at each (it may be pending).
        self._abandoned: dict[int, SignedTx] = {}
        self._lock = trio.Lock()

    @property
    def owned(self) -> dict[int, Hashable]:
        return dict(self._owned)

    @property
    def abandoned(self) -> dict[int, Fees]:
        """Each abandoned nonce, with the fees of the transaction left at it."""
        return {n: tx.params.fees for n, tx in self._abandoned.items()}

    async def send_new(
        self, key: Hashable, build: Callable[[int, Fees | None], SignedTx | None]
    ) -> SignedTx:
        """Sign and send ``build(nonce, outbid)`` and record that the nonce belongs to
        ``key``.  The nonce is the lowest abandoned one still unmined, with ``outbid`` the
        fees of the transaction pending there (``build`` returns None if it cannot pay
        enough more), else the next free one (``outbid`` None).  Raises ``ChainError`` if
        the node refuses it."""
        async with self._lock:
            tx = await self._take_over(key, build)
            if tx is not None:
                return tx
            pending = await self._backend.nonce(self.address, "pending")
            nonce = max(pending, max(self._owned, default=-1) + 1)
            for _ in range(8):
                while nonce in self._owned:
                    nonce += 1
                tx = build(nonce, None)
                assert tx is not None
                try:
                    await shielded_send(self._backend, tx)
                except SendUnknown:
                    self._abandoned[nonce] = tx  # the node may hold it
                    raise
                except ChainError as exc:
                    if nonce_too_low(exc):  # someone else used this key meanwhile
                        nonce = max(nonce + 1, await self._backend.nonce(self.address, "pending"))
                        continue
                    raise
                self._abandoned.pop(nonce, None)  # (forgotten by the node: ours now)
                self._owned[nonce] = key
                return tx
            raise ChainError(f"no usable nonce for {self.address.hex()} after 8 tries")

    async def _take_over(
        self, key: Hashable, build: Callable[[int, Fees | None], SignedTx | None]
    ) -> SignedTx | None:
        if not self._abandoned:
            return None
        for nonce in await self._unmined_abandoned():
            if nonce in self._owned:
                continue
            tx = build(nonce, self._abandoned[nonce].params.fees)
            if tx is None:
                return None  # cannot outbid it under the fee cap: a fresh nonce then
            try:
                await shielded_send(self._backend, tx)
            except SendUnknown:
                self._abandoned[nonce] = tx  # the node may hold this one now
                raise
            except ChainError as exc:
                if nonce_too_low(exc):  # mined just now
                    del self._abandoned[nonce]
                    continue
                # Refused for its price, or for anything else: a fresh nonce serves this
                # intent, and the next one tries the takeover again.
                log.warning("nonce %d: the node refused to take it over (%s)", nonce, exc)
                return None
            del self._abandoned[nonce]
            self._owned[nonce] = key
            log.info("nonce %d: taken over from an abandoned transaction", nonce)
            return tx
        return None

    async def _unmined_abandoned(self) -> list[int]:
        """The abandoned nonces the chain has not consumed yet, lowest first (the others
        are forgotten: mined, by the abandoned transaction or another)."""
        if not self._abandoned:
            return []
        mined = await self._backend.nonce(self.address, "latest")
        for nonce in [n for n in self._abandoned if n < mined]:
            del self._abandoned[nonce]
        return sorted(self._abandoned)

    async def unblock(
        self, below: int, build_cancel: Callable[[int, Fees], SignedTx | None], base_fee: int
    ) -> list[SignedTx]:
        """Cancel the abandoned transactions that hold up nonce ``below`` (an intent in
        flight there, sent before they were abandoned): at each abandoned nonce under it
        whose transaction the node no longer has or that ``base_fee`` prices out, send
        ``build_cancel(nonce, fees of the one there)`` (a transfer of nothing to
        ourselves, outbidding it).  The cancel stays abandoned until mined.  Returns the
        cancels sent."""
        sent: list[SignedTx] = []
        async with self._lock:
            for nonce in await self._unmined_abandoned():
                if nonce >= below or nonce in self._owned:
                    continue
                left = self._abandoned[nonce]
                if left.params.fees.max_fee_per_gas >= base_fee and (
                    await self._backend.transaction(left.tx_hash) is not None
                ):
                    continue  # it can be mined as it is: no need to pay for a cancel
                tx = build_cancel(nonce, left.params.fees)
                if tx is None:
                    continue
                try:
                    await shielded_send(self._backend, tx)
                except SendUnknown:
                    self._abandoned[nonce] = tx
                    continue
                except ChainError as exc:
                    if nonce_too_low(exc):
                        del self._abandoned[nonce]
                    else:
                        log.warning("nonce %d: cancel refused (%s)", nonce, exc)
                    continue
                self._abandoned[nonce] = tx
                log.info("nonce %d: cancelled (it held up nonce %d)", nonce, below)
                sent.append(tx)
        return sent

    def release(self, nonce: int, key: Hashable) -> None:
        """``key`` is done with ``nonce``: its transaction is mined (or none is pending)."""
        if self._owned.get(nonce) == key:
            del self._owned[nonce]

    def abandon(self, nonce: int, key: Hashable, tx: SignedTx) -> None:
        """``key`` is done with ``nonce`` but ``tx``, the last transaction it sent there,
        may still be pending: the next intent takes the nonce over."""
        if self._owned.get(nonce) == key:
            del self._owned[nonce]
            self._abandoned[nonce] = tx


#: Seconds a send may take before its outcome counts as unknown (``SendUnknown``).
SEND_TIMEOUT = 10.0


class SendUnknown(ChainError):
    """The node did not answer a send within ``SEND_TIMEOUT``: it may hold the
    transaction, or not."""


async def shielded_send(backend: EthBackend, tx: SignedTx) -> None:
    """Send ``tx``.  A cancellation waits until the node has answered, so that a
    transaction the node took is always recorded as ours; for at most ``SEND_TIMEOUT``,
    then ``SendUnknown`` is raised (and the caller records the transaction as possibly
    pending)."""
    with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT) as waited:
        await backend.send_raw_transaction(tx.raw)
    if waited.cancelled_caught:
        raise SendUnknown(f"no answer to sending {tx.tx_hash.hex()} within {SEND_TIMEOUT}s")


def nonce_too_low(exc: ChainError) -> bool:
    text = str(exc).lower()
    return "nonce too low" in text or "nonce is too low" in text or "already imported" in text


def already_known(exc: ChainError) -> bool:
    text = str(exc).lower()
    return "already known" in text or "already imported" in text or "known transaction" in text


def price_refused(exc: ChainError) -> bool:
    """The node refused a transaction for its fees (underpriced replacement, max fee
    below the base fee, below the pool's minimum)."""
    text = str(exc).lower()
    return any(
        s in text
        for s in ("underpriced", "less than block base fee", "fee cap", "max fee per gas less")
    )
