"""BOLT 8 handshake and framing against the published test vectors (08-transport.md, Appendix A)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from coincurve import PrivateKey

from channel import noise
from channel.errors import HandshakeError, LocalProtocolError, OversizeError, TransportError
from channel.limits import MAX_FRAME
from channel.noise import HEADER_SIZE, MAC_SIZE, Initiator, NoiseSession, Responder


def h(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


# --- Appendix A values ------------------------------------------------------

INITIATOR_LS_PRIV = h("1111111111111111111111111111111111111111111111111111111111111111")
INITIATOR_LS_PUB = h("034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa")
INITIATOR_E_PRIV = h("1212121212121212121212121212121212121212121212121212121212121212")
RESPONDER_LS_PRIV = h("2121212121212121212121212121212121212121212121212121212121212121")
RESPONDER_LS_PUB = h("028d7500dd4c12685d1f568b4c2b5048e8534b873319f3a8daa612b469132ec7f7")
RESPONDER_E_PRIV = h("2222222222222222222222222222222222222222222222222222222222222222")

ACT_ONE = h(
    "0x00036360e856310ce5d294e8be33fc807077dc56ac80d95d9cd4ddbd21325eff73f7"
    "0df6086551151f58b8afe6c195782c6a"
)
ACT_TWO = h(
    "0x0002466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
    "6e2470b93aac583c9ef6eafca3f730ae"
)
ACT_THREE = h(
    "0x00b9e3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa22355361aa02e55a8fc28"
    "fef5bd6d71ad0c38228dc68b1c466263b47fdf31e560e139ba"
)
CK = h("0x919219dbb2920afa8db80f9a51787a840bcf111ed8d588caf9ab4be716e42b01")
# Initiator's sending key (= responder's receiving key), and the other direction.
K_INITIATOR_TO_RESPONDER = h("0x969ab31b4d288cedf6218839b27a3e2140827047f2c0f01bf5c04435d43511a9")
K_RESPONDER_TO_INITIATOR = h("0xbb9020b8965f4df047e07f955f3c4b88418984aadc5cdb35096b9ea8fa5c3442")

HELLO_OUTPUTS = {
    0: "cf2b30ddf0cf3f80e7c35a6e6730b59fe802473180f396d88a8fb0db8cbcf25d2f214cf9ea1d95",
    1: "72887022101f0b6753e0c7de21657d35a4cb2a1f5cde2650528bbc8f837d0f0d7ad833b1a256a1",
    500: "178cb9d7387190fa34db9c2d50027d21793c9bc2d40b1e14dcf30ebeeeb220f48364f7a4c68bf8",
    501: "1b186c57d44eb6de4c057c49940d79bb838a145cb528d6e8fd26dbe50a60ca2c104b56b60e45bd",
    1000: "4a2f3cc3b5e78ddb83dcb426d9863d9d9a723b0337c89dd0b005d89f8d3c05c52b76b29b740f09",
    1001: "2ecd8c8a5629d0d02ab457a0fdd0f7b90a192cd46be5ecb6ca570bfc5e268338b1a16cf4ef2d36",
}


def vector_initiator() -> Initiator:
    return Initiator(
        PrivateKey(INITIATOR_LS_PRIV), RESPONDER_LS_PUB, ephemeral_key=INITIATOR_E_PRIV
    )


def vector_responder() -> Responder:
    return Responder(PrivateKey(RESPONDER_LS_PRIV), ephemeral_key=RESPONDER_E_PRIV)


def vector_session() -> NoiseSession:
    return NoiseSession(
        remote_node_id=RESPONDER_LS_PUB,
        send_key=K_INITIATOR_TO_RESPONDER,
        receive_key=K_RESPONDER_TO_INITIATOR,
        chaining_key=CK,
    )


def random_pair() -> tuple[NoiseSession, NoiseSession]:
    """A fresh handshake between two random keys: (initiator's, responder's) session."""
    i_key, r_key = PrivateKey(), PrivateKey()
    initiator = Initiator(i_key, r_key.public_key.format())
    responder = Responder(r_key)
    act_two = responder.receive_act_one(initiator.act_one())
    act_three, i_session = initiator.receive_act_two(act_two)
    return i_session, responder.receive_act_three(act_three)


# --- successful handshake ---------------------------------------------------


def test_initiator_vector_handshake() -> None:
    """The initiator emits the published act one and act three and derives sk, rk."""
    initiator = vector_initiator()
    assert initiator.act_one() == ACT_ONE
    act_three, session = initiator.receive_act_two(ACT_TWO)
    assert act_three == ACT_THREE
    assert session.sender.key == K_INITIATOR_TO_RESPONDER
    assert session.receiver.key == K_RESPONDER_TO_INITIATOR
    assert session.remote_node_id == RESPONDER_LS_PUB
    assert PrivateKey(INITIATOR_LS_PRIV).public_key.format() == INITIATOR_LS_PUB


def test_responder_vector_handshake() -> None:
    """The responder emits the published act two, learns the initiator's key, derives rk, sk."""
    responder = vector_responder()
    assert responder.receive_act_one(ACT_ONE) == ACT_TWO
    session = responder.receive_act_three(ACT_THREE)
    assert session.remote_node_id == INITIATOR_LS_PUB
    assert session.receiver.key == K_INITIATOR_TO_RESPONDER
    assert session.sender.key == K_RESPONDER_TO_INITIATOR


