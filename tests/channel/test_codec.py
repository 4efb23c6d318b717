"""The wire codec: canonical CBOR round trips and strict, typed refusal of bad frames."""

from __future__ import annotations

from typing import Any

import attrs
import cbor2
import pytest
from amounts import amounts
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from channel import codec
from channel.codec import (
    MAX_PENDING_IN_SYNC,
    MAX_REASON,
    PROTOCOL_VERSION,
    Accept,
    Error,
    Open,
    Propose,
    Reject,
    Sync,
    decode,
    encode,
)
from channel.errors import DecodeError, OversizeError
from channel.limits import MAX_FRAME
from channel.state import (
    MAX_ASSETS,
    UINT64_MAX,
    UINT256_MAX,
    Address,
    Allocation,
    ChannelId,
    Params,
    SignedState,
    State,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses = st.binary(min_size=20, max_size=20).map(Address)
channel_ids = st.binary(min_size=32, max_size=32).map(ChannelId)
sigs = st.binary(min_size=65, max_size=65)
u64 = st.integers(min_value=0, max_value=UINT64_MAX)
u256 = st.integers(min_value=0, max_value=UINT256_MAX)
reasons = st.text(max_size=MAX_REASON)


@st.composite
def states(draw: st.DrawFn, channel_id: bytes | None = None) -> State:
    assets = draw(st.lists(addresses, min_size=1, max_size=MAX_ASSETS, unique=True))
    return State(
        channel_id=ChannelId(channel_id) if channel_id is not None else draw(channel_ids),
        version=draw(u64),
        allocations=tuple(
            Allocation(asset=a, balances=(b0, b1), locked=locked)
            for a, (b0, b1, locked) in ((a, draw(amounts())) for a in assets)
        ),
        app_data=draw(st.binary(max_size=300)),
        is_final=draw(st.booleans()),
    )


@st.composite
def params(draw: st.DrawFn) -> Params:
    a, b = draw(st.lists(addresses, min_size=2, max_size=2, unique=True))
    return Params(
        chain_id=draw(u256),
        adjudicator=draw(addresses),
        participants=(a, b),
        salt=draw(st.binary(min_size=32, max_size=32)),
        challenge_duration=draw(u64),
        app=draw(addresses),
    )


proposes = st.builds(Propose, base_version=u64, state=states(), signature=sigs)
accepts = st.builds(Accept, channel_id=channel_ids, version=u64, signature=sigs)
rejects = st.builds(
    Reject,
    channel_id=channel_ids,
    version=u64,
    state_hash=st.binary(min_size=32, max_size=32),
    reason=reasons,
)
opens = st.builds(Open, params=params(), state=states(), signature=sigs)
signed_states = st.builds(
    SignedState, state=states(), signatures=st.tuples(st.none() | sigs, st.none() | sigs)
)
syncs = st.builds(
    Sync,
    latest=signed_states,
    max_signed=u64,
    pending=st.lists(proposes, max_size=4).map(tuple),
)
errors = st.builds(Error, reason=reasons)
messages = st.one_of(proposes, accepts, rejects, opens, syncs, errors)


def frame(*fields: Any) -> bytes:
    return cbor2.dumps(list(fields), canonical=True)


def sample_state() -> State:
    return State(
        channel_id=ChannelId(b"\x01" * 32),
        version=7,
        allocations=(Allocation(asset=Address(b"\x00" * 20), balances=(5, 6), locked=1),),
        app_data=b"app",
        is_final=False,
    )


def sample_frames() -> list[bytes]:
    st_ = sample_state()
    p = Params(
        chain_id=1,
        adjudicator=Address(b"\xaa" * 20),
        participants=(Address(b"\x01" * 20), Address(b"\x02" * 20)),
        salt=b"\x03" * 32,
        challenge_duration=60,
    )
    prop = Propose(base_version=6, state=st_, signature=b"\x11" * 65)
    return [
        encode(prop),
        encode(Accept(channel_id=st_.channel_id, version=7, signature=b"\x22" * 65)),
        encode(Reject(channel_id=st_.channel_id, version=7, state_hash=b"\x33" * 32, reason="no")),
        encode(Open(params=p, state=st_, signature=b"\x44" * 65)),
        encode(
            Sync(
                latest=SignedState(state=st_, signatures=(b"\x55" * 65, None)),
                max_signed=8,
                pending=(prop,),
            )
        ),
        encode(Error(reason="bad frame")),
    ]


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [proposes, accepts, rejects, opens, syncs, errors],
    ids=["Propose", "Accept", "Reject", "Open", "Sync", "Error"],
)
def test_round_trip_every_type(strategy: st.SearchStrategy[codec.Message]) -> None:
    """decode(encode(m)) == m for every message type, and the encoding is canonical."""

    @SETTINGS
    @given(strategy)
    def check(msg: codec.Message) -> None:
        data = encode(msg)
        assert decode(data) == msg
        assert cbor2.dumps(cbor2.loads(data), canonical=True) == data
        assert encode(decode(data)) == data

    check()


