"""Wire messages and their canonical CBOR encoding.

A frame holds exactly one message: a CBOR array ``[protocol_version, type,
field, ...]``, encoded canonically (cbor2 ``canonical=True``).  Decoding is
strict: an unknown type, a field of the wrong CBOR type or range, an oversized
frame, or bytes after the array each raise :class:`~channel.errors.DecodeError`
(or its subclass ``OversizeError``).  Nothing here validates signatures or
versions; that is the update machine's job.

Pure: no I/O.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import attrs
import cbor2

from channel.errors import DecodeError, OversizeError
from channel.limits import MAX_FRAME
from channel.state import (
    MAX_APP_DATA,
    MAX_ASSETS,
    UINT256_MAX,
    Address,
    Allocation,
    ChannelId,
    Params,
    SignedState,
    State,
)

PROTOCOL_VERSION = 1
MAX_REASON = 256
MAX_PENDING_IN_SYNC = 256

#: CBOR tags that cbor2 would decode into Python objects (``datetime``, ``Decimal``,
#: ``re.Pattern``, ``UUID``, sets, shared references, ...).  The protocol uses none of
#: them: only tag 2, the unsigned bignum a uint256 above 2**64 is encoded as.  They are
#: refused before cbor2 builds the object, because building some of them costs a peer
#: nothing and us a lot: a 58 KB regular expression (tag 35) kept ``re.compile`` busy
#: for a minute on the Trio thread.  Any other tag decodes to an inert ``CBORTag``,
#: which no field decoder accepts.  ``tests/channel/test_codec.py`` probes cbor2 for its
#: built-in tags, so a cbor2 upgrade that adds one fails there.
REFUSED_TAGS = frozenset(
    {0, 1, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799}
)


def _refuse_tag(*_: object) -> None:
    raise DecodeError("a CBOR tag that is not part of the protocol")


_SEMANTIC_DECODERS = {tag: _refuse_tag for tag in REFUSED_TAGS}


# ---------------------------------------------------------------------------
# field decoders: each takes a CBOR value and returns the typed value or raises


def _int(v: object, bits: int, what: str) -> int:
    if type(v) is not int or not 0 <= v < 2**bits:
        raise DecodeError(f"{what}: expected uint{bits}")
    return v


def _bytes(v: object, n: int | None, what: str, max_len: int = MAX_FRAME) -> bytes:
    if type(v) is not bytes or (n is not None and len(v) != n) or len(v) > max_len:
        raise DecodeError(
            f"{what}: expected {n if n is not None else 'up to ' + str(max_len)} bytes"
        )
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise DecodeError(f"{what}: expected bool")
    return v


def _list(v: object, what: str, n: int | None = None, max_len: int = 1 << 16) -> list[Any]:
    if type(v) is not list or (n is not None and len(v) != n) or len(v) > max_len:
        raise DecodeError(f"{what}: expected array" + (f" of {n}" if n is not None else ""))
    return v


def _str(v: object, what: str, max_len: int) -> str:
    if type(v) is not str or len(v) > max_len:
        raise DecodeError(f"{what}: expected text of at most {max_len}")
    return v


def _sig(v: object, what: str = "signature") -> bytes:
    return _bytes(v, 65, what)


def _opt_sig(v: object, what: str) -> bytes | None:
    return None if v is None else _sig(v, what)


def params_to_wire(p: Params) -> list[Any]:
    return [
        p.chain_id,
        p.adjudicator,
        p.participants[0],
        p.participants[1],
        p.salt,
        p.challenge_duration,
        p.app,
    ]


def params_from_wire(v: object) -> Params:
    f = _list(v, "params", 7)
    try:
        return Params(
            chain_id=_int(f[0], 256, "chain_id"),
            adjudicator=Address(_bytes(f[1], 20, "adjudicator")),
            participants=(
                Address(_bytes(f[2], 20, "participant")),
                Address(_bytes(f[3], 20, "participant")),
            ),
            salt=_bytes(f[4], 32, "salt"),
            challenge_duration=_int(f[5], 64, "challenge_duration"),
            app=Address(_bytes(f[6], 20, "app")),
        )
    except ValueError as exc:
        raise DecodeError(f"params: {exc}") from None


def state_to_wire(s: State) -> list[Any]:
    return [
        s.channel_id,
        s.version,
        [[a.asset, a.balances[0], a.balances[1], a.locked] for a in s.allocations],
        s.app_data,
        s.is_final,
    ]


def state_from_wire(v: object) -> State:
    """Every field is checked here, exactly as ``State``'s validators would (the
    hypothesis tests hold the two to the same answers), so the value is built with
    ``State.unchecked``: decoding is on every update's path."""
    f = _list(v, "state", 5)
    wire_allocs = _list(f[2], "allocations", max_len=MAX_ASSETS)
    if not wire_allocs:
        raise DecodeError("state: a state holds at least one asset")
    allocs = []
    for a in wire_allocs:
        af = _list(a, "allocation", 4)
        allocs.append(
            Allocation.unchecked(
                Address(_bytes(af[0], 20, "asset")),
                (_int(af[1], 256, "balance"), _int(af[2], 256, "balance")),
                _int(af[3], 256, "locked"),
            )
        )
    if len({a.asset for a in allocs}) != len(allocs):
        raise DecodeError("state: an asset appears twice in allocations")
    if any(a.total > UINT256_MAX for a in allocs):
        raise DecodeError("state: an asset's total exceeds uint256")
    return State.unchecked(
        ChannelId(_bytes(f[0], 32, "channel_id")),
        _int(f[1], 64, "version"),
        tuple(allocs),
        _bytes(f[3], None, "app_data", MAX_APP_DATA),
        _bool(f[4], "is_final"),
    )


