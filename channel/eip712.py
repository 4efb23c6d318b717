"""EIP-712 typed-data digests of channel states, and their wallet JSON form.

Domain: ``EIP712Domain(string name,string version,uint256 chainId,address
verifyingContract)`` with name ``"optichannel"``, version ``"1"``, the
channel's chain id and its adjudicator address.

Types (the adjudicator hashes exactly these)::

    Allocation(address asset,uint256 balanceA,uint256 balanceB,uint256 locked)
    State(bytes32 channelId,uint64 version,Allocation[] allocations,bytes appData,bool isFinal)

``digest = keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(State))`` — the same
value a wallet's ``eth_signTypedData_v4`` signs over :func:`typed_data`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from channel.hashing import keccak, to_checksum
from channel.state import Params, State

DOMAIN_NAME = "optichannel"
DOMAIN_VERSION = "1"

_DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
_ALLOCATION_TYPE = b"Allocation(address asset,uint256 balanceA,uint256 balanceB,uint256 locked)"
_STATE_TYPE = (
    b"State(bytes32 channelId,uint64 version,Allocation[] allocations,bytes appData,bool isFinal)"
    + _ALLOCATION_TYPE
)
DOMAIN_TYPEHASH = keccak(_DOMAIN_TYPE)
ALLOCATION_TYPEHASH = keccak(_ALLOCATION_TYPE)
STATE_TYPEHASH = keccak(_STATE_TYPE)
_EMPTY_HASH = keccak(b"")
_FALSE = b"\x00" * 32
_TRUE = b"\x00" * 31 + b"\x01"


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


@lru_cache(maxsize=1024)
def domain_separator(chain_id: int, verifying_contract: bytes) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(DOMAIN_NAME.encode())
        + keccak(DOMAIN_VERSION.encode())
        + _word(chain_id)
        + b"\x00" * 12
        + verifying_contract
    )


def state_struct_hash(state: State) -> bytes:
    alloc_hashes = b"".join(
        keccak(
            ALLOCATION_TYPEHASH
            + b"\x00" * 12
            + a.asset
            + _word(a.balances[0])
            + _word(a.balances[1])
            + _word(a.locked)
        )
        for a in state.allocations
    )
    return keccak(
        STATE_TYPEHASH
        + state.channel_id
        + _word(state.version)
        + keccak(alloc_hashes)
        + (keccak(state.app_data) if state.app_data else _EMPTY_HASH)
        + (_TRUE if state.is_final else _FALSE)
    )


def state_digest(params: Params, state: State) -> bytes:
    """The 32-byte digest both participants sign for ``state`` of channel ``params``."""
    return keccak(
        b"\x19\x01"
        + domain_separator(params.chain_id, params.adjudicator)
        + state_struct_hash(state)
    )


def typed_data(params: Params, state: State) -> dict[str, Any]:
    """The ``eth_signTypedData_v4`` JSON object for ``state`` (JSON-serialisable).

    uint256 amounts are decimal strings so no JSON reader loses precision.
    """
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "State": [
                {"name": "channelId", "type": "bytes32"},
                {"name": "version", "type": "uint64"},
                {"name": "allocations", "type": "Allocation[]"},
                {"name": "appData", "type": "bytes"},
                {"name": "isFinal", "type": "bool"},
            ],
            "Allocation": [
                {"name": "asset", "type": "address"},
                {"name": "balanceA", "type": "uint256"},
                {"name": "balanceB", "type": "uint256"},
                {"name": "locked", "type": "uint256"},
            ],
        },
        "primaryType": "State",
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": params.chain_id,
            "verifyingContract": to_checksum(params.adjudicator),
        },
        "message": {
            "channelId": "0x" + state.channel_id.hex(),
            "version": state.version,
            "allocations": [
                {
                    "asset": to_checksum(a.asset),
                    "balanceA": str(a.balances[0]),
                    "balanceB": str(a.balances[1]),
                    "locked": str(a.locked),
                }
                for a in state.allocations
            ],
            "appData": "0x" + state.app_data.hex(),
            "isFinal": state.is_final,
        },
    }
