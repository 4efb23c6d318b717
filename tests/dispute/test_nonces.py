"""The nonce manager's bookkeeping against a scripted node (a unit-test double: the
refusals and silences a real node gives rarely and never on cue).  The same paths on a
real anvil are in test_submitter.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import trio
import trio.testing

from channel.errors import ChainError
from channel.keys import Signer
from dispute import nonces
from dispute.eth import EthBackend
from dispute.nonces import NonceManager, SendUnknown
from dispute.policy import Fees
from dispute.tx import SignedTx, TxParams, sign

GWEI = 10**9
KEY = Signer.generate()  # test-only key
LOW, HIGH = Fees(3 * GWEI, GWEI), Fees(30 * GWEI, 10 * GWEI)


class ScriptedNode:
    """Counts nonces like a node and answers each send from a script: None takes the
    transaction, an exception refuses it, "hang" never answers."""

    def __init__(self, script: list[object]) -> None:
        self.script = script
        self.pool: dict[int, SignedTx] = {}
        self.mined = 0

    async def nonce(self, address: bytes, block: str = "pending") -> int:
        if block == "latest":
            return self.mined
        return max([self.mined, *[n + 1 for n in self.pool]])

    async def send_raw_transaction(self, raw: bytes) -> bytes:
        answer = self.script.pop(0) if self.script else None
        if answer == "hang":
            await trio.sleep_forever()
        if isinstance(answer, Exception):
            raise answer
        return b""

    async def transaction(self, tx_hash: bytes) -> object | None:
        return None


def builder(fees: Fees) -> Callable[[int, Fees | None], SignedTx]:
    def build(nonce: int, outbid: Fees | None) -> SignedTx:
        paid = (
            fees
            if outbid is None
            else Fees(2 * outbid.max_fee_per_gas, 2 * outbid.max_priority_fee_per_gas)
        )
        return sign(TxParams(chain_id=1, nonce=nonce, gas=21_000, fees=paid, to=b"\x11" * 20), KEY)

    return build


def manager(node: ScriptedNode) -> NonceManager:
    return NonceManager(cast(EthBackend, node), KEY.address)


async def abandoned_at_zero(node: ScriptedNode) -> NonceManager:
    m = manager(node)
    tx = await m.send_new("a", builder(LOW))
    node.pool[0] = tx
    m.abandon(0, "a", tx)
    assert m.abandoned == {0: LOW} and m.owned == {}
    return m


async def test_a_takeover_the_node_refuses_for_any_reason_falls_back_to_a_fresh_nonce() -> None:
    """Insufficient funds for the outbidding fees (or any refusal but 'nonce too low'):
    the intent is served on a fresh nonce, and the next one tries the takeover again."""
    node = ScriptedNode([None, ChainError("insufficient funds for gas * price + value")])
    m = await abandoned_at_zero(node)
    tx = await m.send_new("b", builder(HIGH))
    assert tx.params.nonce == 1 and m.owned == {1: "b"}
    assert m.abandoned == {0: LOW}  # still there for the next intent
    node.pool[1] = tx
    again = await m.send_new("c", builder(HIGH))
    assert again.params.nonce == 0 and m.owned == {1: "b", 0: "c"} and m.abandoned == {}


async def test_a_send_the_node_never_answers_is_recorded_as_possibly_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No answer within SEND_TIMEOUT: SendUnknown, and the nonce is abandoned with that
    transaction (the node may hold it), so the next intent outbids it there."""
    monkeypatch.setattr(nonces, "SEND_TIMEOUT", 0.05)
    node = ScriptedNode(["hang", None])
    m = manager(node)
    with trio.fail_after(5), pytest.raises(SendUnknown):
        await m.send_new("a", builder(LOW))
    assert m.owned == {} and m.abandoned == {0: LOW}
    tx = await m.send_new("b", builder(HIGH))
    assert tx.params.nonce == 0 and tx.params.fees.max_fee_per_gas == 2 * LOW.max_fee_per_gas


async def test_a_cancelled_send_still_records_what_the_node_took() -> None:
    """A cancellation that arrives while the node is answering waits for the answer:
    the transaction it took is owned by the intent, never lost track of."""
    node = ScriptedNode([])
    gate = trio.Event()
    plain = node.send_raw_transaction

    async def slow(raw: bytes) -> bytes:
        await gate.wait()
        return await plain(raw)

    node.send_raw_transaction = slow  # type: ignore[method-assign]
    m = manager(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.send_new, "a", builder(LOW))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
        gate.set()
    assert m.owned == {0: "a"}


async def test_a_nonce_the_node_forgot_is_never_owned_and_abandoned_at_once() -> None:
    """The node forgot the abandoned transaction (its pool dropped it) and the takeover
    is refused: the fresh nonce is that same nonce, which then stops being abandoned —
    no later intent can take it over from its new owner."""
    node = ScriptedNode([None, ChainError("replacement transaction underpriced")])
    m = await abandoned_at_zero(node)
    del node.pool[0]  # dropped
    tx = await m.send_new("b", builder(HIGH))
    assert tx.params.nonce == 0 and m.owned == {0: "b"} and m.abandoned == {}
