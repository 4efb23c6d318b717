"""The pure Adjudicator codec (``dispute.abi``): selectors from the artifact, calldata that
decodes back to what went in, events and custom errors decoded from raw chain data."""

from __future__ import annotations

import os
from typing import Any

import pytest
from amounts import amounts
from eth_abi.abi import encode
from eth_utils.abi import function_abi_to_4byte_selector
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.chain import Claimed, Concluded, Deposited, Payout, Refuted
from channel.errors import ChainError, LocalProtocolError, Reverted
from channel.hashing import keccak
from channel.state import MAX_APP_DATA, Address, Allocation, Params, SignedState, State
from dispute import abi
from dispute.compile import load_artifact
from dispute.eth import Log
from dispute.rpc import rpc_error

UINT256 = 2**256 - 1
UINT64 = 2**64 - 1

addresses = st.binary(min_size=20, max_size=20).map(Address)


@st.composite
def params(draw: st.DrawFn) -> Params:
    a = draw(addresses)
    b = draw(addresses.filter(lambda x: x != a))
    return Params(
        chain_id=draw(st.integers(1, UINT256)),
        adjudicator=draw(addresses),
        participants=(a, b),
        salt=draw(st.binary(min_size=32, max_size=32)),
        challenge_duration=draw(st.integers(0, UINT64)),
        app=draw(addresses),
    )


@st.composite
def states(draw: st.DrawFn, p: Params) -> State:
    assets = draw(st.lists(addresses, min_size=1, max_size=4, unique=True))
    allocs = tuple(
        Allocation(asset=x, balances=(b0, b1), locked=locked)
        for x, (b0, b1, locked) in ((x, draw(amounts())) for x in assets)
    )
    return State(
        channel_id=p.channel_id,
        version=draw(st.integers(0, UINT64)),
        allocations=allocs,
        app_data=draw(st.binary(max_size=200)),
        is_final=draw(st.booleans()),
    )


@st.composite
def channel(draw: st.DrawFn) -> tuple[Params, SignedState]:
    p = draw(params())
    s = draw(states(p))
    sigs = (os.urandom(65), os.urandom(65))
    return p, SignedState(state=s, signatures=sigs)


def _log(topics: list[bytes], data: bytes, removed: bool = False) -> Log:
    return Log(
        address=b"\x11" * 20,
        topics=tuple(topics),
        data=data,
        block_number=42,
        block_hash=b"\x22" * 32,
        tx_hash=b"\x33" * 32,
        log_index=3,
        removed=removed,
    )


def _word(b: bytes) -> bytes:
    return b.rjust(32, b"\0")


# ----------------------------------------------------------------- selectors


def test_selectors_come_from_the_artifact() -> None:
    """Every function's selector equals eth-utils' computation from the artifact ABI entry."""
    entries = [e for e in load_artifact()["abi"] if e["type"] == "function"]
    assert entries
    for entry in entries:
        assert abi.selector(entry["name"]) == function_abi_to_4byte_selector(entry)


def test_event_topics_and_error_selectors_are_keccak_of_signatures() -> None:
    """Topic 0 is keccak of the event signature; error selectors are its first 4 bytes."""
    assert abi.event_topic("Deposited") == keccak(b"Deposited(bytes32,address,uint256)")
    assert abi.error_selector("WindowClosed") == keccak(b"WindowClosed()")[:4]
    assert abi.error_selector("AppFailed") == keccak(b"AppFailed(address)")[:4]
    assert abi.error_selector("Error") == bytes.fromhex("08c379a0")


def test_unknown_function_is_a_key_error() -> None:
    """Asking for a function the contract lacks fails loudly, not with an empty selector."""
    with pytest.raises(KeyError, match="no function"):
        abi.selector("drain")


# ----------------------------------------------------------------- calldata round trips


@settings(max_examples=60, deadline=None)
@given(channel())
def test_claim_close_calldata_decode_back(ch: tuple[Params, SignedState]) -> None:
    """claim and close calldata decode back to exactly the params and state encoded."""
    p, signed = ch
    for name, data in (
        ("claim", abi.claim_calldata(p, signed)),
        ("close", abi.close_calldata(p, signed)),
    ):
        got_name, claimed = abi.decode_state_call(data)
        assert got_name == name
        assert claimed.params == p
        assert claimed.params.channel_id == p.channel_id
        assert claimed.state == signed.state


@settings(max_examples=40, deadline=None)
@given(channel(), st.binary(min_size=32, max_size=32), st.integers(0, UINT64))
def test_refute_and_settle_calldata_decode_back(
    ch: tuple[Params, SignedState], h: bytes, deadline: int
) -> None:
    """refute calldata (params, dispute, state, sigs) and settle calldata decode back to the
    new state, not the disputed one."""
    from channel.chain import Dispute

    p, signed = ch
    d = Dispute(state_hash=h, version=1, deadline=deadline)
    name, claimed = abi.decode_state_call(abi.refute_calldata(p, d, signed))
    assert (name, claimed.params, claimed.state) == ("refute", p, signed.state)
    settle = abi.settle_calldata(p, signed.state, deadline)
    assert abi.claimed_state(settle).state == signed.state


