"""The BOLT 8 encrypted transport over Trio TCP.

``channel.noise`` does the cryptography without I/O; this module moves its
bytes.  A peer is addressed as ``<33-byte node id hex>@host:port``; the node
id is the peer's secp256k1 key, so a finished handshake proves whom we are
talking to and no further authentication is needed.

* ``connect(signer, address)`` dials and runs the initiator's side.
* ``serve(signer, handler)`` listens, runs the responder's side for each
  accepted socket under a deadline, then hands the ``Connection`` to
  ``handler``.  A peer that stalls or sends garbage is dropped alone; a
  handler that raises is logged and its connection closed, and the server
  keeps serving.

Errors: ``PeerTimeout`` (handshake deadline), ``HandshakeError`` (the peer
failed a check, or hung up mid-handshake), ``TransportError`` (socket
failure, EOF, a frame failing its MAC) and ``OversizeError`` (a message over
``MAX_FRAME``).  After a MAC or size failure the connection is closed: the
cipher stream cannot resynchronise.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import NoReturn

import attrs
import trio
from coincurve import PublicKey

from channel.errors import HandshakeError, OversizeError, PeerTimeout, TransportError
from channel.keys import Signer
from channel.limits import HANDSHAKE_TIMEOUT, MAX_HANDSHAKES
from channel.noise import (
    ACT_ONE_SIZE,
    ACT_THREE_SIZE,
    ACT_TWO_SIZE,
    Initiator,
    NoiseSession,
    Responder,
)

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read: at least one maximum-size frame
#: (2 + 16 + 65535 + 16), so a big frame never needs two wake-ups.
RECEIVE_SIZE = 1 << 17

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --- addressing -----------------------------------------------------------------


def _check_node_id(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 33 or value[0] not in (2, 3):
        raise ValueError("node id must be a 33-byte compressed secp256k1 public key")
    try:
        PublicKey(value)
    except Exception:  # coincurve raises ValueError (or a bare Exception) on bad points
        raise ValueError("node id is not a point on secp256k1") from None


def _check_host(_: object, __: attrs.Attribute[str], value: str) -> None:
    if not value or any(c.isspace() or c in "@[]/" for c in value):
        raise ValueError(f"bad host {value!r}")


def _check_port(_: object, __: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"port must be in 1..65535, got {value!r}")


@attrs.frozen(kw_only=True)
class PeerAddress:
    """Where a peer listens and which key it must prove: ``node_id@host:port``."""

    node_id: bytes = attrs.field(validator=_check_node_id)
    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.node_id.hex()}@{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Same as ``parse_peer_address``."""
        return parse_peer_address(text)


def parse_peer_address(text: str) -> PeerAddress:
    """Parse ``<66 hex digits>@host:port`` (IPv6 hosts in brackets).

    Raises ``ValueError`` on anything else, including a key not on the curve.
    """
    node_hex, at, hostport = text.strip().partition("@")
    if not at:
        raise ValueError(f"peer address {text!r} has no '@': expected pubkey@host:port")
    if len(node_hex) != 66:
        raise ValueError(f"node id in {text!r} must be 66 hex digits")
    try:
        node_id = bytes.fromhex(node_hex)
    except ValueError:
        raise ValueError(f"node id in {text!r} is not hex") from None
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"peer address {text!r}: bad bracketed host")
        port_text = rest[1:]
    else:
        host, colon, port_text = hostport.rpartition(":")
        if not colon:
            raise ValueError(f"peer address {text!r} has no port")
        if ":" in host:
            raise ValueError(f"peer address {text!r}: put an IPv6 host in brackets")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"peer address {text!r}: port is not a number")
    return PeerAddress(node_id=node_id, host=host, port=int(port_text))


# --- the connection -------------------------------------------------------------


