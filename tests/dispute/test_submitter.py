"""The deadline-aware submitter against a real anvil: a stale claim on the real Adjudicator
is refuted through ``dispute.submitter.Submitter`` while the test spikes the base fee,
reorgs the refute out, races another refuter, or lets the window run out.

Each test gets its own anvil (they switch automine off and set base fees).  Setup goes
through the web3 helpers; everything the submitter does goes through
``dispute.rpc.JsonRpcBackend``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial

import attrs
import pytest
import trio
from adjudicator_helpers import ETH, connect, deploy_adjudicator, fund, make_state, new_params
from adjudicator_helpers import sign as sign_both
from web3 import Web3

from channel.chain import Claimed, Dispute, Refuted, TxOutcome
from channel.eip712 import state_digest, state_struct_hash
from channel.errors import Reverted
from channel.keys import Signer
from channel.state import Params, SignedState
from dispute.abi import (
    decode_event,
    deposit_eth_calldata,
    event_topic,
    params_arg,
    refute_calldata,
    state_arg,
)
from dispute.anvil import Anvil, run_anvil
from dispute.devnode import DevNodeControl
from dispute.policy import DEFAULT_MARGIN, Fees
from dispute.rpc import JsonRpcBackend
from dispute.submitter import DeadlineMissed, Intent, StoodDown, Submitter
from dispute.tx import TxParams, sign

E = 10**18
GWEI = 10**9
HOG = b"\x0b" * 20  # test-only: code that loops until it runs out of gas
DURATION = 3600
POLL = 0.05
MARGIN = 5

pytestmark = pytest.mark.chain


@attrs.frozen(kw_only=True)
class World:
    """A funded channel with a stale claim (v1) registered; we hold v2 and v3."""

    node: Anvil
    w3: Web3
    adjudicator: bytes
    params: Params
    signers: tuple[Signer, Signer]
    claimed: Dispute
    tower: Signer

    def signed(self, version: int) -> SignedState:
        share = E // 2 + version
        state = make_state(self.params, version, [(ETH, share, E - share)])
        digest = state_digest(self.params, state)
        a, b = self.signers
        return SignedState(state=state, signatures=(a.sign(digest), b.sign(digest)))


@pytest.fixture
def world() -> Iterator[World]:
    with run_anvil() as node:
        w3 = connect(node.url)
        adj = deploy_adjudicator(w3)
        signers = (Signer.generate(), Signer.generate())
        for s in signers:
            fund(w3, s.address)
        tower = Signer.generate()
        fund(w3, tower.address, 100 * E)
        params = new_params(adj, signers, duration=DURATION)
        funder = list(w3.eth.accounts)[1]
        tx = adj.functions.depositEthToChannel(params.channel_id).transact(
            {"from": funder, "value": E}  # type: ignore[arg-type]
        )
        w3.eth.wait_for_transaction_receipt(tx)
        stale = make_state(params, 1, [(ETH, E, 0)])
        tx = adj.functions.claim(
            params_arg(params), state_arg(stale), sign_both(params, stale, signers)
        ).transact({"from": funder})
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        deadline = int(w3.eth.get_block(receipt["blockNumber"])["timestamp"]) + DURATION
        claimed = Dispute(state_hash=state_struct_hash(stale), version=1, deadline=deadline)
        yield World(
            node=node,
            w3=w3,
            adjudicator=bytes.fromhex(adj.address[2:]),
            params=params,
            signers=signers,
            claimed=claimed,
            tower=tower,
        )


@pytest.fixture
async def backend(world: World) -> AsyncIterator[JsonRpcBackend]:
    async with JsonRpcBackend(world.node.url) as b:
        yield b


@pytest.fixture
async def dev(world: World) -> AsyncIterator[DevNodeControl]:
    async with DevNodeControl(world.node.url) as d:
        yield d


async def registered(backend: JsonRpcBackend, world: World) -> Dispute:
    """The dispute the chain holds now, rebuilt from Claimed/Refuted logs."""
    head = await backend.block("latest")
    logs = await backend.logs(
        address=world.adjudicator,
        from_block=0,
        to_block=head.number,
        topics=[[event_topic("Claimed"), event_topic("Refuted")], world.params.channel_id],
    )
    found = world.claimed
    for log in logs:
        ev = decode_event(log)
        if isinstance(ev, Claimed | Refuted):
            found = ev.dispute
    return found


def refute_intent(
    world: World, backend: JsonRpcBackend, signed: SignedState, against: Dispute | None = None
) -> Intent:
    version = signed.state.version

    async def still_needed() -> bool:
        return (await registered(backend, world)).version < version

    return Intent(
        key=(world.params.channel_id, version, "refute"),
        to=world.adjudicator,
        data=refute_calldata(world.params, against or world.claimed, signed),
        deadline=world.claimed.deadline,
        still_needed=still_needed,
        label=f"refute v{version}",
    )


def submitter(
    world: World,
    backend: JsonRpcBackend,
    *,
    confirmations: int,
    max_fee_cap: int | None = None,
    stuck_blocks: int = 3,
    margin: int = DEFAULT_MARGIN,
) -> Submitter:
    return Submitter(
        backend,
        world.tower,
        chain_id=world.node.chain_id,
        poll_interval=POLL,
        confirmations=confirmations,
        max_fee_cap=max_fee_cap,
        stuck_blocks=stuck_blocks,
        margin=margin,
    )


async def mine_forever(dev: DevNodeControl, step: int = 0, every: float = 0.1) -> None:
    while True:
        if step:
            await dev.increase_time(step)
        await dev.mine()
        await trio.sleep(every)


async def poll_node(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` (a question to the node, which has no push for it) is true."""
    while True:
        if await check():
            return
        await trio.sleep(0.02)


