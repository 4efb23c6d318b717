"""Signature checks: only both participants' low-s, v in {27, 28} signatures over this
channel, this chain and this adjudicator deployment register a state."""

from __future__ import annotations

import pytest
from adjudicator_helpers import (
    ETH,
    connect,
    deploy_adjudicator,
    expect_revert,
    make_state,
    new_params,
    params_arg,
    sign,
    state_arg,
)
from web3 import Web3
from web3.contract import Contract

from channel.keys import SECP256K1_N, Signer
from dispute.anvil import run_anvil


def _claim(adj: Contract, p: object, s: object, sigs: bytes) -> object:
    return adj.functions.claim(params_arg(p), state_arg(s), sigs).call()  # type: ignore[arg-type]


def test_valid_signatures_are_accepted(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """The baseline: signatures made by channel.keys over channel.eip712's digest register."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    _claim(adjudicator, p, s, sign(p, s, signers))


def test_high_s_signature_is_rejected(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """The malleable twin (n - s, flipped v) of a valid signature is refused (EIP-2 low-s)."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    good = sign(p, s, signers)
    a = good[:65]
    high_s = (SECP256K1_N - int.from_bytes(a[32:64], "big")).to_bytes(32, "big")
    twin = a[:32] + high_s + bytes([55 - a[64]])  # 27 <-> 28
    expect_revert(lambda: _claim(adjudicator, p, s, twin + good[65:]), "BadSignature()")


@pytest.mark.parametrize("v", [0, 1, 29, 35, 255])
def test_wrong_v_is_rejected(adjudicator: Contract, signers: tuple[Signer, Signer], v: int) -> None:
    """v outside {27, 28} is refused even where ecrecover would accept 0/1-style recovery ids."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    good = sign(p, s, signers)
    bad = good[:129] + bytes([v])
    expect_revert(lambda: _claim(adjudicator, p, s, bad), "BadSignature()")


def test_wrong_lengths_and_order_are_rejected(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """Exactly A's then B's 65-byte signatures: swapped, truncated or padded sets are refused."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    good = sign(p, s, signers)
    for bad in (good[65:] + good[:65], good[:129], good + b"\x00", good[:65] + good[:65]):
        expect_revert(lambda bad=bad: _claim(adjudicator, p, s, bad), "BadSignature()")


def test_non_participant_signature_is_rejected(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """A state signed by a stranger instead of either participant is refused."""
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    stranger = Signer.generate()
    expect_revert(
        lambda: _claim(adjudicator, p, s, sign(p, s, (signers[0], stranger))), "BadSignature()"
    )
    expect_revert(
        lambda: _claim(adjudicator, p, s, sign(p, s, (stranger, signers[1]))), "BadSignature()"
    )


def test_signature_replayed_on_another_channel_is_rejected(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """Signatures over channel X's state do not register the same balances on channel Y."""
    px = new_params(adjudicator, signers)
    py = new_params(adjudicator, signers)  # same participants, another salt
    sx = make_state(px, 5, [(ETH, 1, 2)])
    sy = make_state(py, 5, [(ETH, 1, 2)])
    # X's signatures on Y's state: the digest differs
    expect_revert(lambda: _claim(adjudicator, py, sy, sign(px, sx, signers)), "BadSignature()")
    # X's state under Y's params: the channel id does not match
    expect_revert(lambda: _claim(adjudicator, py, sx, sign(px, sx, signers)), "ChannelMismatch()")


def test_signature_replayed_on_another_adjudicator_is_rejected(
    w3: Web3, adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """A state signed for one adjudicator deployment is refused by another deployment."""
    other = deploy_adjudicator(w3)
    p = new_params(adjudicator, signers)
    s = make_state(p, 1, [(ETH, 1, 2)])
    sigs = sign(p, s, signers)
    # same params: they name the first adjudicator
    expect_revert(lambda: _claim(other, p, s, sigs), "WrongChain()")
    # params rewritten to name the second: new channel id, signatures no longer match
    p2 = new_params(other, signers)
    p2 = type(p2)(
        chain_id=p.chain_id,
        adjudicator=p2.adjudicator,
        participants=p.participants,
        salt=p.salt,
        challenge_duration=p.challenge_duration,
        app=p.app,
    )
    s2 = make_state(p2, 1, [(ETH, 1, 2)])
    expect_revert(lambda: _claim(other, p2, s2, sigs), "BadSignature()")


def test_signature_replayed_on_another_chain_is_rejected(
    adjudicator: Contract, signers: tuple[Signer, Signer]
) -> None:
    """The same adjudicator address on another chain id refuses this chain's signatures."""
    with run_anvil(chain_id=4242) as node:
        w3b = connect(node.url)
        twin = deploy_adjudicator(w3b)
        p = new_params(twin, signers, chain_id=31337)
        s = make_state(p, 1, [(ETH, 1, 2)])
        sigs = sign(p, s, signers)
        expect_revert(lambda: _claim(twin, p, s, sigs), "WrongChain()")
        # params claiming chain 4242, with signatures made for 31337's domain
        p42 = new_params(twin, signers, chain_id=4242)
        p42 = type(p42)(
            chain_id=4242,
            adjudicator=p.adjudicator,
            participants=p.participants,
            salt=p.salt,
            challenge_duration=p.challenge_duration,
            app=p.app,
        )
        s42 = make_state(p42, 1, [(ETH, 1, 2)])
        p_signed = type(p42)(
            chain_id=31337,
            adjudicator=p.adjudicator,
            participants=p.participants,
            salt=p.salt,
            challenge_duration=p.challenge_duration,
            app=p.app,
        )
        expect_revert(
            lambda: _claim(twin, p42, s42, sign(p_signed, s42, signers)), "BadSignature()"
        )
