"""The BOLT 8 transport over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import os
from functools import partial

import pytest
import trio
import trio.testing
from coincurve import PrivateKey

from channel import noise
from channel.errors import HandshakeError, OversizeError, PeerTimeout, TransportError
from channel.keys import Signer
from channel.limits import MAX_FRAME
from channel.noise import ACT_TWO_SIZE, Initiator, NoiseSession, Responder
from channel.transport import (
    Connection,
    Handler,
    Listening,
    PeerAddress,
    connect,
    parse_peer_address,
    serve,
)

# Every test finishes in well under a second; this catches a hang, not slowness.
TEST_DEADLINE = 20


async def start_server(
    nursery: trio.Nursery, handler: Handler, handshake_timeout: float = 5.0, **kw: int
) -> tuple[Signer, PeerAddress]:
    signer = Signer.generate()
    listening: Listening = await nursery.start(
        partial(serve, signer, handler, handshake_timeout=handshake_timeout, **kw)
    )
    assert listening.port > 0
    return signer, PeerAddress(node_id=signer.node_id, host="127.0.0.1", port=listening.port)


async def echo(conn: Connection) -> None:
    while True:
        try:
            msg = await conn.receive()
        except TransportError:
            return
        await conn.send(msg)


async def wait_dropped(stream: trio.SocketStream) -> None:
    """Return once the server has closed ``stream`` (FIN or RST)."""
    try:
        while await stream.receive_some(1024):
            pass
    except trio.BrokenResourceError:
        pass


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        assert chunk, "server hung up"
        buf += chunk
    return buf


async def raw_handshake(address: PeerAddress) -> tuple[trio.SocketStream, NoiseSession]:
    """A hand-driven initiator, so a test can put arbitrary bytes on the wire afterwards."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    initiator = Initiator(PrivateKey(), address.node_id)
    await stream.send_all(initiator.act_one())
    act_three, session = initiator.receive_act_two(await receive_exactly(stream, ACT_TWO_SIZE))
    await stream.send_all(act_three)
    return stream, session


# --- addressing -------------------------------------------------------------


def test_peer_address_round_trips_through_str() -> None:
    """parse_peer_address(str(a)) == a, for IPv4, names and bracketed IPv6."""
    node_id = Signer.generate().node_id
    for host in ("127.0.0.1", "node.example.org", "::1"):
        address = PeerAddress(node_id=node_id, host=host, port=9735)
        text = str(address)
        assert parse_peer_address(text) == address
        assert PeerAddress.parse(text) == address
    assert str(PeerAddress(node_id=node_id, host="::1", port=1)).endswith("@[::1]:1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:9735",
        "02" + "ab" * 32 + "@127.0.0.1",
        "02" + "ab" * 32 + "@127.0.0.1:0",
        "02" + "ab" * 32 + "@127.0.0.1:65536",
        "02" + "ab" * 32 + "@127.0.0.1:port",
        "02" + "ab" * 32 + "@:9735",
        "02" + "ab" * 32 + "@::1:9735",
        "02" + "ab" * 31 + "@127.0.0.1:9735",
        "zz" + "ab" * 32 + "@127.0.0.1:9735",
        "04" + "ab" * 32 + "@127.0.0.1:9735",
        "02" + "ff" * 32 + "@127.0.0.1:9735",
    ],
)
def test_bad_peer_addresses_are_value_errors(text: str) -> None:
    """Malformed addresses, ports out of range and keys off the curve raise ValueError."""
    with pytest.raises(ValueError):
        parse_peer_address(text)


# --- connecting and talking -------------------------------------------------


async def test_handshake_and_echo_both_ways() -> None:
    """Both sides learn each other's node id and messages flow in both directions."""
    seen: list[bytes] = []

    async def handler(conn: Connection) -> None:
        seen.append(conn.remote_node_id)
        await conn.send(b"hello from the responder")
        await echo(conn)

    client = Signer.generate()
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server, address = await start_server(nursery, handler)
            async with await connect(client, address) as conn:
                assert conn.remote_node_id == server.node_id
                assert await conn.receive() == b"hello from the responder"
                for msg in (b"", b"x", os.urandom(1000), b"\x00" * MAX_FRAME):
                    await conn.send(msg)
                    assert await conn.receive() == msg
            nursery.cancel_scope.cancel()
    assert seen == [client.node_id]