async def wait_pending(dev: DevNodeControl) -> None:
    async def pending() -> bool:
        return await dev.pending_count() > 0

    await poll_node(pending)


@attrs.define
class Background:
    """The result of ``sub.submit`` run in a background task, and an event when it is in."""

    done: trio.Event = attrs.Factory(trio.Event)
    result: TxOutcome | StoodDown | None = None

    async def run(self, sub: Submitter, intent: Intent) -> None:
        self.result = await sub.submit(intent)
        self.done.set()


async def congest_next_block(world: World, backend: JsonRpcBackend, dev: DevNodeControl) -> bytes:
    """Fill the next block: a rival's transaction that burns all but 30,000 of its 30M
    gas at a far higher priority fee than ours, so that a refute does not fit.  Returns
    the rival's address."""
    rival = Signer.generate()
    await dev.fund(rival.address, 100 * E)
    await dev.set_code(HOG, bytes.fromhex("5b600056"))  # JUMPDEST PUSH1 0 JUMP
    hog = TxParams(
        chain_id=world.node.chain_id,
        nonce=0,
        gas=29_970_000,
        fees=Fees(200 * GWEI, 100 * GWEI),
        to=HOG,
    )
    await backend.send_raw_transaction(sign(hog, rival).raw)
    return rival.address


async def block_time(backend: JsonRpcBackend, number: int) -> int:
    return (await backend.block(number)).timestamp


# ----------------------------------------------------------------- tests


async def test_dry_run_revert_raises_and_sends_nothing(
    world: World, backend: JsonRpcBackend
) -> None:
    """A refute the contract would reject (signatures in the wrong order) raises Reverted
    naming the custom error from the eth_call dry run, and no transaction is sent."""
    good = world.signed(2)
    bad = attrs.evolve(good, signatures=(good.signatures[1], good.signatures[0]))
    sub = submitter(world, backend, confirmations=1)
    with trio.fail_after(20), pytest.raises(Reverted, match="BadSignature"):
        await sub.submit(refute_intent(world, backend, bad))
    assert await backend.nonce(world.tower.address, "pending") == 0
    assert sub.attempts((world.params.channel_id, 2, "refute")) == ()


