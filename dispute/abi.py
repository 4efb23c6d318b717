"""The Adjudicator's ABI as pure functions: calldata out, events and errors in.  No I/O.

Selectors, event topics and error selectors are computed from the committed artifact's
ABI (``dispute/artifacts/Adjudicator.json``), never hard-coded, so a recompiled contract
cannot drift from its codec unnoticed.  Values cross in ``channel``'s own types
(``Params``, ``State``, ``SignedState``, ``Dispute``) and come back as the chain port's
event values (``channel.chain.Deposited`` ...).

The contract takes both signatures as one 130-byte ``bytes``: A's then B's.

Decoding chain data that does not fit the ABI raises ``ChainError``; a caller passing a
state that is not fully signed raises ``LocalProtocolError``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode

from channel.chain import (
    ChainEvent,
    Claimed,
    ClaimedState,
    Concluded,
    Deposited,
    Dispute,
    EventMeta,
    Payout,
    Refuted,
)
from channel.errors import ChainError, LocalProtocolError
from channel.hashing import keccak
from channel.state import Address, Allocation, ChannelId, Params, SignedState, State
from dispute.compile import load_artifact
from dispute.eth import Log

SIGNATURE_LEN = 65
PARAMS_TYPE = "(uint256,address,address,address,bytes32,uint64,address)"
STATE_TYPE = "(bytes32,uint64,(address,uint256,uint256,uint256)[],bytes,bool)"
DISPUTE_TYPE = "(bytes32,uint64,uint64)"

# Solidity's built-in revert payloads, not in any ABI.
_BUILTIN_ERRORS = {"Error": ("string",), "Panic": ("uint256",)}


@attrs.frozen(kw_only=True)
class AbiItem:
    """One function, event or error of the ABI, with canonical types and its selector."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    indexed: tuple[bool, ...]
    outputs: tuple[str, ...]
    selector: bytes  # 4 bytes for functions and errors, 32 for events (topic 0)

    @property
    def signature(self) -> str:
        return f"{self.name}({','.join(self.inputs)})"


def canonical_type(param: Mapping[str, Any]) -> str:
    """The canonical ABI type of one input/output (tuples spelled out, for selectors)."""
    typ = str(param["type"])
    if typ.startswith("tuple"):
        inner = ",".join(canonical_type(c) for c in param["components"])
        return f"({inner}){typ[len('tuple') :]}"
    return typ


def _item(entry: Mapping[str, Any]) -> AbiItem:
    inputs = tuple(canonical_type(p) for p in entry.get("inputs", ()))
    sig = f"{entry['name']}({','.join(inputs)})"
    digest = keccak(sig.encode())
    return AbiItem(
        kind=str(entry["type"]),
        name=str(entry["name"]),
        inputs=inputs,
        indexed=tuple(bool(p.get("indexed", False)) for p in entry.get("inputs", ())),
        outputs=tuple(canonical_type(p) for p in entry.get("outputs", ())),
        selector=digest if entry["type"] == "event" else digest[:4],
    )


@functools.cache
def abi_items() -> dict[tuple[str, str], AbiItem]:
    """Every named ABI item, keyed by (kind, name): ``("function", "claim")``."""
    out: dict[tuple[str, str], AbiItem] = {}
    for entry in load_artifact()["abi"]:
        if "name" in entry:
            item = _item(entry)
            out[(item.kind, item.name)] = item
    for name, types in _BUILTIN_ERRORS.items():
        sig = f"{name}({','.join(types)})"
        out[("error", name)] = AbiItem(
            kind="error",
            name=name,
            inputs=types,
            indexed=(False,) * len(types),
            outputs=(),
            selector=keccak(sig.encode())[:4],
        )
    return out


def function(name: str) -> AbiItem:
    try:
        return abi_items()[("function", name)]
    except KeyError:
        raise KeyError(f"the Adjudicator has no function {name!r}") from None


def selector(name: str) -> bytes:
    """The 4-byte selector of Adjudicator function ``name``."""
    return function(name).selector


def event_topic(name: str) -> bytes:
    """Topic 0 of Adjudicator event ``name``."""
    return abi_items()[("event", name)].selector


def error_selector(name: str) -> bytes:
    """The 4-byte selector of custom error ``name`` (or ``Error`` / ``Panic``)."""
    return abi_items()[("error", name)].selector


# ----------------------------------------------------------------- argument shapes


def params_arg(p: Params) -> tuple[Any, ...]:
    return (
        p.chain_id,
        p.adjudicator,
        p.participants[0],
        p.participants[1],
        p.salt,
        p.challenge_duration,
        p.app,
    )


def state_arg(s: State) -> tuple[Any, ...]:
    return (
        s.channel_id,
        s.version,
        [(a.asset, a.balances[0], a.balances[1], a.locked) for a in s.allocations],
        s.app_data,
        s.is_final,
    )


