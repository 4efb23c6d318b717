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

from channel.errors import InvalidSignature
from channel.hashing import keccak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


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
        """Sign a 32-byte digest; libsecp256k1 always produces low-s."""
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        sig = self._key.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes([sig[64] + 27])


def recover(digest: bytes, signature: bytes) -> bytes:
    """The address that signed ``digest``; raises ``InvalidSignature``."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes, got {len(signature)}")
    v = signature[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v must be 27 or 28, got {v}")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < r < SECP256K1_N:
        raise InvalidSignature("signature r out of range")
    if not 0 < s <= HALF_N:
        raise InvalidSignature("signature s is zero or high (EIP-2 requires low-s)")
    try:
        pub = PublicKey.from_signature_and_message(
            signature[:64] + bytes([v - 27]), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises ValueError/Exception on bad points
        raise InvalidSignature(f"signature does not recover: {exc}") from None
    return address_of(pub)


def verify(digest: bytes, signature: bytes, address: bytes) -> None:
    """Raise ``InvalidSignature`` unless ``signature`` over ``digest`` is by ``address``."""
    got = recover(digest, signature)
    if got != address:
        raise InvalidSignature(f"signed by {got.hex()}, expected {address.hex()}")