def signed_to_wire(s: SignedState) -> list[Any]:
    return [state_to_wire(s.state), s.signatures[0], s.signatures[1]]


def signed_from_wire(v: object) -> SignedState:
    f = _list(v, "signed state", 3)
    return SignedState(
        state=state_from_wire(f[0]),
        signatures=(_opt_sig(f[1], "signature 0"), _opt_sig(f[2], "signature 1")),
    )


# ---------------------------------------------------------------------------
# messages


@attrs.frozen(kw_only=True)
class Propose:
    """A proposer's signed next state, built on its ``base_version`` co-signed state."""

    TYPE: ClassVar[int] = 1
    base_version: int
    state: State
    signature: bytes

    def fields(self) -> list[Any]:
        return [self.base_version, state_to_wire(self.state), self.signature]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Propose:
        _check_arity(f, 3, "Propose")
        return cls(
            base_version=_int(f[0], 64, "base_version"),
            state=state_from_wire(f[1]),
            signature=_sig(f[2]),
        )


@attrs.frozen(kw_only=True)
class Accept:
    """The responder's countersignature on the proposal with that version."""

    TYPE: ClassVar[int] = 2
    channel_id: ChannelId
    version: int
    signature: bytes

    def fields(self) -> list[Any]:
        return [self.channel_id, self.version, self.signature]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Accept:
        _check_arity(f, 3, "Accept")
        return cls(
            channel_id=ChannelId(_bytes(f[0], 32, "channel_id")),
            version=_int(f[1], 64, "version"),
            signature=_sig(f[2]),
        )


@attrs.frozen(kw_only=True)
class Reject:
    """The responder refuses the proposal whose state hashes to ``state_hash``."""

    TYPE: ClassVar[int] = 3
    channel_id: ChannelId
    version: int
    state_hash: bytes
    reason: str

    def fields(self) -> list[Any]:
        return [self.channel_id, self.version, self.state_hash, self.reason]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Reject:
        _check_arity(f, 4, "Reject")
        return cls(
            channel_id=ChannelId(_bytes(f[0], 32, "channel_id")),
            version=_int(f[1], 64, "version"),
            state_hash=_bytes(f[2], 32, "state_hash"),
            reason=_str(f[3], "reason", MAX_REASON),
        )


@attrs.frozen(kw_only=True)
class Open:
    """Open a channel: the params and the proposer-signed version-0 state."""

    TYPE: ClassVar[int] = 4
    params: Params
    state: State
    signature: bytes

    def fields(self) -> list[Any]:
        return [params_to_wire(self.params), state_to_wire(self.state), self.signature]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Open:
        _check_arity(f, 3, "Open")
        return cls(
            params=params_from_wire(f[0]),
            state=state_from_wire(f[1]),
            signature=_sig(f[2]),
        )


