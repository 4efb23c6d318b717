"""The client's on-chain powers end to end on anvil: fund, pay, cheat, refute, settle, close."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from channel import onchain
from channel.client import CLOSED, FUNDING, OPEN, open_client
from channel.hashing import to_checksum
from channel.keys import Signer
from channel.state import ETH
from channel.store import COSIGNED
from dispute.adjudicator import AdjudicatorClient, deploy
from dispute.anvil import run_anvil
from dispute.devnode import DevNodeControl
from dispute.guard import Guard
from dispute.rpc import JsonRpcBackend
from dispute.submitter import Submitter

ETHER = 10**18
WINDOW = 120


@asynccontextmanager
async def world(tmp_path: Path, *, with_token: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Anvil, a deployed Adjudicator, and Alice and Bob with a channel (ETH, and a freshly
    minted test ERC-20 when ``with_token``) that still needs funding."""
    from adjudicator_helpers import connect, deploy_test

    with run_anvil() as node:
        async with JsonRpcBackend(node.url) as backend, DevNodeControl(node.url) as control:
            a, b, gas = Signer.generate(), Signer.generate(), Signer.generate()  # test-only
            for s in (a, b, gas):
                await control.fund(s.address, 10 * ETHER)
            balances = [(ETH, ETHER, ETHER // 2)]
            token = None
            if with_token:
                token = deploy_test(connect(node.url), "TestToken")
                for s in (a, b):
                    token.functions.mint(to_checksum(s.address), 1_000_000).transact()
                balances.append((bytes.fromhex(token.address[2:]), 600_000, 400_000))
            chain_id = await backend.chain_id()
            address, block = await deploy(backend, a)

            def adj(s: Signer) -> AdjudicatorClient:
                sub = Submitter(backend, s, chain_id=chain_id, confirmations=1, poll_interval=0.05)
                return AdjudicatorClient(
                    backend, address, chain_id=chain_id, submitter=sub, from_block=block
                )

            async with (
                open_client(a, tmp_path / "a.sqlite", require_funding=True) as alice,
                open_client(b, tmp_path / "b.sqlite", require_funding=True) as bob,
            ):
                cid = await alice.open_channel(
                    bob.peer_address(),
                    chain_id=chain_id,
                    adjudicator=address,
                    challenge_duration=WINDOW,
                    balances=balances,
                )
                yield {
                    "token": token,
                    "alice": alice,
                    "bob": bob,
                    "cid": cid,
                    "ca": adj(a),
                    "cb": adj(b),
                    "backend": backend,
                    "control": control,
                    "block": block,
                    "a": a,
                    "b": b,
                    "hot": adj(gas),
                }


async def _funded(env: dict[str, Any]) -> None:
    alice, bob, cid = env["alice"], env["bob"], env["cid"]
    with trio.fail_after(5):
        while bob.latest(cid) is None:  # noqa: ASYNC110 - bob's store catches up
            await trio.sleep(0.01)
    assert alice.status(cid) == FUNDING and bob.status(cid) == FUNDING
    async with trio.open_nursery() as n:  # B waits for A's deposit by itself
        n.start_soon(partial(onchain.fund, bob, env["cb"], cid, poll=0.05))
        n.start_soon(partial(onchain.fund, alice, env["ca"], cid, poll=0.05))
    assert alice.status(cid) == OPEN and bob.status(cid) == OPEN
    assert await env["ca"].holdings(cid, ETH) == ETHER + ETHER // 2


async def test_updates_wait_for_funding_then_flow(tmp_path: Path) -> None:
    """A channel accepts no update until both deposits are on chain, then works."""
    import pytest

    from channel.errors import LocalProtocolError

    async with world(tmp_path) as env:
        alice, cid = env["alice"], env["cid"]
        with pytest.raises(LocalProtocolError, match="funding"):
            await alice.pay(cid, ETH, 1)
        await _funded(env)
        signed = await alice.pay(cid, ETH, 5)
        assert signed.state.allocations[0].balances == (ETHER - 5, ETHER // 2 + 5)


async def test_guard_refutes_a_stale_claim_and_settles_by_the_latest(tmp_path: Path) -> None:
    """Bob claims an old co-signed state; Alice's guard refutes it inside the window without
    being asked and settles after it, so Alice receives her latest balance to the wei."""
    async with world(tmp_path) as env:
        alice, bob, cid = env["alice"], env["bob"], env["cid"]
        await _funded(env)
        await alice.pay(cid, ETH, ETHER // 10)  # v1: bob is richer here
        for _ in range(5):
            await bob.pay(cid, ETH, ETHER // 20)  # later versions give back to alice
        latest = alice.latest(cid)
        assert latest is not None
        old = next(s for v, st, s in bob.store.signed_states(cid) if v == 1 and st == COSIGNED)
        # The guard pays gas from a hot wallet of its own, so Alice's payout is exact.
        guard = Guard(alice, env["hot"], from_block=env["block"], poll_interval=0.05)
        async with trio.open_nursery() as n:
            await n.start(guard.run)
            claim = await env["cb"].claim(bob.params(cid), old)  # bob cheats with v1
            assert claim.success
            with trio.fail_after(20):
                while not guard.actions:  # noqa: ASYNC110 - the guard polls the chain
                    await trio.sleep(0.05)
            registered = await env["ca"].dispute(cid)
            assert registered is not None and registered.version == latest.state.version
            before = await env["backend"].balance(alice.address)
            await env["control"].increase_time(WINDOW + 1)
            await env["control"].mine(1)
            # The guard marks the channel closed when it sees the Concluded event, which
            # may come before its own settle() has returned: wait for both.
            settled = ("settle", cid, latest.state.version)
            with trio.fail_after(20):
                while alice.status(cid) != CLOSED or settled not in guard.actions:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        assert settled in guard.actions
        paid = await env["backend"].balance(alice.address) - before
        assert paid == latest.state.allocations[0].balances[0]
        assert not guard.alerts


async def test_cooperative_close_pays_both_in_one_transaction(tmp_path: Path) -> None:
    """close() agrees a final state off-chain and pays both parties at once."""
    async with world(tmp_path) as env:
        alice, bob, cid = env["alice"], env["bob"], env["cid"]
        await _funded(env)
        await alice.pay(cid, ETH, 7)
        before_b = await env["backend"].balance(bob.address)
        out = await onchain.close(alice, env["ca"], cid)
        assert out.success and alice.status(cid) == CLOSED
        assert await env["backend"].balance(bob.address) - before_b == ETHER // 2 + 7
        assert await env["ca"].holdings(cid, ETH) == 0


async def test_erc20_and_eth_channel_funds_trades_and_closes(tmp_path: Path) -> None:
    """A channel holding ETH and an ERC-20 is funded through approve + deposit by both
    parties, trades both assets, and a cooperative close pays each asset exactly."""
    async with world(tmp_path, with_token=True) as env:
        alice, bob, cid, token = env["alice"], env["bob"], env["cid"], env["token"]
        asset = bytes.fromhex(token.address[2:])
        await _funded(env)
        assert await env["ca"].holdings(cid, asset) == 1_000_000
        await alice.pay(cid, asset, 150_000)
        await bob.pay(cid, ETH, ETHER // 40)
        out = await onchain.close(bob, env["cb"], cid)
        assert out.success
        balance = token.functions.balanceOf
        assert balance(to_checksum(alice.address)).call() == 400_000 + 450_000
        assert balance(to_checksum(bob.address)).call() == 600_000 + 550_000
        assert await env["ca"].holdings(cid, asset) == 0
        assert await env["ca"].holdings(cid, ETH) == 0
