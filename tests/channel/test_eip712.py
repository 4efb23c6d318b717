"""EIP-712 digests and signatures agree with eth-account, an independent implementation."""

from __future__ import annotations

import json

import pytest
from amounts import amounts
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channel.eip712 import state_digest, typed_data
from channel.errors import InvalidSignature
from channel.hashing import keccak
from channel.keys import SECP256K1_N, Signer, recover, verify
from channel.state import UINT64_MAX, UINT256_MAX, Address, Allocation, Params, State

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses = st.binary(min_size=20, max_size=20)
secrets = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda n: n.to_bytes(32, "big"))


@st.composite
def params_and_states(draw: st.DrawFn) -> tuple[Params, State]:
    a, b = draw(st.lists(addresses, min_size=2, max_size=2, unique=True))
    params = Params(
        chain_id=draw(st.integers(min_value=0, max_value=UINT256_MAX)),
        adjudicator=Address(draw(addresses)),
        participants=(Address(a), Address(b)),
        salt=draw(st.binary(min_size=32, max_size=32)),
        challenge_duration=draw(st.integers(min_value=0, max_value=UINT64_MAX)),
        app=Address(draw(addresses)),
    )
    assets = draw(st.lists(addresses, min_size=1, max_size=4, unique=True))
    allocations = tuple(
        Allocation(asset=Address(asset), balances=(b0, b1), locked=locked)
        for asset, (b0, b1, locked) in ((a, draw(amounts())) for a in assets)
    )
    state = State(
        channel_id=params.channel_id,
        version=draw(st.integers(min_value=0, max_value=UINT64_MAX)),
        allocations=allocations,
        app_data=draw(st.binary(max_size=200)),
        is_final=draw(st.booleans()),
    )
    return params, state


def eip191_digest(msg: SignableMessage) -> bytes:
    return keccak(b"\x19" + msg.version + msg.header + msg.body)


def their_digest(params: Params, state: State) -> bytes:
    return eip191_digest(encode_typed_data(full_message=typed_data(params, state)))


def simple() -> tuple[Params, State, Signer, Signer]:
    alice, bob = Signer.generate(), Signer.generate()
    params = Params.new(
        chain_id=31337,
        adjudicator=b"\xad" * 20,
        participants=(alice.address, bob.address),
        challenge_duration=3600,
    )
    state = State.initial(params, [(b"\x00" * 20, 10**18, 5 * 10**17), (b"\x11" * 20, 7, 0)])
    return params, state, alice, bob


@SETTINGS
@given(params_and_states())
def test_digest_matches_eth_account(ps: tuple[Params, State]) -> None:
    """Our state digest equals eth-account's encode_typed_data digest over our exported JSON."""
    params, state = ps
    assert state_digest(params, state) == their_digest(params, state)


@SETTINGS
@given(params_and_states())
def test_typed_data_is_json_serialisable(ps: tuple[Params, State]) -> None:
    """typed_data() survives a JSON round trip unchanged and still hashes to our digest."""
    params, state = ps
    text = json.dumps(typed_data(params, state))
    reloaded = json.loads(text)
    assert reloaded == typed_data(params, state)
    assert eip191_digest(encode_typed_data(full_message=reloaded)) == state_digest(params, state)


@SETTINGS
@given(params_and_states(), secrets)
def test_eth_account_signature_verifies_in_ours(ps: tuple[Params, State], secret: bytes) -> None:
    """A signature made by eth-account's sign_typed_data verifies in channel.keys.verify."""
    params, state = ps
    acct = Account.from_key(secret)
    signed = Account.sign_typed_data(secret, full_message=typed_data(params, state))
    sig = bytes(signed.signature)
    assert len(sig) == 65 and sig[64] in (27, 28)
    verify(state_digest(params, state), sig, bytes.fromhex(acct.address[2:]))


@SETTINGS
@given(params_and_states(), secrets)
def test_our_signature_recovers_in_eth_account(ps: tuple[Params, State], secret: bytes) -> None:
    """A signature made by our Signer recovers to the signer's address in eth-account."""
    params, state = ps
    signer = Signer.from_bytes(secret)
    sig = signer.sign(state_digest(params, state))
    msg = encode_typed_data(full_message=typed_data(params, state))
    got = Account.recover_message(msg, signature=sig)
    assert bytes.fromhex(got[2:]) == signer.address
    assert Account.from_key(secret).address == got


