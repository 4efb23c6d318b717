"""secp256k1 signing and recovery over coincurve, Ethereum-style.

Signatures are 65 bytes ``r ‖ s ‖ v`` with ``v`` in {27, 28} and ``s`` in the
lower half of the curve order (EIP-2); anything else is refused, exactly as
the adjudicator refuses it.  The same key identifies a party on the BOLT 8
transport (its compressed public key) and on chain (its address).
"""

from __future__ import annotations

import os

import attrs
from coincurve import PrivateKey, PublicKey
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

from channel.errors import InvalidSignature
from channel.hashing import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2

# The hot path (a sign and a recover per update per party) calls libsecp256k1 through
# coincurve's own cffi binding directly: the same C functions coincurve's methods call,
# without their per-call Python wrappers and intermediate objects.
_CTX = GLOBAL_CONTEXT.ctx
_UNCOMPRESSED = lib.SECP256K1_EC_UNCOMPRESSED
_HALF_N_BYTES = HALF_N.to_bytes(32, "big")
_ZERO32 = bytes(32)
_N_BYTES = SECP256K1_N.to_bytes(32, "big")


def address_of(pubkey: PublicKey) -> bytes:
    """The 20-byte Ethereum address of a public key."""
    return keccak(pubkey.format(compressed=False)[1:])[-20:]


def address_of_node_id(node_id: bytes) -> bytes:
    """The address behind a 33-byte compressed public key (a BOLT 8 node id)."""
    return address_of(PublicKey(node_id))


@attrs.frozen
class Signer:
    """A private key that signs 32-byte digests.  Keep it out of logs: no repr."""

    _key: PrivateKey = attrs.field(repr=False)
    address: bytes = attrs.field(init=False)
    node_id: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        pub = self._key.public_key
        object.__setattr__(self, "address", address_of(pub))
        object.__setattr__(self, "node_id", pub.format(compressed=True))

    @classmethod
    def generate(cls) -> Signer:
        return cls(PrivateKey(os.urandom(32)))

    @classmethod
    def from_bytes(cls, secret: bytes) -> Signer:
        return cls(PrivateKey(secret))

    @property
    def private_key(self) -> PrivateKey:
        return self._key

    def secret_bytes(self) -> bytes:
        return self._key.secret

    def sign(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest (RFC 6979 nonce); libsecp256k1 always produces low-s."""
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        rsig = ffi.new("secp256k1_ecdsa_recoverable_signature *")
        if not lib.secp256k1_ecdsa_sign_recoverable(
            _CTX, rsig, digest, self._key.secret, ffi.NULL, ffi.NULL
        ):
            raise ValueError("signing failed (invalid private key)")
        out = ffi.new("unsigned char[64]")
        recid = ffi.new("int *")
        lib.secp256k1_ecdsa_recoverable_signature_serialize_compact(_CTX, out, recid, rsig)
        return bytes(ffi.buffer(out, 64)) + bytes((recid[0] + 27,))


def recover(digest: bytes, signature: bytes) -> bytes:
    """The address that signed ``digest``; raises ``InvalidSignature``."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes, got {len(signature)}")
    v = signature[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v must be 27 or 28, got {v}")
    r = signature[:32]
    s = signature[32:64]
    # Big-endian byte strings of equal length compare like the integers they encode.
    if not _ZERO32 < r < _N_BYTES:
        raise InvalidSignature("signature r out of range")
    if not _ZERO32 < s <= _HALF_N_BYTES:
        raise InvalidSignature("signature s is zero or high (EIP-2 requires low-s)")
    if len(digest) != 32:
        raise InvalidSignature("digest must be 32 bytes")
    rsig = ffi.new("secp256k1_ecdsa_recoverable_signature *")
    pub = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ecdsa_recoverable_signature_parse_compact(
        _CTX, rsig, signature[:64], v - 27
    ) or not lib.secp256k1_ecdsa_recover(_CTX, pub, rsig, digest):
        raise InvalidSignature("signature does not recover to a public key")
    out = ffi.new("unsigned char[65]")
    outlen = ffi.new("size_t *", 65)
    lib.secp256k1_ec_pubkey_serialize(_CTX, out, outlen, pub, _UNCOMPRESSED)
    return keccak(ffi.buffer(out, 65)[1:])[-20:]


def verify(digest: bytes, signature: bytes, address: bytes) -> None:
    """Raise ``InvalidSignature`` unless ``signature`` over ``digest`` is by ``address``."""
    got = recover(digest, signature)
    if got != address:
        raise InvalidSignature(f"signed by {got.hex()}, expected {address.hex()}")