def test_vector_message_encryption_with_key_rotation() -> None:
    """Messages 0, 1, 500, 501, 1000, 1001 of "hello" match the spec across two rotations."""
    session = vector_session()
    outputs = [session.encrypt(b"hello") for _ in range(1002)]
    for index, expected in HELLO_OUTPUTS.items():
        assert outputs[index].hex() == expected, f"message {index}"


def test_vector_messages_decrypt_on_the_responder() -> None:
    """The responder's session, from the real handshake, decrypts all 1002 vector frames."""
    sender = vector_session()
    responder = vector_responder()
    responder.receive_act_one(ACT_ONE)
    receiver = responder.receive_act_three(ACT_THREE)
    for i in range(1002):
        frame = sender.encrypt(b"hello")
        if i in HELLO_OUTPUTS:
            assert frame.hex() == HELLO_OUTPUTS[i]
        assert receiver.decrypt_length(frame[:HEADER_SIZE]) == 5
        assert receiver.decrypt_body(frame[HEADER_SIZE:]) == b"hello"


def test_key_rotation_resets_nonce_every_500_messages() -> None:
    """A direction's key changes and its nonce restarts at 0 exactly every 500 frames."""
    session = vector_session()
    first_key = session.sender.key
    for _ in range(499):
        session.encrypt(b"x")
    assert session.sender.nonce == 998
    assert session.sender.key == first_key
    session.encrypt(b"x")
    assert session.sender.nonce == 0
    assert session.sender.key != first_key
    assert session.receiver.key == K_RESPONDER_TO_INITIATOR


# --- initiator failures (act two) -------------------------------------------


@pytest.mark.parametrize(
    ("act_two", "message"),
    [
        (
            "0x0102466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
            "6e2470b93aac583c9ef6eafca3f730ae",
            "bad version 1",
        ),
        (
            "0x0004466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
            "6e2470b93aac583c9ef6eafca3f730ae",
            "public key",
        ),
        (
            "0x0002466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
            "6e2470b93aac583c9ef6eafca3f730af",
            "bad MAC",
        ),
        (
            "0x0002466d7fcae563e5cb09a0d1870bb580344804617879a14949cf22285f1bae3f27"
            "6e2470b93aac583c9ef6eafca3f730",
            "expected 50 bytes",
        ),
    ],
    ids=["act2-bad-version", "act2-bad-pubkey", "act2-bad-mac", "act2-short-read"],
)
def test_initiator_rejects_bad_act_two(act_two: str, message: str) -> None:
    """Every act-two failure vector raises HandshakeError and yields no session."""
    initiator = vector_initiator()
    assert initiator.act_one() == ACT_ONE
    with pytest.raises(HandshakeError, match=message):
        initiator.receive_act_two(h(act_two))
    with pytest.raises(LocalProtocolError):
        initiator.receive_act_two(ACT_TWO)


# --- responder failures (act one, act three) --------------------------------


