"""``AdjudicatorClient``: the chain port (``channel.chain.Adjudicator``) over any backend.

Reads go straight to the backend (``eth_call``, ``eth_getLogs``); every transaction goes
through a :class:`~dispute.submitter.Submitter` (dry run, EIP-1559 fees rising towards a
deadline, replacement, reorg-aware confirmation, idempotent by ``(channel, version,
kind)``).  The dispute-bearing calls stand down when the chain already holds what they
were for: a refute when the registered version is already ours or newer, a claim when a
dispute is already registered, a settle or close once the channel has concluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
from eth_abi.abi import encode as abi_encode
from eth_account import Account

from channel.chain import (
    Block,
    ChainEvent,
    Claimed,
    ClaimedState,
    Dispute,
    Refuted,
    TxOutcome,
)
from channel.errors import ChainError
from channel.hashing import keccak
from channel.state import ETH, Params, SignedState, State
from dispute import abi
from dispute.compile import load_artifact
from dispute.eth import CallRequest, EthBackend
from dispute.policy import Fees
from dispute.submitter import Intent, StoodDown, Submitter
from dispute.tx import secret_of

#: Blocks per ``eth_getLogs`` request when scanning back for a dispute's events.
LOG_CHUNK = 10_000
_APPROVE = keccak(b"approve(address,uint256)")[:4]


def dispute_record(d: Dispute) -> bytes:
    """The one storage word the contract keeps per dispute."""
    return keccak(
        abi_encode(["bytes32", "uint64", "uint64"], [d.state_hash, d.version, d.deadline])
    )


class AdjudicatorClient:
    """One deployed Adjudicator, read through ``backend`` and written through ``submitter``.

    ``from_block`` is where log scans start (the deployment block); ``chain_id`` must be
    the backend's (checked by :meth:`connect`).
    """

    def __init__(
        self,
        backend: EthBackend,
        address: bytes,
        *,
        chain_id: int,
        submitter: Submitter,
        from_block: int = 0,
    ) -> None:
        self.backend = backend
        self._address = address
        self._chain_id = chain_id
        self.submitter = submitter
        self.from_block = from_block

    @classmethod
    async def connect(
        cls, backend: EthBackend, address: bytes, submitter: Submitter, *, from_block: int = 0
    ) -> AdjudicatorClient:
        """Check that ``address`` holds code on ``backend``'s chain, then wrap it."""
        chain_id = await backend.chain_id()
        if chain_id != submitter.chain_id:
            raise ChainError(
                f"backend is chain {chain_id}, submitter signs for {submitter.chain_id}"
            )
        if not await backend.code(address):
            raise ChainError(f"no contract at 0x{address.hex()} on chain {chain_id}")
        return cls(backend, address, chain_id=chain_id, submitter=submitter, from_block=from_block)

    # -- the port: identity and reads ---------------------------------------

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def address(self) -> bytes:
        return self._address

    async def head(self) -> Block:
        return await self.backend.block("latest")

    async def _call(self, data: bytes) -> bytes:
        return await self.backend.call(CallRequest(to=self._address, data=data))

    async def holdings(self, channel_id: bytes, asset: bytes) -> int:
        return abi.decode_uint(
            "holdings", await self._call(abi.holdings_calldata(channel_id, asset))
        )

    async def credits(self, account: bytes, asset: bytes) -> int:
        return abi.decode_uint("credits", await self._call(abi.credits_calldata(account, asset)))

    async def record(self, channel_id: bytes) -> bytes:
        return abi.decode_bytes32("disputes", await self._call(abi.disputes_calldata(channel_id)))

    async def dispute(self, channel_id: bytes) -> Dispute | None:
        """The registered dispute: the newest ``Claimed``/``Refuted`` event of the channel
        whose commitment matches the stored record; None when nothing is registered."""
        rec = await self.record(channel_id)
        if rec == b"\x00" * 32:
            return None
        head = (await self.head()).number
        hi = head
        while hi >= self.from_block:
            lo = max(self.from_block, hi - LOG_CHUNK + 1)
            found = [
                e
                for e in await self.events(lo, hi, [channel_id])
                if isinstance(e, Claimed | Refuted) and not e.meta.removed
            ]
            for ev in reversed(found):
                if dispute_record(ev.dispute) == rec:
                    return ev.dispute
            hi = lo - 1
        raise ChainError(
            f"channel 0x{channel_id.hex()[:16]}: a dispute is stored but no matching event "
            f"was found from block {self.from_block}"
        )

    async def events(
        self, from_block: int, to_block: int, channel_ids: Sequence[bytes] | None = None
    ) -> list[ChainEvent]:
        topics: list[Sequence[bytes] | bytes | None] = [None]
        if channel_ids is not None:
            topics.append(list(channel_ids))
        logs = await self.backend.logs(
            address=self._address, from_block=from_block, to_block=to_block, topics=topics
        )
        out = []
        for log in logs:
            ev = abi.decode_event(log)
            if ev is not None:
                out.append(ev)
        return out

    async def claimed_state(self, tx_hash: bytes) -> ClaimedState:
        tx = await self.backend.transaction(tx_hash)
        if tx is None:
            raise ChainError(f"transaction 0x{tx_hash.hex()} not found")
        return abi.claimed_state(tx.input)

    # -- the port: transactions ----------------------------------------------

    async def _submit(self, intent: Intent) -> TxOutcome:
        result = await self.submitter.submit(intent)
        if isinstance(result, StoodDown):
            return TxOutcome(
                tx_hash=b"",
                block_number=0,
                gas_used=0,
                success=True,
                error=f"stood down: {result.reason}",
            )
        return result

    async def deposit(self, channel_id: bytes, asset: bytes, amount: int) -> TxOutcome:
        """Deposit ``amount`` of ``asset`` (ETH: the zero address; ERC-20: approve, then
        pull) into the channel from the submitter's key."""
        if amount <= 0:
            raise ValueError("deposit amount must be positive")
        if asset == ETH:
            return await self._submit(
                Intent(
                    key=(
                        channel_id,
                        asset,
                        amount,
                        "deposit",
                        await self._deposit_seq(channel_id, asset),
                    ),
                    to=self._address,
                    data=abi.deposit_eth_calldata(channel_id),
                    value=amount,
                    label=f"deposit {amount} wei into 0x{channel_id.hex()[:16]}",
                )
            )
        approve = _APPROVE + abi_encode(["address", "uint256"], [self._address, amount])
        seq = await self._deposit_seq(channel_id, asset)
        ok = await self._submit(
            Intent(
                key=(channel_id, asset, amount, "approve", seq),
                to=asset,
                data=approve,
                label=f"approve {amount} of 0x{asset.hex()}",
            )
        )
        if not ok.success:
            return ok
        return await self._submit(
            Intent(
                key=(channel_id, asset, amount, "deposit", seq),
                to=self._address,
                data=abi.deposit_calldata(channel_id, asset, amount),
                label=f"deposit {amount} of 0x{asset.hex()} into 0x{channel_id.hex()[:16]}",
            )
        )

    async def _deposit_seq(self, channel_id: bytes, asset: bytes) -> int:
        # Deposits are not idempotent by content (two equal deposits are legitimate); key
        # them by the holding they start from so a retry of the same call joins the first.
        return await self.holdings(channel_id, asset)

    async def close(self, params: Params, signed: SignedState) -> TxOutcome:
        cid = params.channel_id

        async def still_needed() -> bool:
            return await self._has_funds(params, signed.state)

        return await self._submit(
            Intent(
                key=(cid, signed.state.version, "close"),
                to=self._address,
                data=abi.close_calldata(params, signed),
                still_needed=still_needed,
                label=f"close 0x{cid.hex()[:16]} at v{signed.state.version}",
            )
        )

    async def claim(self, params: Params, signed: SignedState) -> TxOutcome:
        cid = params.channel_id

        async def still_needed() -> bool:
            return await self.record(cid) == b"\x00" * 32

        return await self._submit(
            Intent(
                key=(cid, signed.state.version, "claim"),
                to=self._address,
                data=abi.claim_calldata(params, signed),
                still_needed=still_needed,
                label=f"claim 0x{cid.hex()[:16]} at v{signed.state.version}",
            )
        )

    async def refute(self, params: Params, dispute: Dispute, signed: SignedState) -> TxOutcome:
        cid = params.channel_id
        ours = signed.state.version

        async def still_needed() -> bool:
            current = await self.dispute(cid)
            return current is not None and current.version < ours

        registered = dispute
        current = await self.dispute(cid)
        if current is not None:
            registered = current
        return await self._submit(
            Intent(
                key=(cid, ours, "refute"),
                to=self._address,
                data=abi.refute_calldata(params, registered, signed),
                deadline=registered.deadline,
                still_needed=still_needed,
                label=f"refute 0x{cid.hex()[:16]} v{registered.version} with v{ours}",
            )
        )

    async def settle(self, params: Params, state: State, deadline: int) -> TxOutcome:
        cid = params.channel_id

        async def still_needed() -> bool:
            return await self.record(cid) != b"\x00" * 32

        return await self._submit(
            Intent(
                key=(cid, state.version, "settle"),
                to=self._address,
                data=abi.settle_calldata(params, state, deadline),
                still_needed=still_needed,
                label=f"settle 0x{cid.hex()[:16]} at v{state.version}",
            )
        )

    async def withdraw(self, asset: bytes, to: bytes) -> TxOutcome:
        owed = await self.credits(self.submitter.address, asset)
        return await self._submit(
            Intent(
                key=(self.submitter.address, asset, owed, "withdraw"),
                to=self._address,
                data=abi.withdraw_calldata(asset, to),
                label=f"withdraw {owed} of 0x{asset.hex()}",
            )
        )

    async def _has_funds(self, params: Params, state: State) -> bool:
        for a in state.allocations:
            if await self.holdings(params.channel_id, a.asset):
                return True
        return False