def test_sigs_are_a_then_b_130_bytes() -> None:
    """The contract's sigs argument is A's signature followed by B's."""
    p = Params.new(
        chain_id=1,
        adjudicator=b"\x01" * 20,
        participants=(b"\x02" * 20, b"\x03" * 20),
        challenge_duration=10,
    )
    s = State(
        channel_id=p.channel_id,
        version=1,
        allocations=(Allocation(asset=Address(b"\0" * 20), balances=(1, 2)),),
    )
    a, b = b"\xaa" * 65, b"\xbb" * 65
    assert abi.sigs_arg(SignedState(state=s, signatures=(a, b))) == a + b


def test_half_signed_state_is_refused() -> None:
    """Encoding a claim from a state missing a signature is the caller's mistake."""
    p = Params.new(
        chain_id=1,
        adjudicator=b"\x01" * 20,
        participants=(b"\x02" * 20, b"\x03" * 20),
        challenge_duration=10,
    )
    s = State(
        channel_id=p.channel_id,
        version=1,
        allocations=(Allocation(asset=Address(b"\0" * 20), balances=(1, 2)),),
    )
    with pytest.raises(LocalProtocolError):
        abi.claim_calldata(p, SignedState(state=s, signatures=(b"\xaa" * 65, None)))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x02",
        abi.deposit_eth_calldata(b"\x05" * 32),
        abi.selector("claim") + b"\xff" * 40,
    ],
)
def test_foreign_or_garbage_calldata_raises_chain_error(data: bytes) -> None:
    """Calldata that is not a well-formed claim/refute/close/settle is a ChainError."""
    with pytest.raises(ChainError):
        abi.decode_state_call(data)


def test_calldata_with_invalid_state_raises_chain_error() -> None:
    """Well-formed ABI carrying a state channel would reject (no allocations) is a
    ChainError, not a ValueError from the value's validators."""
    p_arg = (1, b"\x01" * 20, b"\x02" * 20, b"\x03" * 20, b"\0" * 32, 10, b"\0" * 20)
    s_arg: tuple[Any, ...] = (b"\0" * 32, 1, [], b"", False)
    data = abi.encode_call("claim", [p_arg, s_arg, b"\0" * 130])
    with pytest.raises(ChainError):
        abi.decode_state_call(data)


def test_view_calldata_and_results() -> None:
    """View calldata is selector + ABI args; results decode from 32-byte words."""
    cid, asset = b"\x07" * 32, b"\x08" * 20
    data = abi.holdings_calldata(cid, asset)
    assert data == abi.selector("holdings") + cid + _word(asset)
    assert abi.decode_uint("holdings", _word((12345).to_bytes(2, "big"))) == 12345
    assert abi.decode_bytes32("disputes", cid) == cid
    with pytest.raises(ChainError):
        abi.decode_uint("holdings", b"\x01")


# ----------------------------------------------------------------- events


def test_deposited_event_decodes_with_meta() -> None:
    """A Deposited log becomes channel.chain.Deposited with its EventMeta, removed included."""
    cid, asset = b"\x09" * 32, b"\x0a" * 20
    log = _log(
        [abi.event_topic("Deposited"), cid, _word(asset)], encode(["uint256"], [77]), removed=True
    )
    ev = abi.decode_event(log)
    assert isinstance(ev, Deposited)
    assert (ev.channel_id, ev.asset, ev.new_total) == (cid, asset, 77)
    assert (ev.meta.block_number, ev.meta.log_index, ev.meta.removed) == (42, 3, True)
    assert ev.meta.tx_hash == b"\x33" * 32 and ev.meta.block_hash == b"\x22" * 32


@pytest.mark.parametrize("name", ["Claimed", "Refuted"])
def test_claimed_and_refuted_events_carry_the_dispute(name: str) -> None:
    """Claimed/Refuted decode to the dispute the contract committed to (hash, version,
    deadline)."""
    cid, h = b"\x0b" * 32, b"\x0c" * 32
    data = encode(["uint64", "uint64", "bytes32"], [5, 1_700_000_000, h])
    ev = abi.decode_event(_log([abi.event_topic(name), cid], data))
    assert isinstance(ev, Claimed if name == "Claimed" else Refuted)
    assert ev.channel_id == cid
    assert (ev.dispute.state_hash, ev.dispute.version, ev.dispute.deadline) == (
        h,
        5,
        1_700_000_000,
    )


