"""Full channel lifecycles on the real contract: deposits, close, claim, refute, settle."""

from __future__ import annotations

from adjudicator_helpers import (
    ETH,
    addr,
    advance,
    dispute_arg,
    expect_revert,
    make_state,
    new_params,
    params_arg,
    sign,
    state_arg,
    transact,
)
from web3 import Web3
from web3.contract import Contract

from channel.eip712 import domain_separator, state_struct_hash
from channel.keys import Signer

E = 10**18


def _deposit_both(
    w3: Web3, adj: Contract, token: Contract, funder: str, cid: bytes, eth: int, tok: int
) -> None:
    transact(adj.functions.depositEthToChannel(cid), funder, value=eth)
    transact(token.functions.mint(funder, tok), funder)
    transact(token.functions.approve(adj.address, tok), funder)
    transact(adj.functions.deposit(cid, token.address, tok), funder)


def test_contract_hashes_match_python(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """The contract's channel id, EIP-712 domain and struct hash equal channel/'s."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 7, [(ETH, 5, 6, 7)], app_data=b"\x01\x02", final=True)
    assert adjudicator.functions.channelIdOf(params_arg(p)).call() == p.channel_id
    assert adjudicator.functions.stateHashOf(state_arg(s)).call() == state_struct_hash(s)
    assert adjudicator.functions.domainSeparator().call() == domain_separator(
        p.chain_id, p.adjudicator
    )


def test_claim_settle_pays_eth_and_erc20_exactly(
    w3: Web3,
    adjudicator: Contract,
    token: Contract,
    signers: tuple[Signer, Signer],
    funder: str,
) -> None:
    """After claim and the window, settle pays each participant exactly its balance per asset."""
    a, b = signers
    p = new_params(adjudicator, signers, duration=600)
    cid = p.channel_id
    _deposit_both(w3, adjudicator, token, funder, cid, 3 * E, 1000)
    assert adjudicator.functions.holdings(cid, addr(ETH)).call() == 3 * E
    assert adjudicator.functions.holdings(cid, token.address).call() == 1000
    s = make_state(p, 4, [(ETH, 2 * E, 1 * E), (bytes.fromhex(token.address[2:]), 300, 700)])
    r = transact(
        adjudicator.functions.claim(params_arg(p), state_arg(s), sign(p, s, signers)), funder
    )
    deadline = w3.eth.get_block(r["blockNumber"])["timestamp"] + 600
    ev = adjudicator.events.Claimed().process_receipt(r)[0]["args"]
    assert (ev["version"], ev["deadline"], ev["stateHash"]) == (4, deadline, state_struct_hash(s))
    d = dispute_arg(s, deadline)
    assert adjudicator.functions.disputeStatus(cid, d).call() == 1
    eth_a, eth_b = w3.eth.get_balance(addr(a.address)), w3.eth.get_balance(addr(b.address))
    advance(w3, 601)
    assert adjudicator.functions.disputeStatus(cid, d).call() == 2
    transact(adjudicator.functions.settle(params_arg(p), state_arg(s), deadline), funder)
    assert w3.eth.get_balance(addr(a.address)) - eth_a == 2 * E
    assert w3.eth.get_balance(addr(b.address)) - eth_b == 1 * E
    assert token.functions.balanceOf(addr(a.address)).call() == 300
    assert token.functions.balanceOf(addr(b.address)).call() == 700
    assert adjudicator.functions.holdings(cid, addr(ETH)).call() == 0
    assert adjudicator.functions.holdings(cid, token.address).call() == 0
    assert adjudicator.functions.disputes(cid).call() == b"\x00" * 32


def test_cooperative_close_pays_both_at_once(
    w3: Web3,
    adjudicator: Contract,
    token: Contract,
    signers: tuple[Signer, Signer],
    funder: str,
) -> None:
    """A final state signed by both pays both, for every asset, in the same transaction."""
    a, b = signers
    p = new_params(adjudicator, signers)
    cid = p.channel_id
    _deposit_both(w3, adjudicator, token, funder, cid, 2 * E, 50)
    s = make_state(
        p, 9, [(ETH, E // 4, 2 * E - E // 4), (bytes.fromhex(token.address[2:]), 49, 1)], final=True
    )
    eth_a, eth_b = w3.eth.get_balance(addr(a.address)), w3.eth.get_balance(addr(b.address))
    transact(adjudicator.functions.close(params_arg(p), state_arg(s), sign(p, s, signers)), funder)
    assert w3.eth.get_balance(addr(a.address)) - eth_a == E // 4
    assert w3.eth.get_balance(addr(b.address)) - eth_b == 2 * E - E // 4
    assert token.functions.balanceOf(addr(a.address)).call() == 49
    assert token.functions.balanceOf(addr(b.address)).call() == 1
    assert adjudicator.functions.holdings(cid, addr(ETH)).call() == 0


def test_close_needs_a_final_state(
    adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A co-signed but non-final state cannot close a channel."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 0, 0)])
    fn = adjudicator.functions.close(params_arg(p), state_arg(s), sign(p, s, signers))
    expect_revert(lambda: fn.call({"from": funder}), "NotFinal()")


def test_stale_claim_is_refuted_and_newer_state_settles(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """A stale claim is replaced by a strictly newer co-signed state (sent by a third party),
    the deadline does not move, and settle pays by the newer state."""
    a, b = signers
    p = new_params(adjudicator, signers, duration=300)
    cid = p.channel_id
    transact(adjudicator.functions.depositEthToChannel(cid), funder, value=10 * E)
    old = make_state(p, 3, [(ETH, 9 * E, 1 * E)])
    new = make_state(p, 8, [(ETH, 2 * E, 8 * E)])
    r = transact(
        adjudicator.functions.claim(params_arg(p), state_arg(old), sign(p, old, signers)), funder
    )
    deadline = adjudicator.events.Claimed().process_receipt(r)[0]["args"]["deadline"]
    third_party = w3.eth.accounts[5]
    r2 = transact(
        adjudicator.functions.refute(
            params_arg(p), dispute_arg(old, deadline), state_arg(new), sign(p, new, signers)
        ),
        third_party,
    )
    ev = adjudicator.events.Refuted().process_receipt(r2)[0]["args"]
    assert (ev["version"], ev["deadline"]) == (8, deadline)
    # the old state can neither be re-registered nor settled
    expect_revert(
        lambda: adjudicator.functions.claim(
            params_arg(p), state_arg(old), sign(p, old, signers)
        ).call(),
        "DisputeExists()",
    )
    # an equal version is not a refutation
    same = make_state(p, 8, [(ETH, 5 * E, 5 * E)])
    expect_revert(
        lambda: adjudicator.functions.refute(
            params_arg(p), dispute_arg(new, deadline), state_arg(same), sign(p, same, signers)
        ).call(),
        "NotNewer()",
    )
    advance(w3, 301)
    expect_revert(
        lambda: adjudicator.functions.settle(params_arg(p), state_arg(old), deadline).call(),
        "DisputeMismatch()",
    )
    eth_a, eth_b = w3.eth.get_balance(addr(a.address)), w3.eth.get_balance(addr(b.address))
    transact(adjudicator.functions.settle(params_arg(p), state_arg(new), deadline), funder)
    assert w3.eth.get_balance(addr(a.address)) - eth_a == 2 * E
    assert w3.eth.get_balance(addr(b.address)) - eth_b == 8 * E


def test_refute_after_deadline_is_rejected(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """Once the deadline has passed, even a newer state cannot replace the registered one."""
    p = new_params(adjudicator, signers, duration=100)
    old = make_state(p, 1, [(ETH, 1, 0)])
    new = make_state(p, 2, [(ETH, 0, 1)])
    r = transact(
        adjudicator.functions.claim(params_arg(p), state_arg(old), sign(p, old, signers)), funder
    )
    deadline = adjudicator.events.Claimed().process_receipt(r)[0]["args"]["deadline"]
    advance(w3, 101)
    expect_revert(
        lambda: adjudicator.functions.refute(
            params_arg(p), dispute_arg(old, deadline), state_arg(new), sign(p, new, signers)
        ).call(),
        "WindowClosed()",
    )


def test_settle_before_deadline_is_rejected(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer], funder: str
) -> None:
    """Settle reverts while the challenge window is open, and without a claim at all."""
    p = new_params(adjudicator, signers, duration=1000)
    s = make_state(p, 1, [(ETH, 0, 0)])
    expect_revert(
        lambda: adjudicator.functions.settle(params_arg(p), state_arg(s), 0).call(), "NoDispute()"
    )
    r = transact(
        adjudicator.functions.claim(params_arg(p), state_arg(s), sign(p, s, signers)), funder
    )
    deadline = adjudicator.events.Claimed().process_receipt(r)[0]["args"]["deadline"]
    advance(w3, 500)
    expect_revert(
        lambda: adjudicator.functions.settle(params_arg(p), state_arg(s), deadline).call(),
        "WindowOpen()",
    )