def dispute_arg(d: Dispute) -> tuple[bytes, int, int]:
    return (d.state_hash, d.version, d.deadline)


def sigs_arg(signed: SignedState) -> bytes:
    """Both signatures, A's then B's; raises ``LocalProtocolError`` if one is missing."""
    a, b = signed.signatures
    if a is None or b is None:
        raise LocalProtocolError(
            f"state version {signed.state.version} of channel 0x{signed.state.channel_id.hex()}"
            " is not signed by both participants"
        )
    if len(a) != SIGNATURE_LEN or len(b) != SIGNATURE_LEN:
        raise LocalProtocolError("a signature is not 65 bytes")
    return a + b


def _addr(value: Any) -> Address:
    if isinstance(value, str):
        return Address(bytes.fromhex(value.removeprefix("0x")))
    return Address(bytes(value))


def params_from_arg(t: Sequence[Any]) -> Params:
    return Params(
        chain_id=int(t[0]),
        adjudicator=_addr(t[1]),
        participants=(_addr(t[2]), _addr(t[3])),
        salt=bytes(t[4]),
        challenge_duration=int(t[5]),
        app=_addr(t[6]),
    )


def state_from_arg(t: Sequence[Any]) -> State:
    return State(
        channel_id=ChannelId(bytes(t[0])),
        version=int(t[1]),
        allocations=tuple(
            Allocation(asset=_addr(a[0]), balances=(int(a[1]), int(a[2])), locked=int(a[3]))
            for a in t[2]
        ),
        app_data=bytes(t[3]),
        is_final=bool(t[4]),
    )


# ----------------------------------------------------------------- calldata


def encode_call(name: str, args: Sequence[Any]) -> bytes:
    """Calldata for Adjudicator function ``name`` with already-shaped ``args``."""
    fn = function(name)
    return fn.selector + abi_encode(list(fn.inputs), list(args))


def decode_result(name: str, data: bytes) -> tuple[Any, ...]:
    """Decode the return data of ``name``; raises ``ChainError`` if it does not fit."""
    fn = function(name)
    try:
        return tuple(abi_decode(list(fn.outputs), data))
    except Exception as exc:
        raise ChainError(f"{name}: undecodable return data 0x{data[:64].hex()}: {exc}") from exc


def deposit_eth_calldata(channel_id: bytes) -> bytes:
    """``depositEthToChannel(channelId)``; send the amount as the transaction's value."""
    return encode_call("depositEthToChannel", [channel_id])


def deposit_calldata(channel_id: bytes, asset: bytes, amount: int) -> bytes:
    """``deposit(channelId, asset, amount)`` for an ERC-20 (approve the adjudicator first)."""
    return encode_call("deposit", [channel_id, asset, amount])


def close_calldata(params: Params, signed: SignedState) -> bytes:
    return encode_call("close", [params_arg(params), state_arg(signed.state), sigs_arg(signed)])


def claim_calldata(params: Params, signed: SignedState) -> bytes:
    return encode_call("claim", [params_arg(params), state_arg(signed.state), sigs_arg(signed)])


def refute_calldata(params: Params, dispute: Dispute, signed: SignedState) -> bytes:
    return encode_call(
        "refute",
        [params_arg(params), dispute_arg(dispute), state_arg(signed.state), sigs_arg(signed)],
    )


def settle_calldata(params: Params, state: State, deadline: int) -> bytes:
    return encode_call("settle", [params_arg(params), state_arg(state), deadline])


def withdraw_calldata(asset: bytes, to: bytes) -> bytes:
    return encode_call("withdraw", [asset, to])


def holdings_calldata(channel_id: bytes, asset: bytes) -> bytes:
    return encode_call("holdings", [channel_id, asset])


def credits_calldata(account: bytes, asset: bytes) -> bytes:
    return encode_call("credits", [account, asset])


def disputes_calldata(channel_id: bytes) -> bytes:
    return encode_call("disputes", [channel_id])


def dispute_status_calldata(channel_id: bytes, dispute: Dispute) -> bytes:
    return encode_call("disputeStatus", [channel_id, dispute_arg(dispute)])


def channel_id_of_calldata(params: Params) -> bytes:
    return encode_call("channelIdOf", [params_arg(params)])


def state_hash_of_calldata(state: State) -> bytes:
    return encode_call("stateHashOf", [state_arg(state)])


def decode_uint(name: str, data: bytes) -> int:
    """Return data of a function returning one ``uint*`` (``holdings``, ``disputeStatus``)."""
    return int(decode_result(name, data)[0])


def decode_bytes32(name: str, data: bytes) -> bytes:
    """Return data of a function returning one ``bytes32`` (``disputes``, ``channelIdOf``)."""
    return bytes(decode_result(name, data)[0])


# ----------------------------------------------------------------- calldata back


_STATE_CALLS = ("claim", "refute", "close", "settle")