class Connection(trio.abc.AsyncResource):
    """An authenticated, encrypted message stream to ``remote_node_id``.

    Sending is safe from several tasks at once (a lock keeps each frame's
    nonce and its place on the wire in step).  Receiving is for one task at
    a time; a second concurrent ``receive`` raises ``trio.BusyResourceError``.
    """

    def __init__(self, stream: trio.abc.Stream, session: NoiseSession) -> None:
        self._stream = stream
        self._session = session
        self._send_lock = trio.Lock()
        # Ciphertext that ``send_now`` could not write at once: the next send writes it
        # first (its frames' nonces are spent, so nothing may overtake it).
        self._unsent = b""
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._receiving = False
        self._send_broken: str | None = None
        self._closed = False

    @property
    def remote_node_id(self) -> bytes:
        """The peer's 33-byte compressed public key, proven by the handshake."""
        return self._session.remote_node_id

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, msg: bytes) -> None:
        """Encrypt and write one message.

        Raises ``OversizeError`` for a message over ``MAX_FRAME`` (nothing is
        sent and the connection stays usable) and ``TransportError`` if the
        connection is closed or the socket fails.
        """
        await self.send_many([msg])

    def send_now(self, msgs: Sequence[bytes]) -> bool:
        """Encrypt ``msgs`` and write them to the socket at once, without waiting: for a
        sender that would otherwise hand them to a writer task (a pass through the
        scheduler before the bytes leave).  False, with nothing done, if a send is in
        progress or pending, or the stream is not a ``trio.SocketStream``.  True once
        the frames are committed to this connection: written, or (socket buffer full, or
        the socket failed) left for the next :meth:`send_many`, which writes the rest
        first or raises ``TransportError``.  Raises ``OversizeError`` as ``send_many``."""
        if self._socket is None or self._unsent or self._send_lock.locked():
            return False
        self._check_sendable()
        data = self._session.encrypt_many(list(msgs))
        try:
            # The descriptor is read now, not kept: a closed socket gives -1 (EBADF),
            # never a number the process has since reused for another file.
            written = os.write(self._socket.fileno(), data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._send_broken = f"socket write failed: {exc!r}"
            written = 0
        if written < len(data):
            self._unsent = data[written:]
        return True

    @property
    def send_pending(self) -> bool:
        """``send_now`` left bytes that only the next ``send_many`` writes."""
        return bool(self._unsent)

    async def send_many(self, msgs: Sequence[bytes]) -> None:
        """Encrypt several messages and write them in one socket write.

        Either every message is accepted or, if one is oversize, none is.
        """
        await self._lock_sending()
        try:
            self._check_sendable()
            data = self._session.encrypt_many(list(msgs))
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            await self._write(data)
        finally:
            self._send_lock.release()

    async def _lock_sending(self) -> None:
        # ``async with trio.Lock`` yields to the scheduler even when the lock is free,
        # and the bytes would wait a whole scheduler pass (20-40 us here) before the
        # socket write; take a free lock at once (still raising if cancelled).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()

    def _check_sendable(self) -> None:
        if self._closed:
            raise TransportError("connection is closed")
        if self._send_broken is not None:
            raise TransportError(f"connection cannot send: {self._send_broken}")

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except _STREAM_ERRORS as exc:
            self._send_broken = f"socket write failed: {exc!r}"
            await self._abort()
            raise TransportError(self._send_broken) from exc
        except BaseException:
            # Cancelled mid-write: part of a frame may be on the wire and its
            # nonces are spent, so nothing sent later could be decrypted.
            self._send_broken = "a write was interrupted"
            await self._abort()
            raise

    def receive_buffered(self) -> bytes | None:
        """The next message if it is already buffered, else ``None``: never reads the
        socket.  A broken frame also gives ``None``, and the next :meth:`receive`
        raises for it (and closes the connection)."""
        if self._closed or self._receiving:
            return None
        try:
            return self._session.next_message()
        except (TransportError, OversizeError):
            return None

    async def receive(self) -> bytes:
        """The next message from the peer.

        A message already buffered is returned at once; otherwise one socket
        read of up to ``RECEIVE_SIZE`` bytes is made, which may deliver many
        frames.  Cancelling a ``receive`` loses nothing.  Raises
        ``TransportError`` on EOF, socket failure or a frame that fails its
        MAC, and ``OversizeError`` on a frame over ``MAX_FRAME``; the last two
        close the connection.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            session = self._session
            while True:
                if self._closed:
                    raise TransportError("connection is closed")
                try:
                    msg = session.next_message()
                except (TransportError, OversizeError):
                    await self._abort()
                    raise
                if msg is not None:
                    return msg
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    await self._abort()
                    raise TransportError(f"socket read failed: {exc!r}") from exc
                if not data:
                    partial_frame = session.buffered()
                    await self._abort()
                    if partial_frame:
                        raise TransportError(
                            f"peer closed the connection mid-frame ({partial_frame} bytes pending)"
                        )
                    raise TransportError("peer closed the connection")
                session.receive_data(data)
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close the socket.  Idempotent."""
        self._closed = True
        await self._stream.aclose()

    async def _abort(self) -> None:
        self._closed = True
        await trio.aclose_forcefully(self._stream)


# --- the handshake over a stream ------------------------------------------------


def _set_nodelay(stream: trio.abc.Stream) -> None:
    # Small frames must not wait for Nagle; trio sets this already, we rely on it.  A
    # socket the peer reset already can refuse the option (EINVAL on some systems): that
    # is the link failing, a TransportError like any other, never a raw OSError.
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        except OSError as exc:
            raise TransportError(f"the socket failed before the handshake: {exc}") from None


async def _receive_exactly(stream: trio.abc.Stream, size: int, what: str) -> bytes:
    """Read exactly ``size`` bytes, never more: later bytes belong to the session."""
    buf = bytearray()
    while len(buf) < size:
        try:
            chunk = await stream.receive_some(size - len(buf))
        except _STREAM_ERRORS as exc:
            raise HandshakeError(f"socket failed while reading {what}: {exc!r}") from exc
        if not chunk:
            raise HandshakeError(f"peer hung up during {what} ({len(buf)} of {size} bytes)")
        buf += chunk
    return bytes(buf)


async def _send_act(stream: trio.abc.Stream, data: bytes, what: str) -> None:
    try:
        await stream.send_all(data)
    except _STREAM_ERRORS as exc:
        raise HandshakeError(f"socket failed while sending {what}: {exc!r}") from exc


async def _initiate(stream: trio.abc.Stream, initiator: Initiator) -> NoiseSession:
    await _send_act(stream, initiator.act_one(), "act one")
    act_two = await _receive_exactly(stream, ACT_TWO_SIZE, "act two")
    act_three, session = initiator.receive_act_two(act_two)
    await _send_act(stream, act_three, "act three")
    return session


async def _respond(stream: trio.abc.Stream, responder: Responder) -> NoiseSession:
    act_one = await _receive_exactly(stream, ACT_ONE_SIZE, "act one")
    await _send_act(stream, responder.receive_act_one(act_one), "act two")
    act_three = await _receive_exactly(stream, ACT_THREE_SIZE, "act three")
    return responder.receive_act_three(act_three)


async def connect(
    signer: Signer, address: PeerAddress, *, handshake_timeout: float = HANDSHAKE_TIMEOUT
) -> Connection:
    """Dial ``address`` and complete the handshake as initiator.

    ``handshake_timeout`` covers the TCP connect and all three acts.  Raises
    ``PeerTimeout`` when it runs out, ``TransportError`` when the TCP
    connection cannot be made, and ``HandshakeError`` when the peer fails
    the handshake — including a peer that does not hold ``address.node_id``
    (it cannot answer act one and hangs up).
    """
    initiator = Initiator(signer.private_key, address.node_id)
    try:
        with trio.fail_after(handshake_timeout):
            try:
                stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError as exc:
                raise TransportError(f"cannot connect to {address}: {exc}") from exc
            try:
                _set_nodelay(stream)
                session = await _initiate(stream, initiator)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise PeerTimeout(
            f"handshake with {address} not done within {handshake_timeout}s"
        ) from None
    return Connection(stream, session)


async def handshake_responder(
    stream: trio.abc.Stream, signer: Signer, *, handshake_timeout: float = HANDSHAKE_TIMEOUT
) -> Connection:
    """Complete the handshake as responder on an accepted ``stream``.

    The stream is closed on any failure.  Raises ``PeerTimeout`` if the peer
    has not finished act three within ``handshake_timeout`` seconds and
    ``HandshakeError`` if it fails a check or hangs up.
    """
    responder = Responder(signer.private_key)
    try:
        with trio.fail_after(handshake_timeout):
            _set_nodelay(stream)
            session = await _respond(stream, responder)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise PeerTimeout(f"handshake not finished within {handshake_timeout}s") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Connection(stream, session)


# --- the server -----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Listening:
    """What ``serve`` reports once it accepts connections."""

    host: str
    port: int
    listeners: tuple[trio.SocketListener, ...] = attrs.field(eq=False, repr=False)


Handler = Callable[[Connection], Awaitable[object]]


@attrs.define
class _Handshakes:
    """The incoming sockets in the handshake now (oldest first, each with its source
    host), and how many may be."""

    limit: int
    active: dict[object, tuple[str, trio.CancelScope]] = attrs.Factory(dict)

    def make_room(self) -> None:
        """Drop the oldest handshake of the source host that holds the most.  An honest
        handshake takes a round trip or two, so a flood of stalling sockets has to
        outpace that to shut anyone out; one from a single host only ever drops its own
        sockets.  (Refusing the newest instead would let 128 stalled sockets shut
        everyone out.)"""
        per_host: dict[str, int] = {}
        for host, _ in self.active.values():
            per_host[host] = per_host.get(host, 0) + 1
        busiest = max(per_host, key=per_host.__getitem__)
        key = next(k for k, (host, _) in self.active.items() if host == busiest)
        self.active.pop(key)[1].cancel()


def _source_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:  # already reset by the peer
        return ""


async def _serve_one(
    signer: Signer,
    handler: Handler,
    handshake_timeout: float,
    handshakes: _Handshakes,
    stream: trio.SocketStream,
) -> None:
    if len(handshakes.active) >= handshakes.limit:
        handshakes.make_room()
    key, scope = object(), trio.CancelScope()
    handshakes.active[key] = (_source_host(stream), scope)
    try:
        with scope:
            conn = await handshake_responder(stream, signer, handshake_timeout=handshake_timeout)
    except TransportError as exc:
        log.info("dropped incoming connection: %s", exc)
        return
    except Exception:  # a bug, but one peer must not take the listener down
        log.exception("unexpected failure in an incoming handshake")
        return
    finally:
        handshakes.active.pop(key, None)
    if scope.cancelled_caught:
        log.info("dropped an incoming handshake: %d newer ones came", handshakes.limit)
        await trio.aclose_forcefully(stream)
        return
    try:
        await handler(conn)
    except Exception:
        log.exception("connection handler failed for peer %s", conn.remote_node_id.hex())
    finally:
        await trio.aclose_forcefully(conn)


async def serve(
    signer: Signer,
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_handshakes: int = MAX_HANDSHAKES,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept BOLT 8 connections forever, calling ``await handler(conn)`` for each.

    Start it with ``listening = await nursery.start(serve, signer, handler)``;
    ``listening.port`` is the bound port (useful with the default ``port=0``).
    Each accepted socket gets ``handshake_timeout`` seconds to finish the
    handshake, and at most ``max_handshakes`` are under way (a new socket drops the
    oldest of the source host that holds the most); failures are logged and dropped.
    The connection is closed when ``handler`` returns or raises; an exception from ``handler`` is
    logged, never propagated.  Raises ``OSError`` if it cannot listen.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    task_status.started(Listening(host=bound_host, port=bound_port, listeners=tuple(listeners)))
    handshakes = _Handshakes(limit=max_handshakes)
    await trio.serve_listeners(
        partial(_serve_one, signer, handler, handshake_timeout, handshakes), listeners
    )