@SETTINGS
@given(messages)
def test_round_trip_any_message(msg: codec.Message) -> None:
    """Any message decodes to itself, with the protocol version and its type tag in front."""
    data = encode(msg)
    value = cbor2.loads(data)
    assert value[0] == PROTOCOL_VERSION and value[1] == msg.TYPE
    assert decode(data) == msg


def test_message_type_tags_are_distinct() -> None:
    """Every message class has its own wire type number."""
    types = [Propose.TYPE, Accept.TYPE, Reject.TYPE, Open.TYPE, Sync.TYPE, Error.TYPE]
    assert len(set(types)) == len(types)


# --- malformed bytes ---------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", b"\x1c", b"\x5f\x01", b"\x9f\x01", b"\x82\x01", b"\x7f\xff\xff", b"\xfc"],
    ids=[
        "empty",
        "break",
        "reserved-ai",
        "bad-indef-bytes",
        "unterminated",
        "short-array",
        "bad-utf8",
        "reserved-simple",
    ],
)
def test_malformed_cbor_rejected(data: bytes) -> None:
    """Bytes that are not one well-formed CBOR item raise DecodeError."""
    with pytest.raises(DecodeError):
        decode(data)


def test_every_prefix_of_a_valid_frame_rejected() -> None:
    """Every proper prefix of a valid frame (a truncated frame) raises DecodeError."""
    for data in sample_frames():
        for n in range(len(data)):
            with pytest.raises(DecodeError):
                decode(data[:n])


@pytest.mark.parametrize("tail", [b"\x00", b"\x80", b"\xff", b"\x00" * 10])
def test_trailing_bytes_rejected(tail: bytes) -> None:
    """A valid message followed by any extra bytes raises DecodeError."""
    for data in sample_frames():
        with pytest.raises(DecodeError):
            decode(data + tail)


def test_valid_message_twice_rejected() -> None:
    """Two messages in one frame are refused: a frame holds exactly one."""
    data = sample_frames()[1]
    with pytest.raises(DecodeError):
        decode(data + data)


@pytest.mark.parametrize("mtype", [0, 7, 99, 2**64 - 1, -1, "1", b"\x01", True, None, 1.0])
def test_unknown_message_type_rejected(mtype: object) -> None:
    """A type tag that names no message (or is not an int) raises DecodeError."""
    with pytest.raises(DecodeError):
        decode(frame(PROTOCOL_VERSION, mtype, "reason"))


@pytest.mark.parametrize("version", [0, 2, 255, -1, True, 1.0, "1", None])
def test_wrong_protocol_version_rejected(version: object) -> None:
    """A frame whose protocol version is not exactly the integer 1 raises DecodeError."""
    with pytest.raises(DecodeError):
        decode(frame(version, Error.TYPE, "reason"))


@pytest.mark.parametrize(
    "value",
    [[], [1], 1, "x", b"x", {1: 2}, None],
    ids=["empty-array", "one-element", "int", "text", "bytes", "map", "null"],
)
def test_non_message_top_level_rejected(value: object) -> None:
    """A top-level item that is not an array of at least [version, type] raises DecodeError."""
    with pytest.raises(DecodeError):
        decode(cbor2.dumps(value, canonical=True))


CID = b"\x01" * 32
SIG = b"\x02" * 65
STATE_W = [CID, 1, [[b"\x00" * 20, 5, 5, 0]], b"", False]