@pytest.mark.parametrize(
    ("act_one", "message"),
    [
        (
            "0x01036360e856310ce5d294e8be33fc807077dc56ac80d95d9cd4ddbd21325eff73f7"
            "0df6086551151f58b8afe6c195782c6a",
            "bad version 1",
        ),
        (
            "0x00046360e856310ce5d294e8be33fc807077dc56ac80d95d9cd4ddbd21325eff73f7"
            "0df6086551151f58b8afe6c195782c6a",
            "public key",
        ),
        (
            "0x00036360e856310ce5d294e8be33fc807077dc56ac80d95d9cd4ddbd21325eff73f7"
            "0df6086551151f58b8afe6c195782c6b",
            "bad MAC",
        ),
        (
            "0x00036360e856310ce5d294e8be33fc807077dc56ac80d95d9cd4ddbd21325eff73f7"
            "0df6086551151f58b8afe6c195782c",
            "expected 50 bytes",
        ),
    ],
    ids=["act1-bad-version", "act1-bad-pubkey", "act1-bad-mac", "act1-short-read"],
)
def test_responder_rejects_bad_act_one(act_one: str, message: str) -> None:
    """Every act-one failure vector raises HandshakeError and the responder never answers."""
    responder = vector_responder()
    with pytest.raises(HandshakeError, match=message):
        responder.receive_act_one(h(act_one))
    with pytest.raises(LocalProtocolError):
        responder.receive_act_one(ACT_ONE)


@pytest.mark.parametrize(
    ("act_three", "message"),
    [
        (
            "0x01b9e3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa22355361aa02e55a8fc28"
            "fef5bd6d71ad0c38228dc68b1c466263b47fdf31e560e139ba",
            "bad version 1",
        ),
        (
            "0x00c9e3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa22355361aa02e55a8fc28"
            "fef5bd6d71ad0c38228dc68b1c466263b47fdf31e560e139ba",
            "static key: bad MAC",
        ),
        (
            "0x00bfe3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa2235536ad09a8ee3518"
            "70c2bb7f78b754a26c6cef79a98d25139c856d7efd252c2ae73c",
            "static key: not a compressed",
        ),
        (
            "0x00b9e3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa22355361aa02e55a8fc28"
            "fef5bd6d71ad0c38228dc68b1c466263b47fdf31e560e139bb",
            "act three: bad MAC",
        ),
        (
            "0x00b9e3a702e93e3a9948c2ed6e5fd7590a6e1c3a0344cfc9d5b57357049aa22355361aa02e55a8fc28"
            "fef5bd6d71ad0c38228dc68b1c466263b47fdf31e560e139",
            "expected 66 bytes",
        ),
    ],
    ids=[
        "act3-bad-version",
        "act3-bad-ciphertext",
        "act3-bad-rs",
        "act3-bad-mac",
        "act3-short-read",
    ],
)
def test_responder_rejects_bad_act_three(act_three: str, message: str) -> None:
    """Every act-three failure vector raises HandshakeError after a correct act two."""
    responder = vector_responder()
    assert responder.receive_act_one(ACT_ONE) == ACT_TWO
    with pytest.raises(HandshakeError, match=message):
        responder.receive_act_three(h(act_three))
    with pytest.raises(LocalProtocolError):
        responder.receive_act_three(ACT_THREE)


def test_initiator_with_wrong_remote_key_fails_at_responder() -> None:
    """An initiator that expects another key cannot complete act one with this responder."""
    initiator = Initiator(PrivateKey(), PrivateKey().public_key.format())
    with pytest.raises(HandshakeError, match="act one: bad MAC"):
        vector_responder().receive_act_one(initiator.act_one())


def test_initiator_refuses_an_invalid_remote_key() -> None:
    """The caller's own bad node id is a ValueError, not a handshake with nobody."""
    with pytest.raises(ValueError, match="remote node id"):
        Initiator(PrivateKey(), b"\x02" + b"\xff" * 32)


