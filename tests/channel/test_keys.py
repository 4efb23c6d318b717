"""The direct libsecp256k1 calls in ``channel.keys`` agree with coincurve's own API."""

from __future__ import annotations

import contextlib

import pytest
from coincurve import PrivateKey, PublicKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from channel.errors import InvalidSignature
from channel.keys import SECP256K1_N, Signer, address_of, recover

secrets = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda n: n.to_bytes(32, "big"))
digests = st.binary(min_size=32, max_size=32)


@settings(max_examples=200)
@given(secret=secrets, digest=digests)
def test_sign_equals_coincurve_and_recovers_to_the_signer(secret: bytes, digest: bytes) -> None:
    """Our signature is coincurve's deterministic (RFC 6979) one with v + 27, and both our
    recovery and coincurve's give the signer's address."""
    signer = Signer.from_bytes(secret)
    sig = signer.sign(digest)
    ref = PrivateKey(secret).sign_recoverable(digest, hasher=None)
    assert sig == ref[:64] + bytes([ref[64] + 27])
    assert recover(digest, sig) == signer.address
    pub = PublicKey.from_signature_and_message(ref, digest, hasher=None)
    assert address_of(pub) == signer.address


@given(digest=digests, other=digests)
def test_recover_of_another_digest_gives_another_address(digest: bytes, other: bytes) -> None:
    """A signature checked against a different digest never yields the signer."""
    signer = Signer.from_bytes(b"\x07" * 32)  # test-only key
    sig = signer.sign(digest)
    assume(other != digest)
    with contextlib.suppress(InvalidSignature):  # no point recovers: also a refusal
        assert recover(other, sig) != signer.address


def test_wrong_digest_length_is_refused() -> None:
    """A digest that is not 32 bytes is an InvalidSignature, never a crash in C."""
    sig = Signer.from_bytes(b"\x07" * 32).sign(b"\x01" * 32)
    for bad in (b"", b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(InvalidSignature):
            recover(bad, sig)