@pytest.mark.parametrize(
    "fields",
    [
        # Accept: [channel_id, version, signature]
        [Accept.TYPE, "01" * 32, 1, SIG],  # str where bytes
        [Accept.TYPE, CID[:31], 1, SIG],  # 31-byte channel id
        [Accept.TYPE, CID + b"\x00", 1, SIG],  # 33-byte channel id
        [Accept.TYPE, CID, True, SIG],  # bool where int
        [Accept.TYPE, CID, -1, SIG],  # negative int
        [Accept.TYPE, CID, 2**64, SIG],  # version past uint64
        [Accept.TYPE, CID, 1.0, SIG],  # float where int
        [Accept.TYPE, CID, 1, SIG[:64]],  # 64-byte signature
        [Accept.TYPE, CID, 1, SIG + b"\x00"],  # 66-byte signature
        [Accept.TYPE, CID, 1, None],  # null signature
        [Accept.TYPE, CID, 1],  # too few fields
        [Accept.TYPE, CID, 1, SIG, 0],  # too many fields
        # Reject: [channel_id, version, state_hash, reason]
        [Reject.TYPE, CID, 1, b"\x00" * 31, "no"],
        [Reject.TYPE, CID, 1, b"\x00" * 32, b"no"],  # bytes where text
        [Reject.TYPE, CID, 1, b"\x00" * 32, "x" * (MAX_REASON + 1)],
        # Error: [reason]
        [Error.TYPE, 7],
        [Error.TYPE, "x" * (MAX_REASON + 1)],
        # Propose: [base_version, state, signature]
        [Propose.TYPE, 0, STATE_W, SIG[:64]],
        [Propose.TYPE, -3, STATE_W, SIG],
        [Propose.TYPE, 0, STATE_W[:4], SIG],  # state of 4 fields
        [Propose.TYPE, 0, [CID[:31], *STATE_W[1:]], SIG],
        [Propose.TYPE, 0, [CID, -1, *STATE_W[2:]], SIG],
        [Propose.TYPE, 0, [CID, 1, [], b"", False], SIG],  # no assets
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5, 0]] * 2, b"", False], SIG],  # dup
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 19, 5, 5, 0]], b"", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, -5, 5, 0]], b"", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 2**256, 5, 0]], b"", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5]], b"", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5, True]], b"", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5, 0]], "", False], SIG],
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5, 0]], b"", 0], SIG],  # int for bool
        [Propose.TYPE, 0, [CID, 1, [[b"\x00" * 20, 5, 5, 0]], b"\x00" * 20000, False], SIG],
        [
            Propose.TYPE,
            0,
            [CID, 1, [[bytes([i]) * 20, 1, 1, 0] for i in range(MAX_ASSETS + 1)], b"", False],
            SIG,
        ],
        # Open: [params, state, signature]
        [
            Open.TYPE,
            [1, b"\xaa" * 20, b"\x01" * 20, b"\x01" * 20, b"\x03" * 32, 60, b"\x00" * 20],
            STATE_W,
            SIG,
        ],  # participants not distinct
        [
            Open.TYPE,
            [1, b"\xaa" * 20, b"\x01" * 20, b"\x02" * 20, b"\x03" * 31, 60, b"\x00" * 20],
            STATE_W,
            SIG,
        ],  # 31-byte salt
        [
            Open.TYPE,
            [1, b"\xaa" * 20, b"\x01" * 20, b"\x02" * 20, b"\x03" * 32, 2**64, b"\x00" * 20],
            STATE_W,
            SIG,
        ],  # challenge duration past uint64
        [Open.TYPE, [1, b"\xaa" * 20, b"\x01" * 20, b"\x02" * 20, b"\x03" * 32, 60], STATE_W, SIG],
        # Sync: [signed_state, max_signed, pending]
        [Sync.TYPE, [STATE_W, SIG], 1, []],  # signed state of 2 fields
        [Sync.TYPE, [STATE_W, SIG, SIG[:64]], 1, []],
        [Sync.TYPE, [STATE_W, SIG, b""], 1, []],
        [Sync.TYPE, [STATE_W, SIG, None], -1, []],
        [Sync.TYPE, [STATE_W, SIG, None], 1, [[0, STATE_W]]],  # pending of 2 fields
        [Sync.TYPE, [STATE_W, SIG, None], 1, [[0, STATE_W, SIG, SIG]]],
        [Sync.TYPE, [STATE_W, SIG, None], 1, [[0, STATE_W, SIG]] * (MAX_PENDING_IN_SYNC + 1)],
        [Sync.TYPE, [STATE_W, SIG, None], 1, {}],
    ],
)
def test_wrong_field_types_rejected(fields: list[Any]) -> None:
    """A field of the wrong CBOR type, length, range or count raises DecodeError."""
    data = frame(PROTOCOL_VERSION, *fields)
    assert len(data) <= MAX_FRAME
    with pytest.raises(DecodeError):
        decode(data)


