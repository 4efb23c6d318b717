"""Payout rules: the app splits locked amounts, a failing app cannot strand funds, and a
state never pays out more than the channel holds (balanceA first, then balanceB, then locked)."""

from __future__ import annotations

from adjudicator_helpers import (
    ETH,
    addr,
    advance,
    deploy_test,
    expect_revert,
    make_state,
    new_params,
    params_arg,
    sign,
    state_arg,
    transact,
)
from eth_abi import encode
from web3 import Web3
from web3.contract import Contract

from channel.keys import Signer

E = 10**18
GRACE = 14 * 24 * 3600


def _claim(adj: Contract, p: object, s: object, signers: tuple[Signer, Signer], sender: str) -> int:
    r = transact(adj.functions.claim(params_arg(p), state_arg(s), sign(p, s, signers)), sender)  # type: ignore[arg-type]
    return int(adj.events.Claimed().process_receipt(r)[0]["args"]["deadline"])


def _balances(w3: Web3, signers: tuple[Signer, Signer]) -> tuple[int, int]:
    return (
        w3.eth.get_balance(addr(signers[0].address)),
        w3.eth.get_balance(addr(signers[1].address)),
    )


def test_trivial_app_splits_locked_amounts_on_settle(
    w3: Web3,
    adjudicator: Contract,
    app: Contract,
    token: Contract,
    signers: tuple[Signer, Signer],
    funder: str,
) -> None:
    """Locked amounts go through params.app: 70/30 by the app data, per asset, on settle."""
    p = new_params(adjudicator, signers, duration=60, app=bytes.fromhex(app.address[2:]))
    cid = p.channel_id
    transact(adjudicator.functions.depositEthToChannel(cid), funder, value=1000)
    transact(token.functions.mint(funder, 100), funder)
    transact(token.functions.approve(adjudicator.address, 100), funder)
    transact(adjudicator.functions.deposit(cid, token.address, 100), funder)
    tok = bytes.fromhex(token.address[2:])
    s = make_state(
        p, 3, [(ETH, 100, 200, 700), (tok, 10, 10, 80)], app_data=encode(["uint256"], [7000])
    )
    deadline = _claim(adjudicator, p, s, signers, funder)
    advance(w3, 61)
    before = _balances(w3, signers)
    ta0 = token.functions.balanceOf(addr(signers[0].address)).call()
    tb0 = token.functions.balanceOf(addr(signers[1].address)).call()
    transact(adjudicator.functions.settle(params_arg(p), state_arg(s), deadline), funder)
    after = _balances(w3, signers)
    assert (after[0] - before[0], after[1] - before[1]) == (100 + 490, 200 + 210)
    assert token.functions.balanceOf(addr(signers[0].address)).call() - ta0 == 10 + 56
    assert token.functions.balanceOf(addr(signers[1].address)).call() - tb0 == 10 + 24
    assert adjudicator.functions.holdings(cid, addr(ETH)).call() == 0


def test_failing_app_blocks_settle_only_until_the_grace_period(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """An app that reverts, returns a split that does not add up, or burns its gas makes settle
    revert (AppFailed) until deadline + 14 days; after that locked is split evenly, so funds
    are never stuck for good."""
    broken = deploy_test(w3, "BrokenApp")
    for mode in (0, 1, 2):
        p = new_params(adjudicator, signers, duration=60, app=bytes.fromhex(broken.address[2:]))
        transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=1001)
        s = make_state(p, 1, [(ETH, 0, 0, 1001)], app_data=encode(["uint256"], [mode]))
        deadline = _claim(adjudicator, p, s, signers, funder)
        advance(w3, 61)
        settle = adjudicator.functions.settle(params_arg(p), state_arg(s), deadline)
        expect_revert(lambda settle=settle: settle.call({"gas": 2_000_000}), "AppFailed(address)")
        advance(w3, GRACE)
        before = _balances(w3, signers)
        transact(settle, funder, gas=2_000_000)
        after = _balances(w3, signers)
        assert (after[0] - before[0], after[1] - before[1]) == (501, 500)


def test_app_gets_its_full_gas_budget(
    w3: Web3, adjudicator: Contract, app: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A settle sent with too little gas to give the app its whole budget reverts (GasTooLow)
    instead of falling back, so a caller cannot starve the app to force the fallback split."""
    p = new_params(adjudicator, signers, duration=60, app=bytes.fromhex(app.address[2:]))
    transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=10)
    s = make_state(p, 1, [(ETH, 0, 0, 10)])
    deadline = _claim(adjudicator, p, s, signers, funder)
    advance(w3, 61 + GRACE)
    settle = adjudicator.functions.settle(params_arg(p), state_arg(s), deadline)
    expect_revert(lambda: settle.call({"gas": 300_000}), "GasTooLow()")
    transact(settle, funder)


def test_underfunded_state_pays_a_first_then_b(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A state promising more than the channel holds pays what is there: A's balance first,
    then B's; holdings never go negative and other channels are untouched."""
    p = new_params(adjudicator, signers)
    transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=3 * E)
    s = make_state(p, 0, [(ETH, 2 * E, 2 * E)], final=True)
    before = _balances(w3, signers)
    transact(adjudicator.functions.close(params_arg(p), state_arg(s), sign(p, s, signers)), funder)
    after = _balances(w3, signers)
    assert (after[0] - before[0], after[1] - before[1]) == (2 * E, 1 * E)
    assert adjudicator.functions.holdings(p.channel_id, addr(ETH)).call() == 0


def test_surplus_stays_in_the_channel(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """Holdings above the state's total stay in holdings after close (they can be paid by a
    later co-signed state), never to a third party."""
    p = new_params(adjudicator, signers)
    transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=5 * E)
    s = make_state(p, 4, [(ETH, E, E)], final=True)
    transact(adjudicator.functions.close(params_arg(p), state_arg(s), sign(p, s, signers)), funder)
    assert adjudicator.functions.holdings(p.channel_id, addr(ETH)).call() == 3 * E
