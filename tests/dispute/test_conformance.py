"""One suite, every backend: the JSON-RPC backend against a fresh anvil and the embedded
py-evm backend must behave alike for everything the dispute module relies on.

Transactions are raw signed EIP-1559 transactions (eth-account), calldata comes from
``dispute.abi`` and states are signed by ``channel``'s own code, so a pass shows the whole
stack below the submitter agrees with the contract on both backends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import rlp  # type: ignore[import-untyped]
import trio
from adjudicator_helpers import ETH, make_state, sign
from eth_account import Account
from eth_account.signers.local import LocalAccount

from channel.chain import Claimed, Concluded, Deposited, Payout
from channel.eip712 import state_struct_hash
from channel.errors import ChainError, Reverted
from channel.hashing import keccak, to_checksum
from channel.keys import Signer
from channel.state import Address, Params, SignedState, State
from dispute import abi
from dispute.anvil import Anvil, run_anvil
from dispute.compile import load_artifact
from dispute.devnode import DevNodeControl
from dispute.embedded import EmbeddedBackend
from dispute.eth import CallRequest, EthBackend, Receipt
from dispute.rpc import JsonRpcBackend

CHAIN_ID = 31337
DURATION = 600
PRIORITY = 10**9


@attrs.frozen(kw_only=True)
class Harness:
    """A backend under test plus the test-only powers it needs."""

    name: str
    eth: EthBackend
    control: Any  # DevNodeControl or EmbeddedBackend: increase_time/mine/snapshot/revert
    deployer: LocalAccount

    async def fund(self, address: bytes, wei: int) -> None:
        if isinstance(self.control, DevNodeControl):
            await self.control.set_balance(address, wei)
        else:
            await self.control.fund(address, wei)


@pytest.fixture(scope="module")
def fresh_anvil() -> Iterator[Anvil]:
    with run_anvil(chain_id=CHAIN_ID) as node:
        yield node


@pytest.fixture(params=["jsonrpc", "embedded"])
async def chain(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    deployer: LocalAccount = Account.create()
    h: Harness
    if request.param == "jsonrpc":
        node: Anvil = request.getfixturevalue("fresh_anvil")
        rpc = JsonRpcBackend(node.url)
        h = Harness(name="jsonrpc", eth=rpc, control=DevNodeControl(rpc), deployer=deployer)
    else:
        emb = EmbeddedBackend(chain_id=CHAIN_ID)
        h = Harness(name="embedded", eth=emb, control=emb, deployer=deployer)
    await h.fund(_raw(deployer.address), 100 * 10**18)
    try:
        yield h
    finally:
        await h.eth.aclose()


@attrs.frozen(kw_only=True)
class Deployed:
    h: Harness
    address: bytes
    receipt: Receipt


@pytest.fixture
async def adjudicator(chain: Harness) -> Deployed:
    art = load_artifact()
    receipt = await _send(chain, None, bytes.fromhex(art["bytecode"].removeprefix("0x")))
    assert receipt.contract_address is not None
    return Deployed(h=chain, address=receipt.contract_address, receipt=receipt)


# ----------------------------------------------------------------- helpers


def _raw(checksum: str) -> bytes:
    return bytes.fromhex(checksum[2:])


async def _send(
    h: Harness, to: bytes | None, data: bytes, value: int = 0, gas: int = 3_000_000
) -> Receipt:
    """Sign an EIP-1559 transaction from the deployer, send it raw, return its receipt."""
    sender = _raw(h.deployer.address)
    base = (await h.eth.block("latest")).base_fee
    tx: dict[str, Any] = {
        "type": 2,
        "chainId": await h.eth.chain_id(),
        "nonce": await h.eth.nonce(sender),
        "value": value,
        "data": data,
        "gas": gas,
        "maxFeePerGas": 3 * base + PRIORITY,
        "maxPriorityFeePerGas": PRIORITY,
    }
    if to is not None:
        tx["to"] = to_checksum(to)
    signed = h.deployer.sign_transaction(tx)
    tx_hash = await h.eth.send_raw_transaction(bytes(signed.raw_transaction))
    assert tx_hash == bytes(signed.hash)
    # Both automine, but anvil mines after answering: a node's receipt can lag the send.
    with trio.fail_after(10):
        while True:
            receipt = await h.eth.receipt(tx_hash)
            if receipt is not None:
                return receipt
            await trio.sleep(0.005)


def _params(adj: bytes, signers: tuple[Signer, Signer]) -> Params:
    return Params.new(
        chain_id=CHAIN_ID,
        adjudicator=adj,
        participants=(signers[0].address, signers[1].address),
        challenge_duration=DURATION,
        salt=os.urandom(32),
    )


def _signed(p: Params, s: State, signers: tuple[Signer, Signer]) -> SignedState:
    sigs = sign(p, s, signers)
    return SignedState(state=s, signatures=(sigs[:65], sigs[65:]))


async def _call(d: Deployed, data: bytes) -> bytes:
    return await d.h.eth.call(CallRequest(to=d.address, data=data))


async def _deposit(d: Deployed, p: Params, wei: int) -> Receipt:
    receipt = await _send(d.h, d.address, abi.deposit_eth_calldata(p.channel_id), value=wei)
    assert receipt.status == 1
    return receipt


@pytest.fixture
def signers() -> tuple[Signer, Signer]:
    return Signer.generate(), Signer.generate()


# ----------------------------------------------------------------- the suite


async def test_chain_id(chain: Harness) -> None:
    """The backend reports the chain id it was started with."""
    assert await chain.eth.chain_id() == CHAIN_ID


async def test_block_fields(chain: Harness) -> None:
    """The latest block has a number, a 32-byte hash, a timestamp and a base fee, and is the
    same block when asked for by number."""
    head = await chain.eth.block("latest")
    assert head.number >= 0
    assert len(head.hash) == 32
    assert head.timestamp > 1_600_000_000
    assert head.base_fee > 0
    assert await chain.eth.block(head.number) == head
    assert (await chain.eth.block(0)).number == 0


async def test_deploy_by_raw_transaction(adjudicator: Deployed) -> None:
    """A raw signed EIP-1559 create lands; its receipt names the CREATE address and the
    code there is the artifact's runtime code."""
    h, receipt = adjudicator.h, adjudicator.receipt
    assert receipt.status == 1
    sender = _raw(h.deployer.address)
    assert adjudicator.address == keccak(rlp.encode([sender, 0]))[12:]
    runtime = bytes.fromhex(load_artifact()["deployedBytecode"].removeprefix("0x"))
    code = await h.eth.code(adjudicator.address)
    # immutables are filled in at deploy time: compare the length, not the bytes
    assert len(code) == len(runtime)
    tx = await h.eth.transaction(receipt.tx_hash)
    assert tx is not None
    assert (tx.sender, tx.to, tx.nonce, tx.block_number) == (sender, None, 0, receipt.block_number)


