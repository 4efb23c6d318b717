"""BOLT 8 (Noise_XK_secp256k1_ChaChaPoly_SHA256), sans-I/O.

The handshake is three fixed-size acts.  The initiator knows the responder's
static key in advance; the responder learns the initiator's in act three::

    Initiator                                   Responder
    act_one()                       -- 50 -->   receive_act_one(act1) -> act2
    receive_act_two(act2) -> act3   <-- 50 --
      (act3, NoiseSession)          -- 66 -->   receive_act_three(act3) -> NoiseSession

Every act is ``version (1 byte, 0) || payload || 16-byte Poly1305 tag``.  Any
deviation (wrong size, unknown version, a point that is not on the curve, a
tag that does not verify) raises :class:`~channel.errors.HandshakeError` and
the handshake object is dead: it never yields a session.

After the handshake a :class:`NoiseSession` frames messages as
``encrypted 2-byte length + tag (18 bytes) || encrypted body + tag``, each
with its own nonce.  Each direction's key is rotated (``ck', k' = HKDF(ck, k)``)
when its nonce reaches 1000, i.e. every 500 messages.

Nothing here touches a socket: bytes in, bytes out.  ``channel.transport``
drives these objects over Trio TCP.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from coincurve import PrivateKey, PublicKey
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from channel.errors import HandshakeError, LocalProtocolError, OversizeError, TransportError
from channel.limits import MAX_FRAME

PROTOCOL_NAME = b"Noise_XK_secp256k1_ChaChaPoly_SHA256"
PROLOGUE = b"lightning"
HANDSHAKE_VERSION = 0
ACT_ONE_SIZE = 50
ACT_TWO_SIZE = 50
ACT_THREE_SIZE = 66
MAC_SIZE = 16
#: Size of the encrypted length prefix of every transport frame.
HEADER_SIZE = 2 + MAC_SIZE
#: A key is rotated once its nonce reaches this value (BOLT 8).
ROTATE_AFTER = 1000

# ChaCha20-Poly1305 nonce: 32 zero bits, then the 64-bit counter little-endian.
_nonce = struct.Struct("<4xQ").pack
_pack_len = struct.Struct(">H").pack
_unpack_len = struct.Struct(">H").unpack
_sha256 = hashlib.sha256


def _hkdf(salt: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """HKDF-SHA256 with empty info, 64 bytes of output split in two halves.

    Written out with ``hmac.digest`` (one C call per HMAC): it runs at every
    key rotation, and the generic HKDF object costs several times more.
    """
    prk = hmac.digest(salt, ikm, "sha256")
    t1 = hmac.digest(prk, b"\x01", "sha256")
    t2 = hmac.digest(prk, t1 + b"\x02", "sha256")
    return t1, t2


def _ecdh(key: PrivateKey, point: bytes) -> bytes:
    """BOLT 8 ECDH: SHA-256 of the compressed shared point (coincurve's default)."""
    return bytes(key.ecdh(point))


def _parse_point(data: bytes, what: str) -> bytes:
    """Check ``data`` is a compressed secp256k1 point; return it unchanged."""
    if len(data) != 33 or data[0] not in (2, 3):
        raise HandshakeError(f"{what}: not a compressed secp256k1 public key")
    try:
        PublicKey(data)
    except Exception:  # coincurve raises ValueError (or a bare Exception) on bad points
        raise HandshakeError(f"{what}: not a point on secp256k1") from None
    return data


def _as_private_key(key: PrivateKey | bytes) -> PrivateKey:
    return PrivateKey(key) if isinstance(key, bytes) else key


class _SymmetricState:
    """The Noise ``ck`` / ``h`` pair shared by both handshake roles."""

    def __init__(self, responder_static: bytes) -> None:
        h = _sha256(PROTOCOL_NAME).digest()
        self.ck = h
        h = _sha256(h + PROLOGUE).digest()
        self.h = _sha256(h + responder_static).digest()

    def mix_hash(self, data: bytes) -> None:
        self.h = _sha256(self.h + data).digest()

    def mix_key(self, shared_secret: bytes) -> bytes:
        self.ck, temp_k = _hkdf(self.ck, shared_secret)
        return temp_k

    def encrypt_and_hash(self, key: bytes, nonce: int, plaintext: bytes) -> bytes:
        c = ChaCha20Poly1305(key).encrypt(_nonce(nonce), plaintext, self.h)
        self.mix_hash(c)
        return c

    def decrypt_and_hash(self, key: bytes, nonce: int, ciphertext: bytes, what: str) -> bytes:
        try:
            p = ChaCha20Poly1305(key).decrypt(_nonce(nonce), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError(f"{what}: bad MAC") from None
        self.mix_hash(ciphertext)
        return p

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf(self.ck, b"")


def _check_act(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise HandshakeError(f"{what}: expected {size} bytes, got {len(data)}")
    if data[0] != HANDSHAKE_VERSION:
        raise HandshakeError(f"{what}: bad version {data[0]}, expected {HANDSHAKE_VERSION}")


class Initiator:
    """The connecting side: knows whom it is calling (``remote_node_id``).

    ``ephemeral_key`` exists for the published test vectors; leave it unset
    in real use and a fresh key is drawn.
    """

    def __init__(
        self,
        local_key: PrivateKey,
        remote_node_id: bytes,
        *,
        ephemeral_key: PrivateKey | bytes | None = None,
    ) -> None:
        try:
            _parse_point(bytes(remote_node_id), "remote node id")
        except HandshakeError as exc:
            raise ValueError(str(exc)) from None
        self._local = local_key
        self._remote = bytes(remote_node_id)
        self._e = PrivateKey() if ephemeral_key is None else _as_private_key(ephemeral_key)
        self._ss = _SymmetricState(self._remote)
        self._step = "act_one"

    def _advance(self, expected: str, following: str) -> None:
        if self._step != expected:
            raise LocalProtocolError(f"initiator: {expected} called during {self._step}")
        self._step = following

    def act_one(self) -> bytes:
        """The 50-byte act one to send first."""
        self._advance("act_one", "act_two")
        ss = self._ss
        e_pub = self._e.public_key.format(compressed=True)
        ss.mix_hash(e_pub)
        temp_k1 = ss.mix_key(_ecdh(self._e, self._remote))
        c = ss.encrypt_and_hash(temp_k1, 0, b"")
        return bytes([HANDSHAKE_VERSION]) + e_pub + c

    def receive_act_two(self, act_two: bytes) -> tuple[bytes, NoiseSession]:
        """Check the responder's act two; return act three and the session.

        Raises ``HandshakeError`` on a wrong size, version, key or MAC.
        """
        self._advance("act_two", "failed")
        _check_act(act_two, ACT_TWO_SIZE, "act two")
        ss = self._ss
        re = _parse_point(bytes(act_two[1:34]), "act two")
        ss.mix_hash(re)
        temp_k2 = ss.mix_key(_ecdh(self._e, re))
        ss.decrypt_and_hash(temp_k2, 0, bytes(act_two[34:]), "act two")

        s_pub = self._local.public_key.format(compressed=True)
        c = ss.encrypt_and_hash(temp_k2, 1, s_pub)
        temp_k3 = ss.mix_key(_ecdh(self._local, re))
        t = ss.encrypt_and_hash(temp_k3, 0, b"")
        sk, rk = ss.split()
        self._step = "done"
        session = NoiseSession(
            remote_node_id=self._remote, send_key=sk, receive_key=rk, chaining_key=ss.ck
        )
        return bytes([HANDSHAKE_VERSION]) + c + t, session


class Responder:
    """The listening side: learns who called in act three."""

    def __init__(
        self, local_key: PrivateKey, *, ephemeral_key: PrivateKey | bytes | None = None
    ) -> None:
        self._local = local_key
        self._e = PrivateKey() if ephemeral_key is None else _as_private_key(ephemeral_key)
        self._ss = _SymmetricState(local_key.public_key.format(compressed=True))
        self._temp_k2 = b""
        self._step = "act_one"

    def _advance(self, expected: str) -> None:
        if self._step != expected:
            raise LocalProtocolError(f"responder: {expected} called during {self._step}")
        self._step = "failed"  # until the act has been fully checked

    def receive_act_one(self, act_one: bytes) -> bytes:
        """Check the initiator's act one; return the 50-byte act two.

        Raises ``HandshakeError`` on a wrong size, version, key or MAC.
        """
        self._advance("act_one")
        _check_act(act_one, ACT_ONE_SIZE, "act one")
        ss = self._ss
        re = _parse_point(bytes(act_one[1:34]), "act one")
        ss.mix_hash(re)
        temp_k1 = ss.mix_key(_ecdh(self._local, re))
        ss.decrypt_and_hash(temp_k1, 0, bytes(act_one[34:]), "act one")

        e_pub = self._e.public_key.format(compressed=True)
        ss.mix_hash(e_pub)
        self._temp_k2 = ss.mix_key(_ecdh(self._e, re))
        c = ss.encrypt_and_hash(self._temp_k2, 0, b"")
        self._step = "act_three"
        return bytes([HANDSHAKE_VERSION]) + e_pub + c

    def receive_act_three(self, act_three: bytes) -> NoiseSession:
        """Check act three; return the session bound to the initiator's key.

        Raises ``HandshakeError`` on a wrong size, version, key or MAC.
        """
        self._advance("act_three")
        _check_act(act_three, ACT_THREE_SIZE, "act three")
        ss = self._ss
        rs = ss.decrypt_and_hash(self._temp_k2, 1, bytes(act_three[1:50]), "act three static key")
        _parse_point(rs, "act three static key")
        temp_k3 = ss.mix_key(_ecdh(self._e, rs))
        ss.decrypt_and_hash(temp_k3, 0, bytes(act_three[50:]), "act three")
        rk, sk = ss.split()
        self._step = "done"
        return NoiseSession(remote_node_id=rs, send_key=sk, receive_key=rk, chaining_key=ss.ck)


class CipherState:
    """One direction's key, nonce and chaining key, rotated every 1000 nonces."""

    __slots__ = ("_aead", "_ck", "_key", "nonce")

    def __init__(self, key: bytes, chaining_key: bytes) -> None:
        self._ck = chaining_key
        self._key = key
        self._aead = ChaCha20Poly1305(key)
        self.nonce = 0

    @property
    def key(self) -> bytes:
        return self._key

    def encrypt(self, plaintext: bytes) -> bytes:
        """One AEAD encryption with the next nonce (empty associated data)."""
        n = self.nonce
        out = self._aead.encrypt(_nonce(n), plaintext, None)
        n += 1
        if n == ROTATE_AFTER:
            self._rotate()
        else:
            self.nonce = n
        return out

    def decrypt(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """One AEAD decryption with the next nonce; raises ``InvalidTag``."""
        n = self.nonce
        out = self._aead.decrypt(_nonce(n), ciphertext, None)
        n += 1
        if n == ROTATE_AFTER:
            self._rotate()
        else:
            self.nonce = n
        return out

    def _rotate(self) -> None:
        self._ck, self._key = _hkdf(self._ck, self._key)
        self._aead = ChaCha20Poly1305(self._key)
        self.nonce = 0


class NoiseSession:
    """The post-handshake cipher pair, plus a buffer that parses whole frames.

    Two ways to read: ``decrypt_length`` / ``decrypt_body`` for a caller that
    reads exact sizes itself, or ``receive_data`` / ``next_message`` to feed
    whatever the socket returned and pull out complete messages.  Use one or
    the other on a given session, not both.

    A frame that fails its MAC, or announces a length over ``MAX_FRAME``,
    breaks the session: the stream is out of sync and every later call raises
    ``TransportError`` (the transport then closes the connection).
    """

    def __init__(
        self, *, remote_node_id: bytes, send_key: bytes, receive_key: bytes, chaining_key: bytes
    ) -> None:
        self.remote_node_id = remote_node_id
        self.sender = CipherState(send_key, chaining_key)
        self.receiver = CipherState(receive_key, chaining_key)
        self._broken: str | None = None
        self._pending: int = -1  # body length announced by the last header, -1 if none
        self._buf = bytearray()
        self._pos = 0

    @property
    def broken(self) -> str | None:
        """Why the receiving side is unusable, or ``None`` if it is fine."""
        return self._broken

    # -- sending ----------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        """One wire frame: encrypted length (18 bytes) + encrypted body.

        Raises ``OversizeError`` (before touching any nonce) when the
        plaintext is longer than ``MAX_FRAME``.
        """
        size = len(plaintext)
        if size > MAX_FRAME:
            raise OversizeError(f"message of {size} bytes exceeds MAX_FRAME={MAX_FRAME}")
        s = self.sender
        n = s.nonce
        if n + 2 < ROTATE_AFTER:  # fast path: no rotation inside this frame
            aead = s._aead
            s.nonce = n + 2
            return aead.encrypt(_nonce(n), _pack_len(size), None) + aead.encrypt(
                _nonce(n + 1), plaintext, None
            )
        return s.encrypt(_pack_len(size)) + s.encrypt(plaintext)

    def encrypt_many(self, messages: list[bytes]) -> bytes:
        """Frames for several messages, concatenated for one write.

        All sizes are checked first, so an oversize message encrypts nothing.
        """
        for m in messages:
            if len(m) > MAX_FRAME:
                raise OversizeError(f"message of {len(m)} bytes exceeds MAX_FRAME={MAX_FRAME}")
        encrypt = self.encrypt
        return b"".join([encrypt(m) for m in messages])

    # -- receiving, exact reads ------------------------------------------

    def _fail(self, why: str) -> TransportError:
        self._broken = why
        return TransportError(why)

    def decrypt_length(self, header: bytes | bytearray | memoryview) -> int:
        """Decrypt an 18-byte header; return the body length that follows.

        The caller must then pass exactly ``length + 16`` bytes to
        ``decrypt_body``.  Raises ``TransportError`` on a bad MAC and
        ``OversizeError`` on a length over ``MAX_FRAME``.
        """
        if self._broken is not None:
            raise TransportError(f"session is broken: {self._broken}")
        if self._pending >= 0:
            raise LocalProtocolError("decrypt_length called while a body is pending")
        if len(header) != HEADER_SIZE:
            raise LocalProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(header)}")
        try:
            (size,) = _unpack_len(self.receiver.decrypt(header))
        except InvalidTag:
            raise self._fail("bad MAC on frame length") from None
        if size > MAX_FRAME:
            self._broken = f"frame length {size} exceeds MAX_FRAME={MAX_FRAME}"
            raise OversizeError(self._broken)
        self._pending = size
        return int(size)

    def decrypt_body(self, body: bytes | bytearray | memoryview) -> bytes:
        """Decrypt the body announced by the last ``decrypt_length``.

        Raises ``TransportError`` on a bad MAC.
        """
        if self._broken is not None:
            raise TransportError(f"session is broken: {self._broken}")
        if self._pending < 0:
            raise LocalProtocolError("decrypt_body called before decrypt_length")
        if len(body) != self._pending + MAC_SIZE:
            raise LocalProtocolError(
                f"body must be {self._pending + MAC_SIZE} bytes, got {len(body)}"
            )
        self._pending = -1
        try:
            return self.receiver.decrypt(body)
        except InvalidTag:
            raise self._fail("bad MAC on frame body") from None

    # -- receiving, buffered ---------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Append bytes read from the stream, in order."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> bytes | None:
        """The next complete message in the buffer, or ``None`` if more bytes are needed.

        Raises ``TransportError`` / ``OversizeError`` as ``decrypt_length`` and
        ``decrypt_body`` do.
        """
        # The same steps as decrypt_length + decrypt_body, inlined: this is
        # the receive hot path.  Slices are copies, not memoryviews: a live
        # view would pin the bytearray and make ``receive_data``'s compaction fail.
        if self._broken is not None:
            raise TransportError(f"session is broken: {self._broken}")
        buf = self._buf
        pos = self._pos
        size = self._pending
        receiver = self.receiver
        if size < 0:
            if len(buf) - pos < HEADER_SIZE:
                return None
            try:
                (size,) = _unpack_len(receiver.decrypt(buf[pos : pos + HEADER_SIZE]))
            except InvalidTag:
                raise self._fail("bad MAC on frame length") from None
            if size > MAX_FRAME:
                self._broken = f"frame length {size} exceeds MAX_FRAME={MAX_FRAME}"
                raise OversizeError(self._broken)
            pos += HEADER_SIZE
            self._pos = pos
            self._pending = size
        end = pos + size + MAC_SIZE
        if len(buf) < end:
            return None
        try:
            msg = receiver.decrypt(buf[pos:end])
        except InvalidTag:
            raise self._fail("bad MAC on frame body") from None
        self._pending = -1
        self._pos = end
        return msg

    def buffered(self) -> int:
        """Bytes received but not yet consumed as complete frames."""
        return len(self._buf) - self._pos