async def deploy(backend: EthBackend, key: Any, *, gas: int = 3_000_000) -> tuple[bytes, int]:
    """Deploy the committed Adjudicator artifact from ``key``; returns (address, block).

    Waits for the receipt (polling); raises ``ChainError`` if the deployment reverts.
    """
    artifact = load_artifact()
    bytecode = artifact["bytecode"]
    code = bytes.fromhex(bytecode[2:] if bytecode.startswith("0x") else bytecode)
    chain_id = await backend.chain_id()
    secret = secret_of(key)
    sender = Account.from_key(secret).address
    nonce = await backend.nonce(bytes.fromhex(sender[2:]), "pending")
    head = await backend.block("latest")
    tip = await backend.max_priority_fee()
    fees = Fees(max_fee_per_gas=2 * head.base_fee + tip, max_priority_fee_per_gas=tip)
    tx = {
        "type": 2,
        "chainId": chain_id,
        "nonce": nonce,
        "gas": gas,
        "maxFeePerGas": fees.max_fee_per_gas,
        "maxPriorityFeePerGas": fees.max_priority_fee_per_gas,
        "value": 0,
        "data": code,
        "accessList": [],
    }
    signed = Account.sign_transaction(tx, secret)
    tx_hash = await backend.send_raw_transaction(bytes(signed.raw_transaction))
    with trio.fail_after(120):
        while (receipt := await backend.receipt(tx_hash)) is None:  # noqa: ASYNC110 - a node has no receipt event
            await trio.sleep(0.2)
    if receipt.status != 1 or receipt.contract_address is None:
        raise ChainError(f"Adjudicator deployment 0x{tx_hash.hex()} reverted")
    return receipt.contract_address, receipt.block_number