async def test_views_match_python(adjudicator: Deployed, signers: tuple[Signer, Signer]) -> None:
    """``channelIdOf`` and ``stateHashOf`` on chain equal channel's own channel id and
    EIP-712 struct hash."""
    p = _params(adjudicator.address, signers)
    s = make_state(p, 7, [(ETH, 3, 4)], app_data=b"\x01\x02")
    got_id = abi.decode_bytes32(
        "channelIdOf", await _call(adjudicator, abi.channel_id_of_calldata(p))
    )
    assert got_id == p.channel_id
    got_hash = abi.decode_bytes32(
        "stateHashOf", await _call(adjudicator, abi.state_hash_of_calldata(s))
    )
    assert got_hash == state_struct_hash(s)


async def test_deposit_holdings_and_event(
    adjudicator: Deployed, signers: tuple[Signer, Signer]
) -> None:
    """An ETH deposit shows in ``holdings`` and as a Deposited log with channel, asset and
    new total."""
    p = _params(adjudicator.address, signers)
    receipt = await _deposit(adjudicator, p, 5_000)
    await _deposit(adjudicator, p, 2_000)
    held = abi.decode_uint(
        "holdings", await _call(adjudicator, abi.holdings_calldata(p.channel_id, ETH))
    )
    assert held == 7_000
    events = [abi.decode_event(log) for log in receipt.logs]
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, Deposited)
    assert (ev.channel_id, ev.asset, ev.new_total) == (p.channel_id, ETH, 5_000)
    assert ev.meta.tx_hash == receipt.tx_hash
    assert ev.meta.block_number == receipt.block_number
    assert not ev.meta.removed