async def test_submit_lands_and_confirms(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """A stale claim is refuted before the window ends: the outcome is a successful,
    confirmed transaction and the chain then holds our newer version."""
    sub = submitter(world, backend, confirmations=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine_forever, dev)
        with trio.fail_after(30):
            out = await sub.submit(refute_intent(world, backend, world.signed(2)))
        nursery.cancel_scope.cancel()
    assert isinstance(out, TxOutcome) and out.success
    assert (await registered(backend, world)).version == 2
    assert await block_time(backend, out.block_number) < world.claimed.deadline
    head = await backend.block("latest")
    assert head.number - out.block_number + 1 >= 2


async def test_same_key_twice_sends_one_transaction(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """Idempotency by (channel, version): two concurrent submits with one key share one
    transaction and one outcome; a third after success returns the recorded outcome."""
    sub = submitter(world, backend, confirmations=2)
    intent = refute_intent(world, backend, world.signed(2))
    outs: list[TxOutcome | StoodDown] = []

    async def go() -> None:
        outs.append(await sub.submit(intent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine_forever, dev)
        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                inner.start_soon(go)
                inner.start_soon(go)
        nursery.cancel_scope.cancel()
    assert len(outs) == 2 and outs[0] == outs[1]
    assert isinstance(outs[0], TxOutcome) and outs[0].success
    assert len(sub.attempts(intent.key)) == 1
    assert await backend.nonce(world.tower.address, "latest") == 1
    assert await sub.submit(intent) == outs[0]
    assert await backend.nonce(world.tower.address, "pending") == 1


async def test_gas_price_spike_replaces_and_lands_before_deadline(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """A gas price spike during the window: blocks mined at 100 and then 1,000 gwei base
    fee price out our refute twice; the submitter replaces it (same nonce, higher fees)
    each time and the refute still lands before the deadline."""
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=2)
    intent = refute_intent(world, backend, world.signed(2))

    async def spiky_miner() -> None:
        for base_fee in (100 * GWEI, 1000 * GWEI):
            await wait_pending(dev)
            await dev.set_next_block_base_fee(base_fee)
            await dev.increase_time(60)
            await dev.mine()
            # the priced-out transaction is not in the spike block
            assert (await registered(backend, world)).version == 1
            await trio.sleep(0.2)  # let the submitter see the spike block first
        await mine_forever(dev, step=60)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spiky_miner)
        with trio.fail_after(40):
            out = await sub.submit(intent)
        nursery.cancel_scope.cancel()

    assert isinstance(out, TxOutcome) and out.success
    attempts = sub.attempts(intent.key)
    assert len(attempts) >= 3, attempts
    assert len({a.nonce for a in attempts}) == 1
    assert attempts[-1].fees.max_fee_per_gas > 1000 * GWEI
    fees = [a.fees.max_fee_per_gas for a in attempts]
    assert fees == sorted(fees)
    assert out.tx_hash == attempts[-1].tx_hash
    assert (await registered(backend, world)).version == 2
    assert await block_time(backend, out.block_number) < world.claimed.deadline


@pytest.mark.parametrize("how", ["anvil_reorg", "snapshot_revert"])
async def test_reorg_dropping_the_refute_is_resent_and_lands(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl, how: str
) -> None:
    """A reorg that drops our refutation after it was mined (``anvil_reorg`` replacing the
    blocks from ours up, or a snapshot taken before and reverted after): the submitter
    notices the receipt is gone, re-sends it, and it lands on the new canonical chain."""
    sub = submitter(world, backend, confirmations=3)
    snapshot = await dev.snapshot()
    intent = refute_intent(world, backend, world.signed(2))
    bg = Background()

    async def first_mined() -> bool:
        return bool(sub.attempts(intent.key)) and (
            await backend.receipt(sub.attempts(intent.key)[0].tx_hash) is not None
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, sub, intent)
        with trio.fail_after(30):
            await poll_node(first_mined)
            first = sub.attempts(intent.key)[0].tx_hash
            receipt = await backend.receipt(first)
            assert receipt is not None
            await trio.sleep(4 * POLL)  # the submitter sees it mined, one confirmation
            # From here blocks come only from mine_forever: with automine on, the
            # submitter's re-send could land before the check below that it is gone.
            await dev.set_automine(False)
            head = await backend.block("latest")
            if how == "anvil_reorg":
                await dev.reorg(head.number - receipt.block_number + 1)
            else:
                assert await dev.revert(snapshot)
            assert await backend.receipt(first) is None
            assert (await registered(backend, world)).version == 1
            nursery.start_soon(mine_forever, dev)
            await bg.done.wait()
        nursery.cancel_scope.cancel()

    result = bg.result
    assert isinstance(result, TxOutcome) and result.success
    kinds = [a.kind for a in sub.attempts(intent.key)]
    assert kinds[0] == "send" and len(kinds) >= 2, kinds
    final = await backend.receipt(result.tx_hash)
    assert final is not None and final.block_hash != receipt.block_hash
    assert (await backend.block(final.block_number)).hash == final.block_hash
    assert (await registered(backend, world)).version == 2
    assert await block_time(backend, result.block_number) < world.claimed.deadline


async def test_stands_down_when_chain_already_holds_newer_state(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """When someone else (the counterparty, a watchtower) already refuted with an equal
    or newer state, the submitter stands down and sends nothing."""
    other = world.signed(3)
    w3 = world.w3
    tx = w3.eth.send_transaction(
        {
            "from": list(w3.eth.accounts)[2],
            "to": Web3.to_checksum_address(world.adjudicator),
            "data": refute_calldata(world.params, world.claimed, other),
        }
    )
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    sub = submitter(world, backend, confirmations=1)
    for version in (2, 3):
        with trio.fail_after(20):
            out = await sub.submit(refute_intent(world, backend, world.signed(version)))
        assert isinstance(out, StoodDown)
    assert await backend.nonce(world.tower.address, "pending") == 0


async def test_stands_down_when_outrun_while_pending(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """If another refuter's newer state is mined first while ours is pending, our refute
    reverts on chain and the submitter reports a stand-down, not a failure."""
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=1)
    intent = refute_intent(world, backend, world.signed(2))
    bg = Background()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, sub, intent)
        with trio.fail_after(30):
            await wait_pending(dev)
            # the rival pays far more priority, so it goes first in the block
            rival = Signer.generate()
            await dev.fund(rival.address, E)
            signed_rival = sign(
                TxParams(
                    chain_id=world.node.chain_id,
                    nonce=0,
                    gas=300_000,
                    fees=Fees(1000 * GWEI, 500 * GWEI),
                    to=world.adjudicator,
                    data=refute_calldata(world.params, world.claimed, world.signed(3)),
                ),
                rival,
            )
            await backend.send_raw_transaction(signed_rival.raw)
            nursery.start_soon(mine_forever, dev)
            await bg.done.wait()
        nursery.cancel_scope.cancel()
    assert isinstance(bg.result, StoodDown)
    assert (await registered(backend, world)).version == 3


async def test_deadline_passing_unmined_raises_funds_at_risk(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """If no block includes our refute before the deadline (here: blocks keep arriving
    but base fees stay above the fee cap), DeadlineMissed — a FundsAtRiskError — is raised."""
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=1, max_fee_cap=50 * GWEI)

    async def hostile_miner() -> None:
        await wait_pending(dev)
        while True:
            await dev.set_next_block_base_fee(100 * GWEI)
            await dev.increase_time(DURATION // 4)
            await dev.mine()
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hostile_miner)
        with trio.fail_after(30), pytest.raises(DeadlineMissed):
            await sub.submit(refute_intent(world, backend, world.signed(2)))
        nursery.cancel_scope.cancel()
    assert (await registered(backend, world)).version == 1


async def test_intents_from_one_key_get_distinct_nonces(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """The nonce manager never hands one nonce to two intents: four concurrent deposits
    from one key (a transaction sent behind its back first) all land, on four nonces."""
    # someone else uses the key first: the manager must skip nonce 0
    external = sign(
        TxParams(
            chain_id=world.node.chain_id,
            nonce=0,
            gas=21_000,
            fees=Fees(100 * GWEI, GWEI),
            to=b"\x42" * 20,
        ),
        world.tower,
    )
    await backend.send_raw_transaction(external.raw)
    sub = submitter(world, backend, confirmations=1)
    data = deposit_eth_calldata(world.params.channel_id)
    intents = [
        Intent(key=("deposit", i), to=world.adjudicator, data=data, value=1000 + i)
        for i in range(4)
    ]
    outs: list[TxOutcome | StoodDown] = []

    async def go(intent: Intent) -> None:
        outs.append(await sub.submit(intent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mine_forever, dev)
        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for intent in intents:
                    inner.start_soon(go, intent)
        nursery.cancel_scope.cancel()
    assert all(isinstance(o, TxOutcome) and o.success for o in outs)
    nonces = sorted(a.nonce for i in intents for a in sub.attempts(i.key))
    assert nonces == [1, 2, 3, 4]
    assert sub.nonces.owned == {}


async def test_node_that_stops_mining_hits_the_deadline_scope(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """When the node produces no block at all, the wall-clock cancel scope (armed from the
    head to the deadline) ends the wait with DeadlineMissed instead of hanging."""
    await dev.set_next_block_timestamp(world.claimed.deadline - 3)
    await dev.mine()
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=1)
    start = trio.current_time()
    with trio.fail_after(20), pytest.raises(DeadlineMissed, match="no block before"):
        await sub.submit(refute_intent(world, backend, world.signed(2)))
    assert trio.current_time() - start < 10
    assert len(sub.attempts((world.params.channel_id, 2, "refute"))) == 1


async def holdings(backend: JsonRpcBackend, world: World) -> int:
    from dispute.abi import decode_uint, holdings_calldata
    from dispute.eth import CallRequest

    out = await backend.call(
        CallRequest(to=world.adjudicator, data=holdings_calldata(world.params.channel_id, ETH))
    )
    return decode_uint("holdings", out)


@pytest.mark.parametrize("how", ["cancelled", "deadline_missed"])
async def test_the_next_intent_takes_over_a_nonce_left_pending(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl, how: str
) -> None:
    """An intent that ends with its transaction still in the pool (its caller cancelled
    it; or its deadline passed with the node producing no block) abandons the nonce.
    The next intent from the key takes that nonce over with higher fees, so the
    abandoned transaction can never be mined: it neither lands late (a deposit nobody
    wants any more, a refute that would revert and burn gas) nor holds up the intents
    behind it."""
    await dev.set_automine(False)
    data = deposit_eth_calldata(world.params.channel_id)
    before = await holdings(backend, world)
    if how == "cancelled":
        sub = submitter(world, backend, confirmations=1)
        first = Intent(key=("deposit", "first"), to=world.adjudicator, data=data, value=1000)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sub.submit, first)
                await wait_pending(dev)
                nursery.cancel_scope.cancel()
    else:
        # The node stops producing blocks just before the deadline: the refute is still in
        # its pool when the submitter gives up.
        await dev.set_automine(True)
        await dev.set_next_block_timestamp(world.claimed.deadline - 3)
        await dev.mine()
        await dev.set_automine(False)
        sub = submitter(world, backend, confirmations=1)
        first = refute_intent(world, backend, world.signed(2))
        with trio.fail_after(20), pytest.raises(DeadlineMissed):
            await sub.submit(first)
    (left,) = {a.nonce for a in sub.attempts(first.key)}
    left_txs = [a.tx_hash for a in sub.attempts(first.key)]
    assert await dev.pending_count() == 1  # the first intent's transaction is still there
    assert sub.nonces.owned == {} and set(sub.nonces.abandoned) == {left}

    second = Intent(key=("deposit", "second"), to=world.adjudicator, data=data, value=2000)
    bg = Background()

    async def sent() -> bool:
        return bool(sub.attempts(second.key))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, sub, second)
        with trio.fail_after(30):
            await poll_node(sent)  # no block yet: both transactions are in the pool now
            nursery.start_soon(mine_forever, dev)
            await bg.done.wait()
            # a few more blocks: nothing else of ours is waiting to be mined
            head = await backend.block("latest")
            await poll_node(lambda: _past(backend, head.number + 3))
        nursery.cancel_scope.cancel()

    out = bg.result
    assert isinstance(out, TxOutcome) and out.success
    (taken,) = sub.attempts(second.key)
    assert taken.nonce == left
    assert taken.fees.max_fee_per_gas > max(a.fees.max_fee_per_gas for a in sub.attempts(first.key))
    for tx_hash in left_txs:
        assert await backend.receipt(tx_hash) is None
    assert await holdings(backend, world) == before + 2000
    assert await backend.nonce(world.tower.address, "latest") == left + 1
    assert sub.nonces.owned == {} and sub.nonces.abandoned == {}


async def _past(backend: JsonRpcBackend, number: int) -> bool:
    return (await backend.block("latest")).number >= number


async def test_fee_escalation_replaces_a_pending_refute_on_a_live_node(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """Late in the window the fee schedule escalates the priority fee: the submitter
    replaces the refute still pending in the node's pool (same nonce, higher fees; the
    base fee unchanged and too few blocks to count as stuck) and the replacement lands.
    A congested block (a rival's gas hog at a higher priority) keeps it out meanwhile."""
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=1, stuck_blocks=1000)
    intent = refute_intent(world, backend, world.signed(2))
    bg = Background()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, sub, intent)
        with trio.fail_after(30):
            await wait_pending(dev)
            (first,) = sub.attempts(intent.key)
            rival = await congest_next_block(world, backend, dev)
            await dev.increase_time(DURATION * 3 // 4)  # past the calm half of the window
            await dev.mine()
            assert await backend.nonce(rival, "latest") == 1  # the hog is in the block
            assert await backend.receipt(first.tx_hash) is None

            async def replaced() -> bool:
                return len(sub.attempts(intent.key)) > 1

            await poll_node(replaced)
            second = sub.attempts(intent.key)[1]
            assert await dev.pending_count() == 1  # the replacement took the old one's place
            nursery.start_soon(mine_forever, dev)
            await bg.done.wait()
        nursery.cancel_scope.cancel()

    out = bg.result
    assert isinstance(out, TxOutcome) and out.success
    assert second.kind == "replace" and second.nonce == first.nonce
    assert second.fees.max_priority_fee_per_gas > first.fees.max_priority_fee_per_gas
    assert out.tx_hash in {a.tx_hash for a in sub.attempts(intent.key)[1:]}
    assert await backend.receipt(first.tx_hash) is None
    assert (await registered(backend, world)).version == 2
    assert await block_time(backend, out.block_number) < world.claimed.deadline


async def test_a_refute_that_lands_at_the_last_moment_is_reported_as_landed(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """The head says the window is over for anything not yet mined (by the submitter's
    margin), and while it asks whether the refute is still needed, ours is mined after
    all, in a block before the deadline.  The submitter reports our transaction's
    outcome: not DeadlineMissed (a false alarm of funds at risk), not a stand-down
    (someone else's doing)."""
    await dev.set_automine(False)
    # A margin of 5 s: the submitter counts on no block within 5 s of the head (on a
    # chain whose blocks come slower), so a head 5 s before the deadline is too late.
    sub = submitter(world, backend, confirmations=1, margin=MARGIN)
    deadline = world.claimed.deadline
    landed = False

    async def still_needed() -> bool:
        nonlocal landed
        head = await backend.block("latest")
        if head.timestamp + MARGIN >= deadline and not landed:  # the submitter's last check
            landed = True
            await dev.set_next_block_timestamp(deadline - 2)
            await dev.mine()  # ours goes in, after all, 2 s before the deadline
            return True  # the answer was read just before that block
        return (await registered(backend, world)).version < 2

    intent = attrs.evolve(refute_intent(world, backend, world.signed(2)), still_needed=still_needed)
    bg = Background()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, sub, intent)
        with trio.fail_after(30):
            await wait_pending(dev)
            (first,) = sub.attempts(intent.key)
            # The last block before the window closes is congested: ours is left out.
            await congest_next_block(world, backend, dev)
            await dev.set_next_block_timestamp(deadline - MARGIN)
            await dev.mine()
            assert await backend.receipt(first.tx_hash) is None
            await bg.done.wait()
        nursery.cancel_scope.cancel()

    assert landed
    out = bg.result
    assert isinstance(out, TxOutcome) and out.success, out
    assert out.tx_hash == first.tx_hash
    assert await block_time(backend, out.block_number) < deadline
    assert (await registered(backend, world)).version == 2


async def test_an_intent_held_up_by_a_nonce_abandoned_below_it_cancels_that_one(
    world: World, backend: JsonRpcBackend, dev: DevNodeControl
) -> None:
    """A refute in flight at nonce 1 while the intent at nonce 0 is cancelled, and then a
    base-fee spike prices out (and the node drops) what was left at nonce 0: the refute
    cannot be mined before nonce 0 is.  The submitter cancels nonce 0 (a transfer of
    nothing to itself) at the refute's fees, and the refute lands; the abandoned deposit
    never does."""
    await dev.set_automine(False)
    sub = submitter(world, backend, confirmations=1)
    before = await holdings(backend, world)
    data = deposit_eth_calldata(world.params.channel_id)
    first = Intent(key=("deposit", "first"), to=world.adjudicator, data=data, value=1000)
    refute = refute_intent(world, backend, world.signed(2))
    bg = Background()

    async def sent(key: object) -> bool:
        return bool(sub.attempts(key))

    async with trio.open_nursery() as nursery:
        with trio.fail_after(40):
            async with trio.open_nursery() as doomed:
                doomed.start_soon(sub.submit, first)
                await poll_node(partial(sent, first.key))
                nursery.start_soon(bg.run, sub, refute)
                await poll_node(partial(sent, refute.key))
                doomed.cancel_scope.cancel()
            assert [a.nonce for a in sub.attempts(refute.key)] == [1]
            assert set(sub.nonces.abandoned) == {0}
            await dev.set_next_block_base_fee(100 * GWEI)
            await dev.mine()  # prices both out; the refute is re-priced, the deposit is not
            nursery.start_soon(mine_forever, dev)
            await bg.done.wait()
        nursery.cancel_scope.cancel()

    out = bg.result
    assert isinstance(out, TxOutcome) and out.success
    assert (await registered(backend, world)).version == 2
    (left,) = sub.attempts(first.key)
    assert await backend.receipt(left.tx_hash) is None
    assert await holdings(backend, world) == before  # the cancelled deposit never landed
    assert await backend.nonce(world.tower.address, "latest") == 2  # the cancel and the refute
