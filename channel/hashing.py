"""Keccak-256 on the fast backend (safe-pysha3), and address helpers.

``eth_hash.auto`` picks pycryptodome, about 4x slower; we call pysha3 directly.
"""

from __future__ import annotations

import sha3

ZERO_ADDRESS = b"\x00" * 20


def keccak(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's, not NIST SHA3-256)."""
    return sha3.keccak_256(data).digest()  # type: ignore[no-any-return]


def to_checksum(address: bytes) -> str:
    """EIP-55 mixed-case hex for a 20-byte address."""
    if len(address) != 20:
        raise ValueError(f"address must be 20 bytes, got {len(address)}")
    hex_addr = address.hex()
    digest = keccak(hex_addr.encode("ascii")).hex()
    out = "".join(
        c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(hex_addr)
    )
    return "0x" + out


def parse_address(value: str | bytes) -> bytes:
    """Accept 20 raw bytes or a 0x-hex string (any case) and return 20 bytes."""
    if isinstance(value, bytes):
        if len(value) != 20:
            raise ValueError(f"address must be 20 bytes, got {len(value)}")
        return value
    text = value[2:] if value.startswith(("0x", "0X")) else value
    raw = bytes.fromhex(text)
    if len(raw) != 20:
        raise ValueError(f"address must be 20 bytes, got {len(raw)}")
    return raw
