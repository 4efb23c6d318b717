"""``EthBackend`` in-process: py-evm through eth-tester, for the zero-setup demo and fast tests.

The chain is eth-tester's ``PyEVMBackend`` pinned to the **Cancun** fork (the artifact is
compiled for ``evmVersion`` cancun; eth-tester's default is Prague) with our own chain id.
It behaves like an automining dev node: every accepted transaction is mined at once into
its own block, and block timestamps follow the wall clock plus whatever
:meth:`EmbeddedBackend.increase_time` added, as anvil's do.

The EVM is blocking Python; every call runs in a worker thread
(``trio.to_thread.run_sync``) behind one ``trio.Lock``, so the Trio loop never stalls and
only one thread touches the EVM at a time.  Cancelling a caller waiting for the lock
is safe; once its EVM work has started it runs to completion.

Test-only powers — time travel, mining, snapshots, :meth:`EmbeddedBackend.fund` from a
prefunded account — are methods here, with the names ``dispute.devnode.DevNodeControl``
uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio
from eth.abc import BlockAPI, ComputationAPI
from eth.exceptions import HeaderNotFound, Revert, VMError
from eth.vm.forks.cancun import CancunVM
from eth.vm.spoof import SpoofTransaction
from eth_account import Account
from eth_tester.backends.pyevm.main import PyEVMBackend  # type: ignore[import-untyped]
from eth_tester.exceptions import BlockNotFound, TransactionNotFound  # type: ignore[import-untyped]
from eth_utils.exceptions import ValidationError

from channel.chain import Block
from channel.errors import ChainError, Reverted
from channel.hashing import ZERO_ADDRESS, to_checksum
from dispute.eth import BlockId, CallRequest, Log, Receipt, Transaction

T = TypeVar("T")

DEFAULT_CHAIN_ID = 31337
PRIORITY_FEE = 10**9  # what eth-tester assumes when a transaction names none
_FUND_GAS = 21_000


def _describe(data: bytes) -> str:
    from dispute.abi import describe_revert

    return describe_revert(data)


def _topic_bytes(t: int | bytes) -> bytes:
    return t if isinstance(t, bytes) else t.to_bytes(32, "big")


def _matches(topics: tuple[bytes, ...], want: Sequence[Sequence[bytes] | bytes | None]) -> bool:
    if len(want) > len(topics):
        return False
    for have, w in zip(topics, want, strict=False):
        if w is None:
            continue
        if isinstance(w, bytes | bytearray):
            if have != bytes(w):
                return False
        elif have not in {bytes(x) for x in w}:
            return False
    return True


class EmbeddedBackend:
    """An in-process Cancun chain (py-evm) implementing ``EthBackend``.

    Every method raises ``ChainError`` on failure; ``call``/``estimate_gas`` raise
    ``Reverted`` with the revert data.  Not thread-safe outside its own lock: use it
    from Trio tasks only.
    """

    def __init__(self, *, chain_id: int = DEFAULT_CHAIN_ID, accounts: int = 3) -> None:
        backend = PyEVMBackend(
            vm_configuration=((0, CancunVM),),
            genesis_parameters=PyEVMBackend.generate_genesis_params(),
            genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts),
        )
        # eth-tester makes a fresh chain class per backend; the id is a class attribute.
        type(backend.chain).chain_id = chain_id
        self._evm = backend
        self._lock = trio.Lock()
        self._offset = 0  # seconds added by increase_time, as anvil keeps them
        self._automine = True
        self._funder = Account.from_key(backend.account_keys[0].to_bytes())

    # ---------------------------------------------------------------- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args)

    @property
    def _chain(self) -> Any:
        return self._evm.chain

    def _head(self) -> BlockAPI:
        """The newest mined block (the chain's own head is the pending block)."""
        pending = self._chain.get_block()
        block: BlockAPI = self._chain.get_canonical_block_by_number(max(0, pending.number - 1))
        return block

    def _block_at(self, block: BlockId) -> BlockAPI:
        if block in ("latest", "safe", "finalized"):
            return self._head()
        if block == "pending":
            pending: BlockAPI = self._chain.get_block()
            return pending
        if block == "earliest":
            block = 0
        assert isinstance(block, int)
        if block > self._head().number:
            raise ChainError(f"no block {block}: the head is {self._head().number}")
        try:
            found: BlockAPI = self._chain.get_canonical_block_by_number(block)
        except HeaderNotFound as exc:
            raise ChainError(f"no block {block}") from exc
        return found

    def _refresh_clock(self, at_least: int = 0) -> None:
        """Give the pending block the time anvil would: wall clock plus the offset.

        Only while it holds no transactions, so nothing already executed sees a new time.
        """
        header = self._chain.header
        if self._chain.get_block().transactions:
            return
        ts = max(header.timestamp, int(time.time()) + self._offset, at_least)
        if ts != header.timestamp:
            self._chain.header = header.copy(timestamp=ts)

    def _mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self._refresh_clock()
            self._evm.mine_blocks(1)

    def _spoof(self, req: CallRequest, gas: int | None, block: BlockId) -> SpoofTransaction:
        tx: dict[str, Any] = {
            "from": req.sender or ZERO_ADDRESS,
            "to": req.to,
            "data": req.data,
            "value": req.value,
            # Spoofed calls pay no fee, as on anvil: zero fee fields, base fee permitting.
            "max_fee_per_gas": 0,
            "max_priority_fee_per_gas": 0,
        }
        if gas is not None:
            tx["gas"] = gas
        blk = "latest" if block in ("safe", "finalized") else block
        unsigned = self._evm._get_normalized_and_unsigned_evm_transaction(tx, blk)
        return SpoofTransaction(unsigned, from_=tx["from"])

    # ---------------------------------------------------------------- sync bodies

    def _sync_block(self, block: BlockId) -> Block:
        b = self._block_at(block)
        return Block(
            number=b.number,
            hash=b.hash,
            timestamp=b.header.timestamp,
            base_fee=int(b.header.base_fee_per_gas or 0),
        )

    def _sync_call(self, req: CallRequest, block: BlockId) -> bytes:
        b = self._block_at(block)
        header = b.header if block != "pending" else self._chain.header
        gas = req.gas if req.gas is not None else header.gas_limit
        spoof = self._spoof(req, gas, "pending" if block == "pending" else b.number)
        vm = self._chain.get_vm(at_header=header)
        try:
            # A costless state (base fee 0) on a throwaway copy: nothing persists.
            with vm.in_costless_state() as state:
                computation: ComputationAPI = state.apply_transaction(spoof)
        except (VMError, ValidationError) as exc:
            raise ChainError(f"eth_call: {exc}") from exc
        if computation.is_error:
            err = computation.error
            if isinstance(err, Revert):
                data = bytes(computation.output)
                raise Reverted(f"eth_call: {_describe(data)}", data=data)
            raise ChainError(f"eth_call: {type(err).__name__}: {err}")
        return bytes(computation.output)

    def _sync_estimate_gas(self, req: CallRequest) -> int:
        spoof = self._spoof(req, _FUND_GAS, "latest")
        try:
            return int(self._chain.estimate_gas(spoof, self._head().header))
        except Revert as exc:
            data = bytes(exc.args[0]) if exc.args and isinstance(exc.args[0], bytes) else b""
            raise Reverted(f"eth_estimateGas: {_describe(data)}", data=data) from exc
        except (VMError, ValidationError) as exc:
            raise ChainError(f"eth_estimateGas: {type(exc).__name__}: {exc}") from exc

    def _sync_send_raw(self, raw: bytes) -> bytes:
        self._refresh_clock()
        try:
            tx_hash = bytes(self._evm.send_raw_transaction(raw))
        except Exception as exc:  # py-evm's ValidationError, rlp errors: all "rejected"
            raise ChainError(f"eth_sendRawTransaction: rejected: {exc}") from exc
        if self._automine:
            self._evm.mine_blocks(1)
        return tx_hash

    def _sync_receipt(self, tx_hash: bytes) -> Receipt | None:
        try:
            r = self._evm.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None
        if r.get("block_number") is None:
            return None  # pending: no receipt yet, as on a node
        return Receipt(
            tx_hash=bytes(r["transaction_hash"]),
            block_number=int(r["block_number"]),
            block_hash=bytes(r["block_hash"]),
            status=int(r["status"]),
            gas_used=int(r["gas_used"]),
            effective_gas_price=int(r["effective_gas_price"]),
            contract_address=bytes(r["contract_address"]) if r["contract_address"] else None,
            logs=tuple(self._block_logs(int(r["block_number"]), tx_hash)),
        )

    def _sync_transaction(self, tx_hash: bytes) -> Transaction | None:
        try:
            t = self._evm.get_transaction_by_hash(tx_hash)
        except TransactionNotFound:
            return None
        return Transaction(
            tx_hash=bytes(t["hash"]),
            sender=bytes(t["from"]),
            to=bytes(t["to"]) if t["to"] else None,
            nonce=int(t["nonce"]),
            input=bytes(t["data"]),
            value=int(t["value"]),
            block_number=None if t.get("block_number") is None else int(t["block_number"]),
        )

    def _account(self, what: str, address: bytes, block: BlockId) -> Any:
        b = self._block_at(block)
        header = self._chain.header if block == "pending" else b.header
        state = self._chain.get_vm(at_header=header).state
        if what == "nonce":
            return state.get_nonce(address)
        if what == "balance":
            return state.get_balance(address)
        return state.get_code(address)

    def _block_logs(self, number: int, only_tx: bytes | None = None) -> list[Log]:
        block = self._chain.get_canonical_block_by_number(number)
        receipts = block.get_receipts(self._chain.chaindb)
        out: list[Log] = []
        index = 0
        for tx, receipt in zip(block.transactions, receipts, strict=True):
            for entry in receipt.logs:
                if only_tx is None or tx.hash == only_tx:
                    out.append(
                        Log(
                            address=bytes(entry.address),
                            topics=tuple(_topic_bytes(t) for t in entry.topics),
                            data=bytes(entry.data),
                            block_number=number,
                            block_hash=block.hash,
                            tx_hash=tx.hash,
                            log_index=index,
                        )
                    )
                index += 1
        return out

    def _sync_logs(
        self,
        address: bytes,
        from_block: int,
        to_block: int,
        topics: Sequence[Sequence[bytes] | bytes | None],
    ) -> list[Log]:
        last = min(to_block, self._head().number)
        out: list[Log] = []
        for n in range(max(0, from_block), last + 1):
            out.extend(
                log
                for log in self._block_logs(n)
                if log.address == address and _matches(log.topics, topics)
            )
        return out

    def _sync_snapshot(self) -> str:
        return "0x" + bytes(self._evm.take_snapshot()).hex()

    def _sync_revert(self, snapshot_id: str) -> bool:
        try:
            self._evm.revert_to_snapshot(bytes.fromhex(snapshot_id.removeprefix("0x")))
        except (HeaderNotFound, BlockNotFound, ValueError):
            return False
        return True

    def _sync_fund(self, address: bytes, wei: int) -> bytes:
        funder = self._funder
        base_fee = int(self._chain.header.base_fee_per_gas)
        signed = funder.sign_transaction(
            {
                "type": 2,
                "chainId": self._chain.chain_id,
                "nonce": self._account("nonce", bytes.fromhex(funder.address[2:]), "pending"),
                "to": to_checksum(address),
                "value": wei,
                "gas": 100_000,  # a contract recipient may spend a little on receive()
                "maxFeePerGas": 2 * base_fee + PRIORITY_FEE,
                "maxPriorityFeePerGas": PRIORITY_FEE,
            }
        )
        return self._sync_send_raw(bytes(signed.raw_transaction))

    # ---------------------------------------------------------------- EthBackend

    async def chain_id(self) -> int:
        return int(self._chain.chain_id)

    async def block(self, block: BlockId = "latest") -> Block:
        return await self._run(self._sync_block, block)

    async def call(self, req: CallRequest, block: BlockId = "latest") -> bytes:
        return await self._run(self._sync_call, req, block)

    async def estimate_gas(self, req: CallRequest) -> int:
        return await self._run(self._sync_estimate_gas, req)

    async def send_raw_transaction(self, raw: bytes) -> bytes:
        return await self._run(self._sync_send_raw, raw)

    async def receipt(self, tx_hash: bytes) -> Receipt | None:
        return await self._run(self._sync_receipt, tx_hash)

    async def transaction(self, tx_hash: bytes) -> Transaction | None:
        return await self._run(self._sync_transaction, tx_hash)

    async def nonce(self, address: bytes, block: BlockId = "pending") -> int:
        return int(await self._run(self._account, "nonce", address, block))

    async def balance(self, address: bytes, block: BlockId = "latest") -> int:
        return int(await self._run(self._account, "balance", address, block))

    async def code(self, address: bytes, block: BlockId = "latest") -> bytes:
        return bytes(await self._run(self._account, "code", address, block))

    async def logs(
        self,
        *,
        address: bytes,
        from_block: int,
        to_block: int,
        topics: Sequence[Sequence[bytes] | bytes | None] = (),
    ) -> list[Log]:
        return await self._run(self._sync_logs, address, from_block, to_block, topics)

    async def max_priority_fee(self) -> int:
        return PRIORITY_FEE

    async def aclose(self) -> None:
        return None

    # ---------------------------------------------------------------- test controls

    async def increase_time(self, seconds: int) -> None:
        """Move the clock forward; the next mined block carries the new time."""
        if seconds < 0:
            raise ValueError("time only moves forward")

        def bump() -> None:
            # The chain may run ahead of the wall clock (one second per block at least):
            # the next block is ``seconds`` after the head, whatever the wall clock says.
            self._offset += seconds
            self._refresh_clock(at_least=self._head().header.timestamp + seconds)

        await self._run(bump)

    async def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks now (including pending transactions, automine off)."""
        await self._run(self._mine, blocks)

    async def set_automine(self, enabled: bool) -> None:
        """Off: transactions wait in the pending block until :meth:`mine`."""
        self._automine = enabled

    async def snapshot(self) -> str:
        """An id of the current head for :meth:`revert`."""
        return await self._run(self._sync_snapshot)

    async def revert(self, snapshot_id: str) -> bool:
        """Make the snapshot's block the head again; false if the id is unknown."""
        return await self._run(self._sync_revert, snapshot_id)

    async def fund(self, address: bytes, wei: int) -> bytes:
        """Test only: send ``wei`` to ``address`` from a prefunded account; returns the tx hash.

        Raises ``ChainError`` if the transfer is rejected.
        """
        return await self._run(self._sync_fund, address, wei)

    def prefunded_keys(self) -> list[bytes]:
        """Test only: private keys of the genesis accounts (a million ETH each)."""
        return [bytes(k.to_bytes()) for k in self._evm.account_keys]

    def describe(self) -> Mapping[str, Any]:
        """Fork, chain id and head number, for logs."""
        return {
            "fork": type(self._chain.get_vm()).__name__,
            "chain_id": self._chain.chain_id,
            "head": self._head().number,
        }