async def test_3000_messages_each_way_across_key_rotations() -> None:
    """3000 batched messages each way arrive intact and in order (six key rotations per side)."""
    count, batch = 3000, 100
    messages = [i.to_bytes(4, "big") + os.urandom(i % 250) for i in range(count)]
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)

            async def sender() -> None:
                for start in range(0, count, batch):
                    await conn.send_many(messages[start : start + batch])

            nursery.start_soon(sender)
            for expected in messages:
                assert await conn.receive() == expected
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_concurrent_senders_do_not_interleave_frames() -> None:
    """Ten tasks sending at once produce only whole, decryptable frames."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)
            sent = {bytes([t]) + i.to_bytes(2, "big") * 50 for t in range(10) for i in range(100)}

            async def sender(t: int) -> None:
                for i in range(100):
                    if i % 2:
                        await conn.send(bytes([t]) + i.to_bytes(2, "big") * 50)
                    else:
                        await conn.send_many([bytes([t]) + i.to_bytes(2, "big") * 50])

            async with trio.open_nursery() as senders:
                for t in range(10):
                    senders.start_soon(sender, t)
                got = {await conn.receive() for _ in range(len(sent))}
            assert got == sent
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_wrong_expected_remote_key_fails_the_handshake() -> None:
    """Dialing a listener under a key it does not hold raises HandshakeError, not a connection."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            impostor = PeerAddress(
                node_id=Signer.generate().node_id, host=address.host, port=address.port
            )
            with pytest.raises(HandshakeError):
                await connect(Signer.generate(), impostor)
            conn = await connect(Signer.generate(), address)
            await conn.send(b"still serving")
            assert await conn.receive() == b"still serving"
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_connect_to_a_closed_port_is_a_transport_error() -> None:
    """A refused TCP connection surfaces as TransportError."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    address = PeerAddress(node_id=Signer.generate().node_id, host="127.0.0.1", port=port)
    with pytest.raises(TransportError):
        await connect(Signer.generate(), address)


async def test_initiator_times_out_on_a_silent_listener() -> None:
    """A listener that accepts but never answers act one gives PeerTimeout within the deadline."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    address = PeerAddress(node_id=Signer.generate().node_id, host="127.0.0.1", port=port)
    with trio.fail_after(TEST_DEADLINE):
        with pytest.raises(PeerTimeout):
            await connect(Signer.generate(), address, handshake_timeout=0.3)
    for listener in listeners:
        await listener.aclose()


# --- hostile or broken peers ------------------------------------------------