def test_out_of_order_calls_are_local_errors() -> None:
    """Acts called out of order are the caller's mistake and raise LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        vector_initiator().receive_act_two(ACT_TWO)
    with pytest.raises(LocalProtocolError):
        vector_responder().receive_act_three(ACT_THREE)
    initiator = vector_initiator()
    initiator.act_one()
    with pytest.raises(LocalProtocolError):
        initiator.act_one()


# --- sessions ---------------------------------------------------------------


def test_random_handshake_round_trips_both_ways_past_rotations() -> None:
    """Two fresh peers agree on keys and exchange 1200 varied messages each way."""
    a, b = random_pair()
    for i in range(1200):
        msg = os.urandom(i % 300)
        a_frame, b_frame = a.encrypt(msg), b.encrypt(msg[::-1])
        assert len(a_frame) == HEADER_SIZE + len(msg) + MAC_SIZE
        b.receive_data(a_frame)
        a.receive_data(b_frame)
        assert b.next_message() == msg
        assert a.next_message() == msg[::-1]


def test_buffered_reader_handles_any_split() -> None:
    """Frames fed byte by byte, or many at once, come out whole and in order."""
    a, b = random_pair()
    msgs = [os.urandom(n) for n in (0, 1, 17, 200, 4000, MAX_FRAME)]
    wire = a.encrypt_many(msgs)
    got: list[bytes] = []
    for i in range(0, len(wire), 7):
        b.receive_data(wire[i : i + 7])
        while (m := b.next_message()) is not None:
            got.append(m)
    assert got == msgs
    assert b.buffered() == 0
    wire = a.encrypt_many(msgs * 3)
    b.receive_data(wire)
    out = []
    while (m := b.next_message()) is not None:
        out.append(m)
    assert out == msgs * 3


def test_oversize_plaintext_is_refused_without_using_a_nonce() -> None:
    """A message over MAX_FRAME raises OversizeError and the session keeps working."""
    a, b = random_pair()
    with pytest.raises(OversizeError):
        a.encrypt(b"\x00" * (MAX_FRAME + 1))
    with pytest.raises(OversizeError):
        a.encrypt_many([b"ok", b"\x00" * (MAX_FRAME + 1)])
    assert a.sender.nonce == 0
    b.receive_data(a.encrypt(b"\x00" * MAX_FRAME))
    assert b.next_message() == b"\x00" * MAX_FRAME


@pytest.mark.parametrize("where", [0, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 4])
def test_tampered_frame_breaks_the_session(where: int) -> None:
    """A flipped bit in the header or body raises TransportError, and every later read does too."""
    a, b = random_pair()
    frame = bytearray(a.encrypt(b"hello world"))
    frame[where] ^= 0x01
    b.receive_data(bytes(frame))
    with pytest.raises(TransportError, match="bad MAC"):
        b.next_message()
    assert b.broken is not None
    b.receive_data(a.encrypt(b"next"))
    with pytest.raises(TransportError, match="broken"):
        b.next_message()


def test_announced_length_over_max_frame_is_oversize(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header announcing more than MAX_FRAME raises OversizeError and breaks the session."""
    a, b = random_pair()
    frame = a.encrypt(b"\x00" * 100)
    monkeypatch.setattr(noise, "MAX_FRAME", 50)
    b.receive_data(frame)
    with pytest.raises(OversizeError, match="exceeds MAX_FRAME=50"):
        b.next_message()
    assert b.broken is not None


def test_exact_read_api_checks_sizes_and_order() -> None:
    """decrypt_body before decrypt_length, or with the wrong size, is a local error."""
    a, b = random_pair()
    frame = a.encrypt(b"abc")
    with pytest.raises(LocalProtocolError):
        b.decrypt_body(frame[HEADER_SIZE:])
    with pytest.raises(LocalProtocolError):
        b.decrypt_length(frame[: HEADER_SIZE - 1])
    assert b.decrypt_length(frame[:HEADER_SIZE]) == 3
    with pytest.raises(LocalProtocolError):
        b.decrypt_body(frame[HEADER_SIZE:-1])
    assert b.decrypt_body(frame[HEADER_SIZE:]) == b"abc"


def test_noise_module_does_no_io() -> None:
    """channel/noise.py imports no trio, socket, sqlite or other I/O module."""
    tree = ast.parse(Path(noise.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "sqlite3", "asyncio", "selectors", "ssl", "web3"}
