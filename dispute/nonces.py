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
        #: Abandoned nonces and the fees of the transaction left pending at each.
        self._abandoned: dict[int, Fees] = {}
        self._lock = trio.Lock()

    @property
    def owned(self) -> dict[int, Hashable]:
        return dict(self._owned)

    @property
    def abandoned(self) -> dict[int, Fees]:
        return dict(self._abandoned)

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
                tx = build(nonce, None)
                assert tx is not None
                try:
                    await shielded_send(self._backend, tx)
                except ChainError as exc:
                    if nonce_too_low(exc):  # someone else used this key meanwhile
                        nonce = max(nonce + 1, await self._backend.nonce(self.address, "pending"))
                        continue
                    raise
                self._owned[nonce] = key
                return tx
            raise ChainError(f"no usable nonce for {self.address.hex()} after 8 tries")

    async def _take_over(
        self, key: Hashable, build: Callable[[int, Fees | None], SignedTx | None]
    ) -> SignedTx | None:
        if not self._abandoned:
            return None
        mined = await self._backend.nonce(self.address, "latest")
        for nonce in sorted(self._abandoned):
            if nonce < mined:  # consumed: by the abandoned transaction or another
                del self._abandoned[nonce]
                continue
            tx = build(nonce, self._abandoned[nonce])
            if tx is None:
                return None  # cannot outbid it under the fee cap: a fresh nonce then
            try:
                await shielded_send(self._backend, tx)
            except ChainError as exc:
                if nonce_too_low(exc):  # mined just now
                    del self._abandoned[nonce]
                    continue
                if price_refused(exc):
                    log.info("nonce %d: the node refused to replace it (%s)", nonce, exc)
                    return None
                raise
            del self._abandoned[nonce]
            self._owned[nonce] = key
            log.info("nonce %d: taken over from an abandoned transaction", nonce)
            return tx
        return None

    def release(self, nonce: int, key: Hashable) -> None:
        """``key`` is done with ``nonce``: its transaction is mined (or none is pending)."""
        if self._owned.get(nonce) == key:
            del self._owned[nonce]

    def abandon(self, nonce: int, key: Hashable, fees: Fees) -> None:
        """``key`` is done with ``nonce`` but its transaction there, sent with ``fees``,
        may still be pending: the next intent takes the nonce over."""
        if self._owned.get(nonce) == key:
            del self._owned[nonce]
            self._abandoned[nonce] = fees


async def shielded_send(backend: EthBackend, tx: SignedTx) -> None:
    """Send ``tx``; a cancellation waits until the node has answered (the RPC timeout
    bounds it), so that a transaction the node took is always recorded as ours."""
    with trio.CancelScope(shield=True):
        await backend.send_raw_transaction(tx.raw)


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