async def test_stalled_peer_is_dropped_while_an_honest_peer_connects() -> None:
    """A peer stuck mid-handshake is cut off at the deadline and blocks no one else."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo, handshake_timeout=0.3)
            stalled = await trio.open_tcp_stream(address.host, address.port)
            await stalled.send_all(b"\x00" + os.urandom(20))  # 21 of act one's 50 bytes

            conn = await connect(Signer.generate(), address)
            await conn.send(b"ping")
            assert await conn.receive() == b"ping"

            start = trio.current_time()
            await wait_dropped(stalled)
            assert trio.current_time() - start < 5
            await stalled.aclose()

            await conn.send(b"still here")
            assert await conn.receive() == b"still here"
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_past_the_cap_on_handshakes_a_new_socket_drops_the_oldest() -> None:
    """At most ``max_handshakes`` sockets sit in the handshake: a new one drops the
    oldest at once (not after the 30 s handshake timeout), so stalled sockets cannot
    shut an honest peer out; it connects while they stall."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo, handshake_timeout=30, max_handshakes=2)
            stalled = []
            for _ in range(3):
                stalled.append(await trio.open_tcp_stream(address.host, address.port))
                await trio.sleep(0.05)  # the server takes them in this order
            with trio.fail_after(2):
                await wait_dropped(stalled[0])
            conn = await connect(Signer.generate(), address)  # drops stalled[1]
            with trio.fail_after(2):
                await wait_dropped(stalled[1])
            await conn.send(b"ping")
            assert await conn.receive() == b"ping"
            for s in stalled:
                await s.aclose()
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_a_flood_from_one_host_drops_only_its_own_handshakes() -> None:
    """Past ``max_handshakes``, the socket dropped is the oldest of the source host
    holding the most: a slow handshake from another host, though older than all the
    flood's, stays (loopback takes any 127/8 source address)."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo, handshake_timeout=30, max_handshakes=3)
            slow = await trio.open_tcp_stream(address.host, address.port, local_address="127.0.0.3")
            await trio.sleep(0.05)
            flood = []
            for _ in range(5):
                flood.append(
                    await trio.open_tcp_stream(
                        address.host, address.port, local_address="127.0.0.2"
                    )
                )
                await trio.sleep(0.05)  # the server takes them in this order
            with trio.fail_after(2):
                for s in flood[:3]:  # 3 slots: slow + 2 of the flood's, its newest
                    await wait_dropped(s)
            with trio.move_on_after(0.3) as still:
                await wait_dropped(slow)
            assert still.cancelled_caught, "the other host's handshake was dropped"
            for s in [slow, *flood]:
                await s.aclose()
            nursery.cancel_scope.cancel()


async def test_garbage_instead_of_act_one_is_dropped_and_server_serves_on() -> None:
    """Random bytes in place of act one get the socket closed; the next honest peer is served."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            for garbage in (os.urandom(50), b"\x00" + os.urandom(49), b"GET / HTTP/1.1\r\n" * 4):
                bad = await trio.open_tcp_stream(address.host, address.port)
                await bad.send_all(garbage)
                await wait_dropped(bad)
                await bad.aclose()
            conn = await connect(Signer.generate(), address)
            await conn.send(b"ok")
            assert await conn.receive() == b"ok"
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_failing_handler_does_not_stop_the_server() -> None:
    """A handler that raises closes only its own connection; later peers are served."""
    calls = 0

    async def handler(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(conn)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            first = await connect(Signer.generate(), address)
            with pytest.raises(TransportError, match="closed"):
                await first.receive()
            second = await connect(Signer.generate(), address)
            await second.send(b"fine")
            assert await second.receive() == b"fine"
            await second.aclose()
            nursery.cancel_scope.cancel()
    assert calls == 2


async def test_oversize_send_raises_and_connection_keeps_working() -> None:
    """An over-MAX_FRAME send raises OversizeError, sends nothing, and the link stays usable."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)
            with pytest.raises(OversizeError):
                await conn.send(b"\x00" * (MAX_FRAME + 1))
            with pytest.raises(OversizeError):
                await conn.send_many([b"small", b"\x00" * (MAX_FRAME + 1)])
            await conn.send(b"after")
            assert await conn.receive() == b"after"
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_tampered_ciphertext_is_a_transport_error_and_closes() -> None:
    """A frame with one flipped bit raises TransportError at the receiver, which hangs up."""
    outcome_send, outcome_receive = trio.open_memory_channel[object](1)

    async def handler(conn: Connection) -> None:
        assert await conn.receive() == b"genuine"
        try:
            await conn.receive()
        except TransportError as exc:
            await outcome_send.send(exc)
            assert conn.closed
        else:
            await outcome_send.send(None)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            stream, session = await raw_handshake(address)
            frame = bytearray(session.encrypt(b"genuine") + session.encrypt(b"tampered"))
            frame[-5] ^= 0x40
            await stream.send_all(bytes(frame))
            outcome = await outcome_receive.receive()
            assert isinstance(outcome, TransportError)
            assert "bad MAC" in str(outcome)
            await wait_dropped(stream)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_announced_oversize_length_is_refused_and_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame announcing over MAX_FRAME raises OversizeError at the receiver, which hangs up."""
    outcome_send, outcome_receive = trio.open_memory_channel[object](1)

    async def handler(conn: Connection) -> None:
        try:
            await conn.receive()
        except OversizeError as exc:
            await outcome_send.send(exc)
        else:
            await outcome_send.send(None)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            stream, session = await raw_handshake(address)
            frame = session.encrypt(b"\x00" * 2000)
            # MAX_FRAME is 65535, the largest a 2-byte length can say, so lower the
            # receiver's limit to exercise the check.
            monkeypatch.setattr(noise, "MAX_FRAME", 1000)
            await stream.send_all(frame)
            assert isinstance(await outcome_receive.receive(), OversizeError)
            await wait_dropped(stream)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_peer_hanging_up_is_a_transport_error() -> None:
    """receive() raises TransportError once the peer closes, and later sends fail too."""

    async def handler(conn: Connection) -> None:
        await conn.send(b"bye")

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            conn = await connect(Signer.generate(), address)
            assert await conn.receive() == b"bye"
            with pytest.raises(TransportError, match="peer closed"):
                await conn.receive()
            with pytest.raises(TransportError):
                await conn.send(b"too late")
            nursery.cancel_scope.cancel()


async def test_mid_frame_eof_is_reported() -> None:
    """A peer that hangs up in the middle of a frame makes receive() raise TransportError."""
    outcome_send, outcome_receive = trio.open_memory_channel[object](1)

    async def handler(conn: Connection) -> None:
        try:
            await conn.receive()
        except TransportError as exc:
            await outcome_send.send(exc)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            stream, session = await raw_handshake(address)
            await stream.send_all(session.encrypt(b"cut short")[:-3])
            await stream.aclose()
            outcome = await outcome_receive.receive()
            assert isinstance(outcome, TransportError)
            assert "mid-frame" in str(outcome)
            nursery.cancel_scope.cancel()


async def test_cancelled_receive_loses_nothing_and_closed_connection_refuses() -> None:
    """A receive cancelled while waiting drops no message; after aclose, receive and send fail."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)
            with trio.move_on_after(0.05) as scope:
                await conn.receive()
            assert scope.cancelled_caught
            await conn.send_many([b"one", b"two"])
            assert await conn.receive() == b"one"
            assert await conn.receive() == b"two"
            await conn.aclose()
            await conn.aclose()
            with pytest.raises(TransportError, match="closed"):
                await conn.receive()
            with pytest.raises(TransportError, match="closed"):
                await conn.send(b"x")
            nursery.cancel_scope.cancel()


async def test_receive_buffered_returns_what_one_read_brought_and_never_waits() -> None:
    """Frames that arrived in one socket read come out of receive_buffered one by one;
    once they are used up it returns None at once (it never reads the socket); a frame
    that fails its MAC also gives None, and the next receive raises for it."""
    send, got = trio.open_memory_channel[object](10)

    async def handler(conn: Connection) -> None:
        await send.send(await conn.receive())
        while (msg := conn.receive_buffered()) is not None:
            await send.send(msg)
        await send.send(None)
        try:
            await conn.receive()
        except TransportError as exc:
            assert conn.receive_buffered() is None  # closed
            await send.send(exc)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            stream, session = await raw_handshake(address)
            await stream.send_all(b"".join(session.encrypt(m) for m in (b"1", b"2", b"3")))
            assert [await got.receive() for _ in range(4)] == [b"1", b"2", b"3", None]
            frame = bytearray(session.encrypt(b"tampered"))
            frame[-5] ^= 0x40
            await stream.send_all(bytes(frame))
            exc = await got.receive()
            assert isinstance(exc, TransportError) and "bad MAC" in str(exc)
            await wait_dropped(stream)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_send_now_writes_at_once_and_keeps_order_when_the_socket_is_full() -> None:
    """send_now writes without waiting; when the peer stops reading and the socket buffer
    fills, it still takes the frames (their nonces are spent) and leaves the rest
    pending, refuses more until a send_many writes that rest first; while a send is in
    progress it does nothing and says so.  The peer gets every frame, in order."""
    got: list[bytes] = []
    reading = trio.Event()
    done = trio.Event()

    async def reader(conn: Connection) -> None:
        await reading.wait()
        while True:
            try:
                got.append(await conn.receive())
            except TransportError:
                break
        done.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, reader)
            conn = await connect(Signer.generate(), address)
            blob = os.urandom(30_000)
            sent: list[bytes] = []
            while not conn.send_pending:  # the peer reads nothing: the buffer fills up
                msg = len(sent).to_bytes(4, "big") + blob
                assert conn.send_now([msg])
                sent.append(msg)
            assert len(sent) > 2  # some went out at once before the buffer was full
            assert not conn.send_now([b"overtaking"])  # never past the pending rest
            blocked = trio.Event()

            async def send_rest() -> None:
                blocked.set()
                await conn.send_many([b"after"])

            nursery.start_soon(send_rest)
            await blocked.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert not conn.send_now([b"overtaking"])  # send_many holds the socket
            reading.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not conn.send_pending
            assert conn.send_now([b"last"])
            await conn.aclose()
            await done.wait()
            assert got == [*sent, b"after", b"last"]
            nursery.cancel_scope.cancel()


async def test_send_now_is_only_for_tcp_sockets() -> None:
    """Over any other stream (here an in-memory pair) send_now does nothing and says so:
    the caller sends through send_many as before."""
    key = PrivateKey()
    initiator, responder = Initiator(PrivateKey(), key.public_key.format()), Responder(key)
    act_three, session = initiator.receive_act_two(responder.receive_act_one(initiator.act_one()))
    responder_session = responder.receive_act_three(act_three)
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(left, session)
    assert not conn.send_now([b"x"])
    await conn.send_many([b"x"])  # ... and that path works
    got = await right.receive_some()
    responder_session.receive_data(got)
    assert responder_session.next_message() == b"x"
    await left.aclose()
    await right.aclose()


async def test_send_now_on_a_closed_connection_raises() -> None:
    """A closed connection refuses send_now with TransportError, as it refuses send."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)
            assert conn.send_now([b"ping"])
            assert await conn.receive() == b"ping"
            await conn.aclose()
            with pytest.raises(TransportError, match="closed"):
                conn.send_now([b"late"])
            nursery.cancel_scope.cancel()


async def test_send_now_and_send_many_interleave_across_key_rotations() -> None:
    """3000 messages, sent now by send_now and now by send_many (six key rotations on
    the way), come back from an echo server intact and in order."""
    messages = [i.to_bytes(4, "big") + os.urandom(i % 200) for i in range(3000)]
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            conn = await connect(Signer.generate(), address)

            async def sender() -> None:
                for i in range(0, len(messages), 3):
                    batch = messages[i : i + 3]
                    if i % 2 or not conn.send_now(batch):
                        await conn.send_many(batch)
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(sender)
            for expected in messages:
                assert await conn.receive() == expected
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_a_socket_that_refuses_its_options_fails_as_a_transport_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket the peer reset before we set TCP_NODELAY can refuse the option (EINVAL
    on some systems).  ``connect`` must raise ``TransportError`` (which a redial loop
    handles), not the raw ``OSError`` (which ended the client's redial loop, and the
    client with it); the listener drops such a socket and serves the next one."""

    def refuse(self: trio.SocketStream, *args: object) -> None:
        raise OSError(22, "Invalid argument")

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, echo)
            with monkeypatch.context() as m:
                m.setattr(trio.SocketStream, "setsockopt", refuse)
                with pytest.raises(TransportError, match="Invalid argument"):
                    await connect(Signer.generate(), address)
            conn = await connect(Signer.generate(), address)
            await conn.send(b"still serving")
            assert await conn.receive() == b"still serving"
            await conn.aclose()
            nursery.cancel_scope.cancel()
