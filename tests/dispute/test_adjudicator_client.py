"""The chain port end to end: ``AdjudicatorClient`` over both backends (anvil and embedded)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from channel.chain import Claimed, Concluded, Deposited, Payout, Refuted
from channel.eip712 import state_digest
from channel.keys import Signer
from channel.state import ETH, Allocation, Params, SignedState, State
from dispute.adjudicator import AdjudicatorClient, deploy
from dispute.anvil import run_anvil
from dispute.devnode import DevNodeControl
from dispute.embedded import EmbeddedBackend
from dispute.eth import EthBackend
from dispute.rpc import JsonRpcBackend
from dispute.submitter import Submitter

ETHER = 10**18
WINDOW = 600


@asynccontextmanager
async def chain(kind: str) -> AsyncIterator[tuple[EthBackend, Any]]:
    """A backend and its test control (time travel, funding)."""
    if kind == "embedded":
        backend = EmbeddedBackend()
        yield backend, backend
        return
    with run_anvil() as node:
        async with JsonRpcBackend(node.url) as backend, DevNodeControl(node.url) as control:
            yield backend, control


def cosign(params: Params, state: State, a: Signer, b: Signer) -> SignedState:
    d = state_digest(params, state)
    return SignedState(state=state, signatures=(a.sign(d), b.sign(d)))


def split(params: Params, version: int, to_a: int, to_b: int, final: bool = False) -> State:
    return State(
        channel_id=params.channel_id,
        version=version,
        allocations=(Allocation(asset=ETH, balances=(to_a, to_b)),),
        is_final=final,
    )


@asynccontextmanager
async def setup(kind: str) -> AsyncIterator[dict[str, Any]]:
    async with chain(kind) as (backend, control):
        a, b, operator = Signer.generate(), Signer.generate(), Signer.generate()  # test-only
        for s in (a, b, operator):
            await control.fund(s.address, 10 * ETHER)
        chain_id = await backend.chain_id()
        sub = Submitter(backend, operator, chain_id=chain_id, confirmations=1, poll_interval=0.05)
        address, block = await deploy(backend, operator)
        adj = await AdjudicatorClient.connect(backend, address, sub, from_block=block)
        clients = {
            s.address: AdjudicatorClient(
                backend,
                address,
                chain_id=chain_id,
                submitter=Submitter(
                    backend, s, chain_id=chain_id, confirmations=1, poll_interval=0.05
                ),
                from_block=block,
            )
            for s in (a, b)
        }
        params = Params.new(
            chain_id=chain_id,
            adjudicator=address,
            participants=(a.address, b.address),
            challenge_duration=WINDOW,
        )
        yield {
            "backend": backend,
            "control": control,
            "a": a,
            "b": b,
            "adj": adj,
            "clients": clients,
            "params": params,
        }


@pytest.mark.parametrize("kind", ["anvil", "embedded"])
async def test_stale_claim_is_refuted_and_settles_by_the_newest_state(kind: str) -> None:
    """A claim of an old state is refuted by a newer co-signed one inside the window, and
    settle pays exactly the newest state's balances — the same on both backends."""
    async with setup(kind) as env:
        a, b, adj, params = env["a"], env["b"], env["adj"], env["params"]
        cid = params.channel_id
        ca, cb = env["clients"][a.address], env["clients"][b.address]
        out = await ca.deposit(cid, ETH, ETHER)
        assert out.success
        out = await cb.deposit(cid, ETH, ETHER)
        assert out.success
        assert await adj.holdings(cid, ETH) == 2 * ETHER
        old = cosign(params, split(params, 3, 2 * ETHER - 1, 1), a, b)
        new = cosign(params, split(params, 7, ETHER // 2, ETHER + ETHER // 2), a, b)
        assert (await cb.claim(params, old)).success  # B cheats with v3
        registered = await adj.dispute(cid)
        assert registered is not None and registered.version == 3
        out = await adj.refute(params, registered, new)  # anyone may send the fraud proof
        assert out.success
        after = await adj.dispute(cid)
        assert after is not None and after.version == 7 and after.deadline == registered.deadline
        again = await adj.refute(params, registered, new)
        assert again.success  # idempotent: the recorded outcome, no second transaction
        await env["control"].increase_time(WINDOW + 1)
        await env["control"].mine(1)
        bal_a = await env["backend"].balance(a.address)
        bal_b = await env["backend"].balance(b.address)
        assert (await adj.settle(params, new.state, after.deadline)).success
        assert await env["backend"].balance(a.address) - bal_a == ETHER // 2
        assert await env["backend"].balance(b.address) - bal_b == ETHER + ETHER // 2
        assert await adj.holdings(cid, ETH) == 0
        assert await adj.dispute(cid) is None
        head = (await adj.head()).number
        kinds = [type(e) for e in await adj.events(0, head, [cid])]
        assert kinds == [Deposited, Deposited, Claimed, Refuted, Concluded, Payout]
        claimed = next(e for e in await adj.events(0, head, [cid]) if isinstance(e, Claimed))
        rebuilt = await adj.claimed_state(claimed.meta.tx_hash)
        assert rebuilt.params == params and rebuilt.state == old.state


@pytest.mark.parametrize("kind", ["anvil", "embedded"])
async def test_cooperative_close_pays_both_at_once(kind: str) -> None:
    """A co-signed final state closes the channel in one transaction and pays both."""
    async with setup(kind) as env:
        a, b, adj, params = env["a"], env["b"], env["adj"], env["params"]
        cid = params.channel_id
        await env["clients"][a.address].deposit(cid, ETH, ETHER)
        final = cosign(params, split(params, 9, ETHER // 4, 3 * ETHER // 4, final=True), a, b)
        bal_b = await env["backend"].balance(b.address)
        assert (await adj.close(params, final)).success
        assert await env["backend"].balance(b.address) - bal_b == 3 * ETHER // 4
        assert await adj.holdings(cid, ETH) == 0