def decode_state_call(calldata: bytes) -> tuple[str, ClaimedState]:
    """The function name and the (params, state) of a claim/refute/close/settle calldata.

    Raises ``ChainError`` if the calldata is none of those or does not decode.
    """
    if len(calldata) < 4:
        raise ChainError("calldata shorter than a selector")
    for name in _STATE_CALLS:
        fn = function(name)
        if calldata[:4] != fn.selector:
            continue
        try:
            args = abi_decode(list(fn.inputs), calldata[4:])
            state_index = 2 if name == "refute" else 1
            claimed = ClaimedState(
                params=params_from_arg(args[0]), state=state_from_arg(args[state_index])
            )
        except Exception as exc:
            raise ChainError(f"undecodable {name} calldata: {exc}") from exc
        return name, claimed
    raise ChainError(f"calldata selector 0x{calldata[:4].hex()} is not claim/refute/close/settle")


def claimed_state(calldata: bytes) -> ClaimedState:
    """The (params, state) a claim/refute/close/settle transaction put on chain."""
    return decode_state_call(calldata)[1]


# ----------------------------------------------------------------- events


@functools.cache
def _events_by_topic() -> dict[bytes, AbiItem]:
    return {item.selector: item for (kind, _), item in abi_items().items() if kind == "event"}


def decode_log_args(log: Log) -> tuple[str, dict[int, Any]] | None:
    """(event name, {input index: value}) for an Adjudicator log; None if topic 0 is unknown.

    Raises ``ChainError`` if a known event's topics or data do not fit its ABI.
    """
    if not log.topics:
        return None
    item = _events_by_topic().get(log.topics[0])
    if item is None:
        return None
    indexed = [i for i, flag in enumerate(item.indexed) if flag]
    plain = [i for i, flag in enumerate(item.indexed) if not flag]
    if len(log.topics) != 1 + len(indexed):
        raise ChainError(f"{item.name} log with {len(log.topics)} topics")
    values: dict[int, Any] = {}
    try:
        for i, topic in zip(indexed, log.topics[1:], strict=True):
            values[i] = abi_decode([item.inputs[i]], topic)[0]
        decoded = abi_decode([item.inputs[i] for i in plain], log.data)
    except Exception as exc:
        raise ChainError(f"undecodable {item.name} log: {exc}") from exc
    values.update(zip(plain, decoded, strict=True))
    return item.name, values


def event_meta(log: Log) -> EventMeta:
    return EventMeta(
        block_number=log.block_number,
        block_hash=log.block_hash,
        tx_hash=log.tx_hash,
        log_index=log.log_index,
        removed=log.removed,
    )


def decode_event(log: Log) -> ChainEvent | None:
    """The chain-port event of an Adjudicator log; None for events the port does not carry
    (``Credited``, ``Withdrawn``) and for foreign logs.  Raises ``ChainError`` if malformed.
    """
    found = decode_log_args(log)
    if found is None:
        return None
    name, v = found
    meta = event_meta(log)
    if name == "Deposited":
        return Deposited(meta=meta, channel_id=bytes(v[0]), asset=_addr(v[1]), new_total=int(v[2]))
    if name in ("Claimed", "Refuted"):
        dispute = Dispute(state_hash=bytes(v[3]), version=int(v[1]), deadline=int(v[2]))
        cls = Claimed if name == "Claimed" else Refuted
        return cls(meta=meta, channel_id=bytes(v[0]), dispute=dispute)
    if name == "Concluded":
        return Concluded(
            meta=meta, channel_id=bytes(v[0]), version=int(v[1]), cooperative=bool(v[2])
        )
    if name == "Payout":
        return Payout(
            meta=meta,
            channel_id=bytes(v[0]),
            asset=_addr(v[1]),
            to_a=int(v[2]),
            to_b=int(v[3]),
        )
    return None


# ----------------------------------------------------------------- errors


@functools.cache
def _errors_by_selector() -> dict[bytes, AbiItem]:
    return {item.selector: item for (kind, _), item in abi_items().items() if kind == "error"}


def decode_error(data: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """(error name, args) of revert data from the Adjudicator (or ``Error``/``Panic``);
    None if the data is empty, foreign or does not decode.
    """
    if len(data) < 4:
        return None
    item = _errors_by_selector().get(data[:4])
    if item is None:
        return None
    try:
        args = tuple(abi_decode(list(item.inputs), data[4:]))
    except Exception:
        return None
    return item.name, args


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and not value.startswith("0x"):
        return repr(value)
    return str(value)


def describe_revert(data: bytes) -> str:
    """Human-readable revert data: ``WindowClosed()``, ``AppFailed(0x…)``, ``Panic(17)``."""
    if not data:
        return "reverted without data"
    found = decode_error(data)
    if found is None:
        return f"reverted with unknown data 0x{data.hex()}"
    name, args = found
    return f"{name}({', '.join(_fmt(a) for a in args)})"