async def test_claim_then_settle_after_deadline(
    adjudicator: Deployed, signers: tuple[Signer, Signer]
) -> None:
    """A claim emits Claimed with a deadline; after time travel past it, settle pays out by
    the claimed state (Concluded + Payout), and the claim's calldata decodes back to the
    params and state."""
    h = adjudicator.h
    p = _params(adjudicator.address, signers)
    for signer in signers:
        await h.fund(signer.address, 10**18)
    await _deposit(adjudicator, p, 1_000)
    s = make_state(p, 3, [(ETH, 600, 400)])
    signed = _signed(p, s, signers)

    claim = await _send(h, adjudicator.address, abi.claim_calldata(p, signed))
    assert claim.status == 1
    (claimed,) = [abi.decode_event(x) for x in claim.logs]
    assert isinstance(claimed, Claimed)
    assert claimed.channel_id == p.channel_id
    assert claimed.dispute.version == 3
    assert claimed.dispute.state_hash == state_struct_hash(s)
    block = await h.eth.block(claim.block_number)
    assert claimed.dispute.deadline == block.timestamp + DURATION

    tx = await h.eth.transaction(claim.tx_hash)
    assert tx is not None
    back = abi.claimed_state(tx.input)
    assert back.params == p and back.state == s

    before = [await h.eth.balance(x.address) for x in signers]
    await h.control.increase_time(DURATION + 1)
    await h.control.mine()
    settle = await _send(
        h, adjudicator.address, abi.settle_calldata(p, s, claimed.dispute.deadline)
    )
    assert settle.status == 1
    events = [abi.decode_event(x) for x in settle.logs]
    concluded = [e for e in events if isinstance(e, Concluded)]
    payouts = [e for e in events if isinstance(e, Payout)]
    assert [(c.version, c.cooperative) for c in concluded] == [(3, False)]
    assert [(x.asset, x.to_a, x.to_b) for x in payouts] == [(ETH, 600, 400)]
    after = [await h.eth.balance(x.address) for x in signers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [600, 400]


async def test_reverting_call_raises_reverted_with_custom_error(
    adjudicator: Deployed, signers: tuple[Signer, Signer]
) -> None:
    """Settling inside the window reverts: ``call`` and ``estimate_gas`` raise Reverted whose
    data decodes to ``WindowOpen()``, and the message names it."""
    h = adjudicator.h
    p = _params(adjudicator.address, signers)
    await _deposit(adjudicator, p, 10)
    s = make_state(p, 1, [(ETH, 5, 5)])
    claim = await _send(h, adjudicator.address, abi.claim_calldata(p, _signed(p, s, signers)))
    (claimed,) = [abi.decode_event(x) for x in claim.logs]
    assert isinstance(claimed, Claimed)
    req = CallRequest(
        to=adjudicator.address,
        data=abi.settle_calldata(p, s, claimed.dispute.deadline),
        sender=_raw(h.deployer.address),
    )
    with pytest.raises(Reverted) as call_err:
        await h.eth.call(req)
    assert abi.decode_error(call_err.value.data) == ("WindowOpen", ())
    assert "WindowOpen()" in str(call_err.value)
    with pytest.raises(Reverted) as est_err:
        await h.eth.estimate_gas(req)
    assert abi.decode_error(est_err.value.data) == ("WindowOpen", ())


async def test_reverted_transaction_has_status_zero(
    adjudicator: Deployed, signers: tuple[Signer, Signer]
) -> None:
    """A transaction that reverts is still mined, with receipt status 0 and no logs."""
    p = _params(adjudicator.address, signers)
    s = make_state(p, 1, [(ETH, 5, 5)])
    # no claim registered: settle reverts with NoDispute
    receipt = await _send(adjudicator.h, adjudicator.address, abi.settle_calldata(p, s, 1))
    assert receipt.status == 0
    assert receipt.logs == ()


async def test_nonce_balance_code(chain: Harness) -> None:
    """Nonce counts sent transactions, balance reflects a transfer, code is empty at an EOA."""
    me = _raw(chain.deployer.address)
    other = os.urandom(20)
    n0 = await chain.eth.nonce(me)
    await _send(chain, other, b"", value=12_345, gas=21_000)
    assert await chain.eth.nonce(me) == n0 + 1
    assert await chain.eth.nonce(me, "latest") == n0 + 1
    assert await chain.eth.balance(other) == 12_345
    assert await chain.eth.code(other) == b""
    assert await chain.eth.max_priority_fee() > 0


async def test_logs_filter_by_channel_id(
    adjudicator: Deployed, signers: tuple[Signer, Signer]
) -> None:
    """``logs`` with topics (Deposited, channel id) returns exactly that channel's deposits,
    in order; a None topic is a wildcard and an alternative list matches either."""
    h = adjudicator.h
    p1, p2 = _params(adjudicator.address, signers), _params(adjudicator.address, signers)
    start = (await h.eth.block()).number
    await _deposit(adjudicator, p1, 1)
    await _deposit(adjudicator, p2, 2)
    await _deposit(adjudicator, p1, 3)
    end = (await h.eth.block()).number
    topic = abi.event_topic("Deposited")

    def totals(logs: list[Any]) -> list[int]:
        out = []
        for log in logs:
            ev = abi.decode_event(log)
            assert isinstance(ev, Deposited)
            out.append(ev.new_total)
        return out

    mine = await h.eth.logs(
        address=adjudicator.address, from_block=start, to_block=end, topics=[topic, p1.channel_id]
    )
    assert totals(mine) == [1, 4]
    assert all(log.address == adjudicator.address for log in mine)
    both = await h.eth.logs(
        address=adjudicator.address,
        from_block=start,
        to_block=end,
        topics=[topic, [p1.channel_id, p2.channel_id]],
    )
    assert totals(both) == [1, 2, 4]
    wildcard = await h.eth.logs(
        address=adjudicator.address, from_block=start, to_block=end, topics=[None, p2.channel_id]
    )
    assert totals(wildcard) == [2]
    none = await h.eth.logs(
        address=adjudicator.address,
        from_block=start,
        to_block=end,
        topics=[abi.event_topic("Claimed")],
    )
    assert none == []


async def test_snapshot_and_revert(chain: Harness) -> None:
    """Reverting to a snapshot undoes the blocks and balances mined after it."""
    other = os.urandom(20)
    snap = await chain.control.snapshot()
    head = await chain.eth.block()
    await _send(chain, other, b"", value=7, gas=21_000)
    assert await chain.eth.balance(other) == 7
    assert await chain.control.revert(snap)
    assert await chain.eth.balance(other) == 0
    assert (await chain.eth.block()).number == head.number


async def test_unknown_transaction_and_bad_raw_transaction(chain: Harness) -> None:
    """An unknown hash has no receipt or transaction; a malformed raw transaction raises
    ChainError rather than anything backend-specific."""
    assert await chain.eth.receipt(os.urandom(32)) is None
    assert await chain.eth.transaction(os.urandom(32)) is None
    with pytest.raises(ChainError):
        await chain.eth.send_raw_transaction(b"\x02\xc0garbage")


def test_address_type_roundtrip() -> None:
    """Helper sanity: the conformance suite's address conversion is the identity."""
    a = Address(os.urandom(20))
    assert _raw(to_checksum(a)) == a
