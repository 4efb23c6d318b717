"""Hostile tokens and recipients: re-entrancy never drains, a failing recipient never
blocks the other's payout, and what could not be pushed stays withdrawable."""

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
    set_code,
    sign,
    state_arg,
    transact,
)
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from channel.keys import Signer

E = 10**18


def addr_sender(w3: Web3, k: Signer) -> str:
    """Let anvil send transactions as ``k`` (impersonation), so msg.sender is its address."""
    w3.provider.make_request("anvil_impersonateAccount", [addr(k.address)])  # type: ignore[arg-type]
    return addr(k.address)


def _close_args(adj: Contract, p: object, s: object, signers: tuple[Signer, Signer]) -> object:
    return adj.functions.close(params_arg(p), state_arg(s), sign(p, s, signers))  # type: ignore[arg-type]


def test_reentrant_receiver_cannot_drain(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A recipient that re-enters close/withdraw from its receive hook gets exactly its share;
    a second channel's funds in the same contract stay untouched."""
    a = signers[0]
    victim = new_params(adjudicator, signers)
    transact(adjudicator.functions.depositEthToChannel(victim.channel_id), funder, value=5 * E)
    p = new_params(adjudicator, signers)
    transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=2 * E)
    s = make_state(p, 3, [(ETH, E, E)], final=True)
    recv = set_code(w3, a.address, "ReentrantReceiver")
    fn = _close_args(adjudicator, p, s, signers)
    transact(recv.functions.arm(adjudicator.address, fn._encode_transaction_data()), funder)
    held = w3.eth.get_balance(adjudicator.address)
    bal_a = w3.eth.get_balance(addr(a.address))
    transact(fn, funder)
    paid_a = w3.eth.get_balance(addr(a.address)) - bal_a
    credit_a = adjudicator.functions.credits(addr(a.address), addr(ETH)).call()
    assert paid_a + credit_a == E
    assert w3.eth.get_balance(adjudicator.address) == held - 2 * E + credit_a
    assert adjudicator.functions.holdings(victim.channel_id, addr(ETH)).call() == 5 * E
    # withdrawing with full gas: the hook re-enters withdraw, which the guard refuses
    if credit_a:
        wd = adjudicator.functions.withdraw(addr(ETH), addr(a.address))
        transact(recv.functions.arm(adjudicator.address, wd._encode_transaction_data()), funder)
        transact(recv.functions.pull(adjudicator.address, addr(ETH), addr(a.address)), funder)
        assert recv.functions.reentered().call() == 0
        assert w3.eth.get_balance(addr(a.address)) - bal_a == E
    assert w3.eth.get_balance(adjudicator.address) == held - 2 * E


def test_reentrant_token_cannot_drain(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A token that calls back into settle/deposit from transfer and transferFrom never gets
    a re-entrant call through; each participant receives exactly its balance."""
    a, b = signers
    evil = deploy_test(w3, "ReentrantToken")
    asset = bytes.fromhex(evil.address[2:])
    p = new_params(adjudicator, signers, duration=60)
    transact(evil.functions.mint(funder, 1000), funder)
    transact(evil.functions.approve(adjudicator.address, 2**256 - 1), funder)
    # re-enter deposit from transferFrom
    dep = adjudicator.functions.deposit(p.channel_id, evil.address, 100)
    transact(evil.functions.arm(adjudicator.address, dep._encode_transaction_data()), funder)
    transact(adjudicator.functions.deposit(p.channel_id, evil.address, 400), funder)
    assert adjudicator.functions.holdings(p.channel_id, evil.address).call() == 400
    assert evil.functions.balanceOf(adjudicator.address).call() == 400
    # re-enter settle from transfer
    s = make_state(p, 2, [(asset, 150, 250)])
    r = transact(
        adjudicator.functions.claim(params_arg(p), state_arg(s), sign(p, s, signers)), funder
    )
    deadline = adjudicator.events.Claimed().process_receipt(r)[0]["args"]["deadline"]
    advance(w3, 61)
    st = adjudicator.functions.settle(params_arg(p), state_arg(s), deadline)
    transact(evil.functions.arm(adjudicator.address, st._encode_transaction_data()), funder)
    transact(st, funder)
    # a push the token makes too expensive is credited instead; withdraw it with full gas
    # (the token re-enters withdraw this time, with plenty of gas, and is refused)
    for k, share in ((a, 150), (b, 250)):
        credit = adjudicator.functions.credits(addr(k.address), evil.address).call()
        assert evil.functions.balanceOf(addr(k.address)).call() + credit == share
        if credit:
            wd = adjudicator.functions.withdraw(evil.address, addr(k.address))
            transact(evil.functions.arm(adjudicator.address, wd._encode_transaction_data()), funder)
            w3.eth.send_transaction({"to": addr(k.address), "from": funder, "value": E})
            transact(wd, addr_sender(w3, k))
        assert evil.functions.balanceOf(addr(k.address)).call() == share
    assert evil.functions.reentryAttempts().call() >= 2
    assert evil.functions.reentrySucceeded().call() == 0
    assert evil.functions.balanceOf(adjudicator.address).call() == 0


def _failing_recipient_case(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str, code: str
) -> None:
    a, b = signers
    p = new_params(adjudicator, signers)
    transact(adjudicator.functions.depositEthToChannel(p.channel_id), funder, value=3 * E)
    s = make_state(p, 7, [(ETH, E, 2 * E)], final=True)
    hostile = set_code(w3, b.address, code)
    bal_a, bal_b = w3.eth.get_balance(addr(a.address)), w3.eth.get_balance(addr(b.address))
    r = transact(_close_args(adjudicator, p, s, signers), funder, gas=500_000)
    assert r["gasUsed"] < 150_000
    assert w3.eth.get_balance(addr(a.address)) - bal_a == E
    assert w3.eth.get_balance(addr(b.address)) == bal_b
    assert adjudicator.functions.credits(addr(b.address), addr(ETH)).call() == 2 * E
    ev = adjudicator.events.Credited().process_receipt(r, errors=DISCARD)[0]["args"]
    assert (ev["account"], ev["amount"]) == (addr(b.address), 2 * E)
    # B withdraws later, to an address of its choosing (its own code refuses ETH)
    sink = w3.eth.accounts[7]
    before = w3.eth.get_balance(sink)
    transact(hostile.functions.pull(adjudicator.address, addr(ETH), sink), funder)
    assert w3.eth.get_balance(sink) - before == 2 * E
    assert adjudicator.functions.credits(addr(b.address), addr(ETH)).call() == 0
    expect_revert(
        lambda: hostile.functions.pull(adjudicator.address, addr(ETH), sink).call(),
        "NothingToWithdraw()",
    )


def test_reverting_receiver_does_not_block_the_other_payout(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """B's receive reverts: A is still paid in the same transaction, B's share is credited
    and B can withdraw it later to another address."""
    _failing_recipient_case(w3, adjudicator, signers, funder, "RevertingReceiver")


def test_gas_burning_receiver_does_not_block_the_other_payout(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """B's receive burns all gas: it only gets the bounded stipend, A is paid, B's share is
    credited and withdrawable."""
    _failing_recipient_case(w3, adjudicator, signers, funder, "GasBurner")