def test_concluded_and_payout_events() -> None:
    """Concluded carries version and cooperative; Payout carries the asset and both shares."""
    cid, asset = b"\x0d" * 32, b"\x0e" * 20
    c = abi.decode_event(
        _log([abi.event_topic("Concluded"), cid], encode(["uint64", "bool"], [9, True]))
    )
    assert isinstance(c, Concluded) and (c.version, c.cooperative) == (9, True)
    pay = abi.decode_event(
        _log(
            [abi.event_topic("Payout"), cid, _word(asset)],
            encode(["uint256", "uint256"], [1, 2]),
        )
    )
    assert isinstance(pay, Payout) and (pay.asset, pay.to_a, pay.to_b) == (asset, 1, 2)


def test_foreign_and_uncarried_events_are_none() -> None:
    """A foreign topic, a log without topics and Credited/Withdrawn are not port events."""
    assert abi.decode_event(_log([os.urandom(32)], b"")) is None
    assert abi.decode_event(_log([], b"")) is None
    credited = _log(
        [abi.event_topic("Credited"), _word(b"\x01" * 20), _word(b"\x02" * 20)],
        encode(["uint256"], [3]),
    )
    assert abi.decode_event(credited) is None
    assert abi.decode_log_args(credited) == (
        "Credited",
        {0: "0x" + "01" * 20, 1: "0x" + "02" * 20, 2: 3},
    )


def test_malformed_known_event_raises_chain_error() -> None:
    """A known event with the wrong topic count or short data is a ChainError."""
    with pytest.raises(ChainError):
        abi.decode_event(_log([abi.event_topic("Deposited"), b"\0" * 32], b""))
    with pytest.raises(ChainError):
        abi.decode_event(_log([abi.event_topic("Claimed"), b"\0" * 32], b"\x01"))


# ----------------------------------------------------------------- errors


def test_custom_errors_decode_by_name() -> None:
    """Revert data decodes to the custom error's name and args and reads like Solidity."""
    assert abi.decode_error(abi.error_selector("WindowClosed")) == ("WindowClosed", ())
    assert abi.describe_revert(abi.error_selector("WindowClosed")) == "WindowClosed()"
    data = abi.error_selector("AppFailed") + _word(b"\x05" * 20)
    assert abi.decode_error(data) == ("AppFailed", ("0x" + "05" * 20,))
    assert abi.describe_revert(data) == f"AppFailed(0x{'05' * 20})"


def test_builtin_errors_and_unknown_data() -> None:
    """Error(string) and Panic(uint256) decode; unknown and empty data are described, not
    raised."""
    err = abi.error_selector("Error") + encode(["string"], ["nope"])
    assert abi.describe_revert(err) == "Error('nope')"
    panic = abi.error_selector("Panic") + encode(["uint256"], [0x11])
    assert abi.describe_revert(panic) == "Panic(17)"
    assert abi.decode_error(b"\xde\xad\xbe\xef") is None
    assert abi.describe_revert(b"").startswith("reverted without data")
    assert "0xdeadbeef" in abi.describe_revert(b"\xde\xad\xbe\xef")


@pytest.mark.parametrize(
    "error",
    [
        {"code": 3, "message": "execution reverted", "data": "0x"},
        {"code": -32000, "message": "execution reverted: custom error", "data": "0x"},
        {"code": 3, "message": "x", "data": {"data": "0x"}},
    ],
)
def test_node_revert_errors_map_to_reverted(error: dict[str, Any]) -> None:
    """A node's execution-revert error (code 3, or a revert message; flat or nested data)
    becomes Reverted with the raw data, its message naming the custom error."""
    sel = abi.error_selector("NotNewer").hex()
    e = dict(error)
    if isinstance(e["data"], dict):
        e["data"] = {"data": "0x" + sel}
    else:
        e["data"] = "0x" + sel
    mapped = rpc_error("eth_call", e)
    assert isinstance(mapped, Reverted)
    assert mapped.data == bytes.fromhex(sel)
    assert "NotNewer()" in str(mapped)


def test_other_node_errors_map_to_chain_error() -> None:
    """Any other JSON-RPC error is a ChainError with the node's message."""
    mapped = rpc_error("eth_sendRawTransaction", {"code": -32000, "message": "nonce too low"})
    assert type(mapped) is ChainError
    assert "nonce too low" in str(mapped)


def test_app_data_limit_is_respected_by_round_trip() -> None:
    """A maximal app_data survives encode/decode unchanged."""
    p = Params.new(
        chain_id=1,
        adjudicator=b"\x01" * 20,
        participants=(b"\x02" * 20, b"\x03" * 20),
        challenge_duration=10,
    )
    s = State(
        channel_id=p.channel_id,
        version=2,
        allocations=(Allocation(asset=Address(b"\0" * 20), balances=(1, 2)),),
        app_data=b"\x5a" * MAX_APP_DATA,
    )
    signed = SignedState(state=s, signatures=(b"\x01" * 65, b"\x02" * 65))
    assert abi.claimed_state(abi.claim_calldata(p, signed)).state == s