def test_field_fixtures_are_otherwise_valid() -> None:
    """The hand-built fields above decode when nothing is wrong with them (a control)."""
    assert isinstance(decode(frame(PROTOCOL_VERSION, Accept.TYPE, CID, 1, SIG)), Accept)
    assert isinstance(decode(frame(PROTOCOL_VERSION, Propose.TYPE, 0, STATE_W, SIG)), Propose)
    assert isinstance(
        decode(frame(PROTOCOL_VERSION, Sync.TYPE, [STATE_W, SIG, None], 1, [[0, STATE_W, SIG]])),
        Sync,
    )


@pytest.mark.parametrize(
    "data",
    [
        # [1, 6, "x"] with the 1 spelled in two bytes
        b"\x83\x18\x01\x06\x61x",
        # the array length spelled in two bytes
        b"\x98\x03\x01\x06\x61x",
        # an indefinite-length array
        b"\x9f\x01\x06\x61x\xff",
        # the reason as an indefinite-length (chunked) text string
        b"\x83\x01\x06\x7f\x61x\xff",
        # the type as a 4-byte int
        b"\x83\x01\x1a\x00\x00\x00\x06\x61x",
    ],
)
def test_non_canonical_cbor_rejected(data: bytes) -> None:
    """A frame that decodes to a valid message but is not canonical CBOR raises DecodeError."""
    assert cbor2.loads(data) == [1, 6, "x"]
    with pytest.raises(DecodeError):
        decode(data)


def test_canonical_control() -> None:
    """The canonical spelling of the frames above decodes (a control)."""
    assert decode(b"\x83\x01\x06\x61x") == Error(reason="x")


# --- size --------------------------------------------------------------------


def test_oversize_frame_rejected() -> None:
    """A frame of more than MAX_FRAME bytes raises OversizeError, before any parsing."""
    with pytest.raises(OversizeError):
        decode(b"\x00" * (MAX_FRAME + 1))
    big = frame(PROTOCOL_VERSION, Error.TYPE, "x") + b"\x00" * MAX_FRAME
    with pytest.raises(OversizeError):
        decode(big)


def test_oversize_message_refused_on_encode() -> None:
    """Encoding a message larger than MAX_FRAME raises OversizeError rather than a huge frame."""
    state = State(
        channel_id=ChannelId(CID),
        version=1,
        allocations=(Allocation(asset=Address(b"\x00" * 20), balances=(1, 1)),),
        app_data=b"\x00" * 15000,
    )
    prop = Propose(base_version=0, state=state, signature=SIG)
    sync = Sync(
        latest=SignedState(state=state, signatures=(SIG, SIG)), max_signed=1, pending=(prop,) * 4
    )
    with pytest.raises(OversizeError):
        encode(sync)


def test_frame_at_the_limit_is_accepted() -> None:
    """A message that encodes to exactly-or-under MAX_FRAME is accepted by decode."""
    state = State(
        channel_id=ChannelId(CID),
        version=1,
        allocations=(Allocation(asset=Address(b"\x00" * 20), balances=(1, 1)),),
        app_data=b"\x00" * 16 * 1024,
    )
    prop = Propose(base_version=0, state=state, signature=SIG)
    msg = Sync(
        latest=SignedState(state=state, signatures=(SIG, SIG)), max_signed=1, pending=(prop,) * 2
    )
    data = encode(msg)
    assert len(data) <= MAX_FRAME
    assert decode(data) == msg


# --- fuzz --------------------------------------------------------------------


def _decode_only_decode_errors(data: bytes) -> None:
    try:
        msg = decode(data)
    except DecodeError:
        return
    # Whatever decodes must be canonical: it re-encodes to exactly the same bytes.
    assert encode(msg) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
@example(b"\x83\x01\x06\xd8\x1c\x61x")
def test_fuzz_random_bytes(data: bytes) -> None:
    """decode(random bytes) either returns a message or raises DecodeError, nothing else."""
    _decode_only_decode_errors(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_frames(data: st.DataObject) -> None:
    """Bit flips, insertions and deletions in valid frames only ever raise DecodeError."""
    base = bytearray(data.draw(st.sampled_from(sample_frames())))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        i = data.draw(st.integers(min_value=0, max_value=max(len(base) - 1, 0)))
        if op == "flip" and base:
            base[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            base.insert(i, data.draw(st.integers(min_value=0, max_value=255)))
        elif op == "delete" and base:
            del base[i]
        elif base:
            base[i] = data.draw(st.integers(min_value=0, max_value=255))
    _decode_only_decode_errors(bytes(base))


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**260)
    | st.binary(max_size=70)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([1, 2, 3, 4, 5, 6, 7]), st.lists(cbor_values, max_size=6))
