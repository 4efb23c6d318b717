"""The low-level Ethereum interface that every chain backend implements.

Two backends: ``dispute.rpc.JsonRpcBackend`` (any node over JSON-RPC; trio-native, httpx)
and ``dispute.embedded.EmbeddedBackend`` (py-evm through eth-tester, in-process).  One
conformance suite (``tests/dispute/test_conformance.py``) runs against both.  Everything
above this layer — ABI encoding, transaction signing, the submitter — is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeAlias

import attrs

from channel.chain import Block

BlockId: TypeAlias = int | Literal["latest", "pending", "safe", "finalized", "earliest"]


@attrs.frozen(kw_only=True)
class CallRequest:
    """An ``eth_call`` / ``eth_estimateGas`` request."""

    to: bytes
    data: bytes = b""
    value: int = 0
    sender: bytes | None = None
    gas: int | None = None


@attrs.frozen(kw_only=True)
class Log:
    address: bytes
    topics: tuple[bytes, ...]
    data: bytes
    block_number: int
    block_hash: bytes
    tx_hash: bytes
    log_index: int
    removed: bool = False


@attrs.frozen(kw_only=True)
class Receipt:
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    status: int
    gas_used: int
    effective_gas_price: int
    contract_address: bytes | None
    logs: tuple[Log, ...]


@attrs.frozen(kw_only=True)
class Transaction:
    """The fields of a mined or pending transaction that the dispute module reads."""

    tx_hash: bytes
    sender: bytes
    to: bytes | None
    nonce: int
    input: bytes
    value: int
    block_number: int | None


class EthBackend(Protocol):
    """The JSON-RPC subset optichannel needs.  Errors raise ``channel.errors.ChainError``;
    a reverting ``call``/``estimate_gas`` raises ``channel.errors.Reverted`` with the revert data.
    """

    async def chain_id(self) -> int: ...

    async def block(self, block: BlockId = "latest") -> Block: ...

    async def call(self, req: CallRequest, block: BlockId = "latest") -> bytes: ...

    async def estimate_gas(self, req: CallRequest) -> int: ...

    async def send_raw_transaction(self, raw: bytes) -> bytes: ...

    async def receipt(self, tx_hash: bytes) -> Receipt | None: ...

    async def transaction(self, tx_hash: bytes) -> Transaction | None: ...

    async def nonce(self, address: bytes, block: BlockId = "pending") -> int: ...

    async def balance(self, address: bytes, block: BlockId = "latest") -> int: ...

    async def code(self, address: bytes, block: BlockId = "latest") -> bytes: ...

    async def logs(
        self,
        *,
        address: bytes,
        from_block: int,
        to_block: int,
        topics: Sequence[Sequence[bytes] | bytes | None] = (),
    ) -> list[Log]: ...

    async def max_priority_fee(self) -> int: ...

    async def aclose(self) -> None: ...
