"""EIP-1559 (type 2) transactions: build, sign with eth-account, hash.

The submitter decides nonce, gas and fees; this module only turns them into the raw bytes
a node accepts and the hash it will report.  No I/O.
"""

from __future__ import annotations

from typing import Any

import attrs
from eth_account import Account

from channel.hashing import to_checksum
from channel.keys import Signer
from dispute.policy import Fees

KeyLike = bytes | Signer
"""A 32-byte secp256k1 private key, or a ``channel.keys.Signer``."""


@attrs.frozen(kw_only=True)
class TxParams:
    """Everything a type 2 transaction carries, except the signature."""

    chain_id: int = attrs.field(validator=attrs.validators.gt(0))
    nonce: int = attrs.field(validator=attrs.validators.ge(0))
    gas: int = attrs.field(validator=attrs.validators.gt(0))
    fees: Fees
    to: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    value: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    data: bytes = b""

    @to.validator
    def _check_to(self, attr: object, value: bytes) -> None:
        if len(value) != 20:
            raise ValueError(f"to must be a 20-byte address, got {len(value)} bytes")

    def as_dict(self) -> dict[str, Any]:
        """The dict ``Account.sign_transaction`` takes (type 2)."""
        return {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": self.nonce,
            "gas": self.gas,
            "maxFeePerGas": self.fees.max_fee_per_gas,
            "maxPriorityFeePerGas": self.fees.max_priority_fee_per_gas,
            "to": to_checksum(self.to),
            "value": self.value,
            "data": self.data,
            "accessList": [],
        }


@attrs.frozen(kw_only=True)
class SignedTx:
    """A signed transaction: the bytes for ``eth_sendRawTransaction`` and its hash."""

    params: TxParams
    raw: bytes = attrs.field(repr=False)
    tx_hash: bytes


def secret_of(key: KeyLike) -> bytes:
    """The 32-byte private key of ``key``; raises ``ValueError`` on a malformed key."""
    secret = key.secret_bytes() if isinstance(key, Signer) else key
    if len(secret) != 32:
        raise ValueError("a private key is 32 bytes")
    return secret


def address_of(key: KeyLike) -> bytes:
    """The 20-byte address that ``key`` sends from."""
    if isinstance(key, Signer):
        return key.address
    return Signer.from_bytes(secret_of(key)).address


def sign(params: TxParams, key: KeyLike) -> SignedTx:
    """Sign ``params`` with ``key``; raises ``ValueError`` on a malformed key."""
    signed = Account.sign_transaction(params.as_dict(), secret_of(key))
    return SignedTx(params=params, raw=bytes(signed.raw_transaction), tx_hash=bytes(signed.hash))