@SETTINGS
@given(params_and_states(), st.integers(min_value=0, max_value=UINT256_MAX))
def test_other_chain_id_changes_digest(ps: tuple[Params, State], chain_id: int) -> None:
    """A digest under another chain id differs, and a signature over it fails for the real one."""
    params, state = ps
    if chain_id == params.chain_id:
        chain_id = (chain_id + 1) % (UINT256_MAX + 1)
    other = Params(
        chain_id=chain_id,
        adjudicator=params.adjudicator,
        participants=params.participants,
        salt=params.salt,
        challenge_duration=params.challenge_duration,
        app=params.app,
    )
    # the same State value (same channel id field) under another domain
    assert state_digest(other, state) != state_digest(params, state)
    signer = Signer.generate()
    sig = signer.sign(state_digest(other, state))
    with pytest.raises(InvalidSignature):
        verify(state_digest(params, state), sig, signer.address)


@SETTINGS
@given(params_and_states(), addresses)
def test_other_verifying_contract_changes_digest(
    ps: tuple[Params, State], adjudicator: bytes
) -> None:
    """A digest under another verifying contract differs; a signature over it fails verify."""
    params, state = ps
    if adjudicator == params.adjudicator:
        adjudicator = bytes([adjudicator[0] ^ 1]) + adjudicator[1:]
    other = Params(
        chain_id=params.chain_id,
        adjudicator=Address(adjudicator),
        participants=params.participants,
        salt=params.salt,
        challenge_duration=params.challenge_duration,
        app=params.app,
    )
    assert state_digest(other, state) != state_digest(params, state)
    assert their_digest(other, state) == state_digest(other, state)
    signer = Signer.generate()
    sig = signer.sign(state_digest(other, state))
    with pytest.raises(InvalidSignature):
        verify(state_digest(params, state), sig, signer.address)


def test_high_s_signature_rejected() -> None:
    """The malleated twin (s -> n - s, v flipped) of a valid signature is refused (EIP-2)."""
    params, state, alice, _ = simple()
    digest = state_digest(params, state)
    sig = alice.sign(digest)
    verify(digest, sig, alice.address)
    s = int.from_bytes(sig[32:64], "big")
    flipped_v = 27 if sig[64] == 28 else 28
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([flipped_v])
    # the twin is a mathematically valid signature: eth-account still recovers alice from it
    msg = encode_typed_data(full_message=typed_data(params, state))
    assert bytes.fromhex(Account.recover_message(msg, signature=high)[2:]) == alice.address
    with pytest.raises(InvalidSignature):
        verify(digest, high, alice.address)


@pytest.mark.parametrize("v", [0, 1, 29, 26, 255])
def test_bad_v_rejected(v: int) -> None:
    """A signature whose v is not 27 or 28 is refused, even with the right r and s."""
    params, state, alice, _ = simple()
    digest = state_digest(params, state)
    sig = alice.sign(digest)
    with pytest.raises(InvalidSignature):
        verify(digest, sig[:64] + bytes([v]), alice.address)


@pytest.mark.parametrize("length", [0, 64, 66])
def test_wrong_length_signature_rejected(length: int) -> None:
    """A signature that is not exactly 65 bytes (e.g. a 64-byte compact one) is refused."""
    params, state, alice, _ = simple()
    digest = state_digest(params, state)
    sig = (alice.sign(digest) + b"\x00")[:length]
    with pytest.raises(InvalidSignature):
        verify(digest, sig, alice.address)


def test_wrong_key_rejected() -> None:
    """A valid signature by the other participant does not pass as ours."""
    params, state, alice, bob = simple()
    digest = state_digest(params, state)
    sig = bob.sign(digest)
    assert recover(digest, sig) == bob.address
    with pytest.raises(InvalidSignature):
        verify(digest, sig, alice.address)


@pytest.mark.parametrize("r_or_s", ["r0", "s0", "rn"])
def test_out_of_range_r_s_rejected(r_or_s: str) -> None:
    """r or s equal to zero, or r at the curve order, is refused before recovery."""
    params, state, alice, _ = simple()
    digest = state_digest(params, state)
    sig = alice.sign(digest)
    zero = b"\x00" * 32
    n = SECP256K1_N.to_bytes(32, "big")
    bad = {
        "r0": zero + sig[32:],
        "s0": sig[:32] + zero + sig[64:],
        "rn": n + sig[32:],
    }[r_or_s]
    with pytest.raises(InvalidSignature):
        verify(digest, bad, alice.address)


def test_signature_over_other_state_rejected() -> None:
    """A signature over one version does not verify for the next version's digest."""
    params, state, alice, _ = simple()
    sig = alice.sign(state_digest(params, state))
    nxt = State(
        channel_id=state.channel_id,
        version=1,
        allocations=state.allocations,
        app_data=state.app_data,
        is_final=state.is_final,
    )
    with pytest.raises(InvalidSignature):
        verify(state_digest(params, nxt), sig, alice.address)