def test_fuzz_well_formed_cbor_of_random_shape(mtype: int, fields: list[Any]) -> None:
    """Canonical CBOR arrays [1, type, random fields...] only ever raise DecodeError."""
    _decode_only_decode_errors(frame(PROTOCOL_VERSION, mtype, *fields))


@pytest.mark.parametrize(
    "data",
    [
        bytes([0xD8, 28, 0x81, 0xD8, 29, 0x00]),  # 28([29(0)]): a list that contains itself
        bytes([0xD8, 28, 0x83, 0x01, 0x06, 0xD8, 29, 0x00]),  # [1, 6, <itself>]
    ],
    ids=["self-list", "self-message"],
)
def test_cyclic_shared_value_rejected(data: bytes) -> None:
    """A 6-byte self-referencing CBOR item (value-sharing tags) raises DecodeError."""
    with pytest.raises(DecodeError):
        decode(data)


def _tagged(tag: int, payload: object) -> bytes:
    """The CBOR of ``tag(payload)``."""
    return cbor2.dumps(cbor2.CBORTag(tag, payload))


def test_a_regular_expression_tag_is_refused_before_it_is_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tag 35 asks cbor2 to ``re.compile`` the peer's text: a 58 KB pattern of that kind
    once kept the Trio thread busy for a minute.  The decoder refuses the tag before
    anything is compiled, anywhere in a message."""
    import re

    compiled: list[object] = []
    real = re.compile

    def spy(pattern: Any, *args: Any, **kw: Any) -> Any:
        compiled.append(pattern)
        return real(pattern, *args, **kw)

    monkeypatch.setattr(re, "compile", spy)
    pattern = "(?i)" + "[\u0100-\uffff]" * 6470
    frames = [
        _tagged(35, pattern),
        cbor2.dumps([PROTOCOL_VERSION, Error.TYPE, cbor2.CBORTag(35, pattern)]),
        cbor2.dumps([PROTOCOL_VERSION, Error.TYPE, "x"]) + _tagged(35, pattern),  # trailing
    ]
    for frame in frames:
        assert len(frame) <= MAX_FRAME
        with pytest.raises(DecodeError):
            decode(frame)
    assert pattern not in compiled


# One payload of each CBOR major type that a built-in tag might decode.
_TAG_PAYLOADS = (1, "a", b"a", [1, 2], {"a": 1}, b"\x00" * 16, "2020-01-01T00:00:00Z", 1.5)


def test_every_tag_cbor2_builds_an_object_for_is_refused() -> None:
    """Probe cbor2 (with the decoder's options) for every tag below 70,000 and a few
    large ones: the only tags that decode to anything but an inert ``CBORTag`` are
    ``REFUSED_TAGS`` (which raise) and 2, the protocol's bignum.  A cbor2 release with a
    new built-in tag fails here until the tag is added to ``REFUSED_TAGS``."""
    options = codec._SEMANTIC_DECODERS
    active = set()
    for tag in [*range(70_000), 2**32 - 1, 2**32, 2**63]:
        head = _tagged(tag, 0)[:-1]
        for payload in _TAG_PAYLOADS:
            try:
                value = cbor2.loads(head + cbor2.dumps(payload), semantic_decoders=options)
            except cbor2.CBORDecodeError:
                active.add(tag)
                break
            if not isinstance(value, cbor2.CBORTag):
                active.add(tag)
                break
    assert active == codec.REFUSED_TAGS | {2}
    for tag in codec.REFUSED_TAGS:  # and each one is a DecodeError through decode()
        with pytest.raises(DecodeError):
            decode(cbor2.dumps([PROTOCOL_VERSION, Error.TYPE, cbor2.CBORTag(tag, "x")]))


def test_a_bignum_above_uint64_still_decodes() -> None:
    """Tag 2 stays: a balance above 2**64 arrives as a bignum."""
    big = UINT256_MAX - 5
    st_ = attrs.evolve(
        sample_state(),
        allocations=(Allocation(asset=Address(b"\x00" * 20), balances=(big, 5), locked=0),),
    )
    data = encode(Propose(base_version=6, state=st_, signature=b"\x11" * 65))
    assert bytes([0xC2, 0x58, 32]) + big.to_bytes(32, "big") in data  # tag 2, 32 bytes
    msg = decode(data)
    assert isinstance(msg, Propose) and msg.state.allocations[0].balances == (big, 5)


# The decoder builds states with ``State.unchecked``: it must accept exactly what the
# validating constructors accept, and build the same value.
_field_values = st.one_of(
    st.integers(min_value=-1, max_value=2**256),
    st.sampled_from([0, 1, 2**64 - 1, 2**64, 2**256 - 1]),
    st.binary(max_size=40),
    st.sampled_from([b"\x00" * 20, b"\x01" * 20, b"\x02" * 32]),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
_valid_allocation = st.tuples(
    st.sampled_from([b"\x00" * 20, b"\x01" * 20, b"\x03" * 20, b"\x04" * 20]),
    amounts(),
).map(lambda t: [t[0], *t[1]])
# Each amount a uint256, their sum maybe not: the decoder and the constructor refuse the
# same ones.
_uint256_allocation = st.tuples(
    st.sampled_from([b"\x00" * 20, b"\x01" * 20]),
    st.integers(min_value=0, max_value=2**256 - 1),
    st.integers(min_value=0, max_value=2**256 - 1),
    st.integers(min_value=0, max_value=2**256 - 1),
).map(list)
_valid_allocations = st.lists(_valid_allocation, min_size=1, max_size=4, unique_by=lambda a: a[0])
_any_allocations = st.lists(
    st.one_of(
        _valid_allocation, _uint256_allocation, st.lists(_field_values, min_size=3, max_size=5)
    ),
    max_size=MAX_ASSETS + 1,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, anything the wire could carry otherwise."""
    return st.integers(0, 3).flatmap(lambda i: valid if i else _field_values)


_wire_states = st.tuples(
    _mostly(st.just(b"\x02" * 32)),
    _mostly(st.integers(min_value=0, max_value=2**64 - 1)),
    st.integers(0, 3).flatmap(lambda i: _valid_allocations if i else _any_allocations),
    _mostly(st.binary(max_size=64)),
    _mostly(st.booleans()),
).map(list)


def _validated_state(f: list[Any]) -> State:
    """The same wire fields through the validating attrs constructors."""
    return State(
        channel_id=f[0],
        version=f[1],
        allocations=tuple(Allocation(asset=a[0], balances=(a[1], a[2]), locked=a[3]) for a in f[2]),
        app_data=f[3],
        is_final=f[4],
    )


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_wire_states)
def test_decoder_accepts_exactly_what_the_validators_accept(fields: list[Any]) -> None:
    """state_from_wire refuses (DecodeError) exactly the fields the validating
    constructors refuse, and otherwise builds an equal State."""
    try:
        expected: State | None = _validated_state(fields)
    except (ValueError, TypeError, IndexError):
        expected = None
    if expected is None:
        with pytest.raises(DecodeError):
            codec.state_from_wire(fields)
    else:
        assert codec.state_from_wire(fields) == expected


@pytest.mark.parametrize(
    ("balances", "locked", "fits"),
    [
        ((UINT256_MAX, 0), 0, True),
        ((UINT256_MAX - 5, 3), 2, True),
        ((UINT256_MAX, 1), 0, False),
        ((1, UINT256_MAX), 0, False),
        ((UINT256_MAX - 5, 3), 3, False),
    ],
)
def test_an_asset_total_over_uint256_is_refused_by_decoder_and_constructor(
    balances: tuple[int, int], locked: int, fits: bool
) -> None:
    """Each amount is a uint256, and so must their sum be: the adjudicator adds them up
    (checked arithmetic), so a state holding more could never be funded nor settled."""
    wire = [b"\x02" * 32, 0, [[b"\x01" * 20, balances[0], balances[1], locked]], b"", False]
    if fits:
        state = codec.state_from_wire(wire)
        assert state.allocations[0].total <= UINT256_MAX
        assert Allocation(asset=Address(b"\x01" * 20), balances=balances, locked=locked)
    else:
        with pytest.raises(DecodeError, match="total exceeds uint256"):
            codec.state_from_wire(wire)
        with pytest.raises(ValueError, match="more than uint256"):
            Allocation(asset=Address(b"\x01" * 20), balances=balances, locked=locked)
