"""Controls of a development node (anvil): time travel, mining, snapshots, reorgs, fees.

Test-only.  These are the non-standard ``evm_*`` / ``anvil_*`` methods that the reorg and
gas-spike tests of the submitter drive; a production node refuses them.  The embedded
backend (``dispute.embedded.EmbeddedBackend``) has the same :class:`TimeControl` methods.

    async with DevNodeControl(node.url) as dev:
        snap = await dev.snapshot()
        await dev.increase_time(3600)
        await dev.mine()
        await dev.revert(snap)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from channel.errors import ChainError
from dispute.rpc import JsonRpcBackend, hex_data, hex_quantity, parse_quantity


class TimeControl(Protocol):
    """What both a dev node and the embedded backend let a test do to the clock and state."""

    async def increase_time(self, seconds: int) -> None: ...

    async def mine(self, blocks: int = 1) -> None: ...

    async def snapshot(self) -> str: ...

    async def revert(self, snapshot_id: str) -> bool: ...


class DevNodeControl:
    """Test controls of the anvil at ``backend`` (a URL, or a ``JsonRpcBackend`` to share).

    Every method raises ``ChainError`` if the node refuses (e.g. it is not a dev node).
    """

    def __init__(self, backend: str | JsonRpcBackend, *, timeout: float = 30.0) -> None:
        if isinstance(backend, JsonRpcBackend):
            self._rpc, self._own = backend, False
        else:
            self._rpc, self._own = JsonRpcBackend(backend, timeout=timeout), True

    async def __aenter__(self) -> DevNodeControl:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._rpc.aclose()

    async def _req(self, method: str, params: Sequence[Any] = ()) -> Any:
        return await self._rpc.request(method, params)

    # ---------------------------------------------------------------- time and blocks

    async def increase_time(self, seconds: int) -> None:
        """Move the clock forward; the next mined block carries the new time."""
        await self._req("evm_increaseTime", [seconds])

    async def set_next_block_timestamp(self, timestamp: int) -> None:
        await self._req("evm_setNextBlockTimestamp", [timestamp])

    async def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks now (including whatever is in the mempool)."""
        if blocks == 1:
            await self._req("evm_mine", [])
        else:
            await self._req("anvil_mine", [hex_quantity(blocks)])

    async def set_automine(self, enabled: bool) -> None:
        """Off: transactions wait in the mempool until :meth:`mine` (or interval mining)."""
        await self._req("evm_setAutomine", [enabled])

    async def set_interval_mining(self, seconds: int) -> None:
        """Mine a block every ``seconds`` (0 turns interval mining off)."""
        await self._req("evm_setIntervalMining", [seconds])

    # ---------------------------------------------------------------- state

    async def snapshot(self) -> str:
        """Snapshot the chain; returns an id for :meth:`revert` (single use on anvil)."""
        result = await self._req("evm_snapshot")
        return str(result)

    async def revert(self, snapshot_id: str) -> bool:
        """Roll the chain back to a snapshot; false if the node did not know the id."""
        return bool(await self._req("evm_revert", [snapshot_id]))

    async def reorg(self, depth: int, txs: Sequence[tuple[bytes, int]] = ()) -> None:
        """Replace the last ``depth`` blocks with new ones (``anvil_reorg``).

        ``txs`` are (raw signed transaction, block offset within the new blocks) to include;
        everything that was in the dropped blocks and is not re-included is gone.
        """
        await self._req("anvil_reorg", [depth, [[hex_data(raw), off] for raw, off in txs]])

    async def rollback(self, depth: int) -> None:
        """Drop the last ``depth`` blocks without replacing them (``anvil_rollback``)."""
        await self._req("anvil_rollback", [depth])

    async def set_balance(self, address: bytes, wei: int) -> None:
        await self._req("anvil_setBalance", [hex_data(address), hex_quantity(wei)])

    async def fund(self, address: bytes, wei: int) -> None:
        """Set the balance to ``wei`` (anvil can; the embedded backend's ``fund`` transfers
        ``wei`` from a prefunded account instead, so it adds).  For a fresh address both
        leave it holding ``wei``."""
        await self.set_balance(address, wei)

    async def set_code(self, address: bytes, code: bytes) -> None:
        await self._req("anvil_setCode", [hex_data(address), hex_data(code)])

    async def set_nonce(self, address: bytes, nonce: int) -> None:
        await self._req("anvil_setNonce", [hex_data(address), hex_quantity(nonce)])

    # ---------------------------------------------------------------- fees and mempool

    async def set_next_block_base_fee(self, wei: int) -> None:
        """Base fee of the next block (a gas-price spike, or a calm after one)."""
        await self._req("anvil_setNextBlockBaseFeePerGas", [hex_quantity(wei)])

    async def drop_transaction(self, tx_hash: bytes) -> None:
        """Remove a pending transaction from the mempool."""
        await self._req("anvil_dropTransaction", [hex_data(tx_hash)])

    async def pending_count(self) -> int:
        """Pending transactions in the mempool (``txpool_status``)."""
        status = await self._req("txpool_status")
        if not isinstance(status, dict):
            raise ChainError(f"txpool_status: malformed result {status!r}")
        return parse_quantity(status.get("pending", "0x0"))