@attrs.frozen(kw_only=True)
class Sync:
    """Sent on (re)connect per shared channel: our latest co-signed state, the
    highest version we ever signed, and our still half-signed proposals."""

    TYPE: ClassVar[int] = 5
    latest: SignedState
    max_signed: int
    pending: tuple[Propose, ...]

    def fields(self) -> list[Any]:
        return [
            signed_to_wire(self.latest),
            self.max_signed,
            [p.fields() for p in self.pending],
        ]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Sync:
        _check_arity(f, 3, "Sync")
        return cls(
            latest=signed_from_wire(f[0]),
            max_signed=_int(f[1], 64, "max_signed"),
            pending=tuple(
                Propose.from_fields(_list(p, "pending proposal", 3))
                for p in _list(f[2], "pending", max_len=MAX_PENDING_IN_SYNC)
            ),
        )


@attrs.frozen(kw_only=True)
class Error:
    """A connection-level complaint (e.g. a message we could not decode)."""

    TYPE: ClassVar[int] = 6
    reason: str

    def fields(self) -> list[Any]:
        return [self.reason]

    @classmethod
    def from_fields(cls, f: list[Any]) -> Error:
        _check_arity(f, 1, "Error")
        return cls(reason=_str(f[0], "reason", MAX_REASON))


Message: TypeAlias = Propose | Accept | Reject | Open | Sync | Error

_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    cls.TYPE: cls.from_fields for cls in (Propose, Accept, Reject, Open, Sync, Error)
}


def _check_arity(f: list[Any], n: int, what: str) -> None:
    if len(f) != n:
        raise DecodeError(f"{what}: expected {n} fields, got {len(f)}")


def encode(msg: Message) -> bytes:
    """Canonical CBOR bytes of ``msg``; raises ``OversizeError`` past ``MAX_FRAME``."""
    data: bytes = cbor2.dumps([PROTOCOL_VERSION, msg.TYPE, *msg.fields()], canonical=True)
    if len(data) > MAX_FRAME:
        raise OversizeError(
            f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )
    return data


def decode(frame: bytes) -> Message:
    """The message in ``frame``; raises ``DecodeError`` for anything malformed."""
    if len(frame) > MAX_FRAME:
        raise OversizeError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        value = cbor2.loads(frame, semantic_decoders=_SEMANTIC_DECODERS)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise DecodeError(f"malformed CBOR: {exc}") from None
    try:
        canonical = cbor2.dumps(value, canonical=True)
    except Exception as exc:  # e.g. a cyclic value built from shared-reference tags
        raise DecodeError(f"malformed CBOR: {exc}") from None
    if canonical != frame:
        # Slow path, only for bad input: tell trailing bytes from a non-canonical encoding.
        buf = io.BytesIO(frame)
        cbor2.CBORDecoder(buf, semantic_decoders=_SEMANTIC_DECODERS).decode()
        if buf.tell() != len(frame):
            raise DecodeError(f"{len(frame) - buf.tell()} trailing bytes after the message")
        raise DecodeError("message is not in canonical CBOR form")
    if type(value) is not list or len(value) < 2:
        raise DecodeError("a message is an array [protocol_version, type, ...]")
    version, mtype = value[0], value[1]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise DecodeError(f"unsupported protocol version {_brief(version)}")
    decoder = _DECODERS.get(mtype) if type(mtype) is int else None
    if decoder is None:
        raise DecodeError(f"unknown message type {_brief(mtype)}")
    try:
        return decoder(value[2:])
    except DecodeError:
        raise
    except (ValueError, TypeError, IndexError) as exc:
        raise DecodeError(f"invalid {decoder.__qualname__.split('.')[0]}: {exc}") from None


def _brief(value: object) -> str:
    """A peer's value, for an error message: short, and never an error itself (``repr``
    of an integer of over 4,300 digits raises ``ValueError``)."""
    if type(value) is int and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a peer's value must not turn a DecodeError into a crash
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."
