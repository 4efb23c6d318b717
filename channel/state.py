"""Channel params, states and signed states: frozen values with validation.

A channel has two participants (index 0 and 1) and fixed params; its id is
``keccak256(abi.encode(chainId, adjudicator, participantA, participantB, salt,
challengeDuration, app))``.  A state holds, per asset, the balance of each
participant and an amount locked in the channel's app; the app-data blob
describes what the locked amounts mean (empty for plain payment channels).

Pure: no I/O.  Digests and signatures live in ``channel.eip712`` and
``channel.keys``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, NewType, TypeAlias

import attrs
from eth_abi.abi import encode as abi_encode

from channel.errors import ConservationError
from channel.hashing import ZERO_ADDRESS, keccak

ChannelId = NewType("ChannelId", bytes)
Address = NewType("Address", bytes)

UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1
MAX_ASSETS = 16
MAX_APP_DATA = 16 * 1024
ETH = Address(ZERO_ADDRESS)

_Validator: TypeAlias = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _bytes_len(n: int) -> _Validator:
    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, bytes) or len(value) != n:
            raise ValueError(f"{attr.name} must be {n} bytes")

    return check


def _uint(bits: int) -> _Validator:
    limit = 2**bits - 1

    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if type(value) is not int or not 0 <= value <= limit:
            got = (
                f"an integer of {value.bit_length()} bits"
                if type(value) is int and value.bit_length() > 256
                else repr(value)[:40]  # a peer's value: short in an error message
            )
            raise ValueError(f"{attr.name} must be a uint{bits}, got {got}")

    return check


@attrs.frozen(kw_only=True)
class Params:
    """The fixed parameters of a channel; their ABI-encoding hashes to the channel id."""

    chain_id: int = attrs.field(validator=_uint(256))
    adjudicator: Address = attrs.field(validator=_bytes_len(20))
    participants: tuple[Address, Address] = attrs.field()
    salt: bytes = attrs.field(validator=_bytes_len(32))
    challenge_duration: int = attrs.field(validator=_uint(64))
    app: Address = attrs.field(default=ETH, validator=_bytes_len(20))
    channel_id: ChannelId = attrs.field(init=False, eq=False, repr=False)

    @participants.validator
    def _check_participants(self, attr: object, value: object) -> None:
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not all(isinstance(p, bytes) and len(p) == 20 for p in value)
        ):
            raise ValueError("participants must be two 20-byte addresses")
        if value[0] == value[1]:
            raise ValueError("participants must be distinct")

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "channel_id", ChannelId(keccak(self.abi_encode())))

    @classmethod
    def new(
        cls,
        *,
        chain_id: int,
        adjudicator: bytes,
        participants: tuple[bytes, bytes],
        challenge_duration: int,
        app: bytes = ZERO_ADDRESS,
        salt: bytes | None = None,
    ) -> Params:
        """Params with a fresh random 32-byte salt (unless one is given)."""
        return cls(
            chain_id=chain_id,
            adjudicator=Address(adjudicator),
            participants=(Address(participants[0]), Address(participants[1])),
            salt=os.urandom(32) if salt is None else salt,
            challenge_duration=challenge_duration,
            app=Address(app),
        )

    def abi_encode(self) -> bytes:
        return abi_encode(
            ["uint256", "address", "address", "address", "bytes32", "uint64", "address"],
            [
                self.chain_id,
                self.adjudicator,
                self.participants[0],
                self.participants[1],
                self.salt,
                self.challenge_duration,
                self.app,
            ],
        )

    def index_of(self, address: bytes) -> int:
        """0 or 1; raises ``ValueError`` for a stranger."""
        if address == self.participants[0]:
            return 0
        if address == self.participants[1]:
            return 1
        raise ValueError(f"{address.hex()} is not a participant")


@attrs.frozen(kw_only=True)
class Allocation:
    """What one asset's holding in the channel is split into."""

    asset: Address = attrs.field(validator=_bytes_len(20))
    balances: tuple[int, int] = attrs.field()
    locked: int = attrs.field(default=0, validator=_uint(256))

    @balances.validator
    def _check_balances(self, attr: object, value: object) -> None:
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not all(type(b) is int and 0 <= b <= UINT256_MAX for b in value)
        ):
            raise ValueError("balances must be two uint256 values")

    def __attrs_post_init__(self) -> None:
        # The adjudicator adds them up in uint256 (and reverts on overflow): a channel
        # holding more than that of one asset could never be funded nor settled.
        if self.total > UINT256_MAX:
            raise ValueError("an asset's balances and locked amount add up to more than uint256")

    @property
    def total(self) -> int:
        return self.balances[0] + self.balances[1] + self.locked

    @classmethod
    def unchecked(cls, asset: Address, balances: tuple[int, int], locked: int) -> Allocation:
        """Build from fields the caller has already checked one by one (the wire
        decoder): the same value, without running the validators a second time."""
        a = object.__new__(cls)
        object.__setattr__(a, "asset", asset)
        object.__setattr__(a, "balances", balances)
        object.__setattr__(a, "locked", locked)
        return a


@attrs.frozen(kw_only=True)
class State:
    """One version of a channel's split of funds.  Versions strictly increase."""

    channel_id: ChannelId = attrs.field(validator=_bytes_len(32))
    version: int = attrs.field(validator=_uint(64))
    allocations: tuple[Allocation, ...] = attrs.field()
    app_data: bytes = attrs.field(default=b"")
    is_final: bool = attrs.field(default=False)

    @allocations.validator
    def _check_allocations(self, attr: object, value: object) -> None:
        if not isinstance(value, tuple) or not all(isinstance(a, Allocation) for a in value):
            raise ValueError("allocations must be a tuple of Allocation")
        if not 1 <= len(value) <= MAX_ASSETS:
            raise ValueError(f"a state holds 1..{MAX_ASSETS} assets, got {len(value)}")
        assets = [a.asset for a in value]
        if len(set(assets)) != len(assets):
            raise ValueError("an asset appears twice in allocations")

    @app_data.validator
    def _check_app_data(self, attr: object, value: object) -> None:
        if not isinstance(value, bytes) or len(value) > MAX_APP_DATA:
            raise ValueError(f"app_data must be bytes of at most {MAX_APP_DATA}")

    @is_final.validator
    def _check_final(self, attr: object, value: object) -> None:
        if type(value) is not bool:
            raise ValueError("is_final must be a bool")

    @classmethod
    def unchecked(
        cls,
        channel_id: ChannelId,
        version: int,
        allocations: tuple[Allocation, ...],
        app_data: bytes,
        is_final: bool,
    ) -> State:
        """Build from fields the caller has already checked one by one (the wire
        decoder checks each, the asset count and that no asset repeats): the same
        value, without running the validators a second time."""
        st = object.__new__(cls)
        object.__setattr__(st, "channel_id", channel_id)
        object.__setattr__(st, "version", version)
        object.__setattr__(st, "allocations", allocations)
        object.__setattr__(st, "app_data", app_data)
        object.__setattr__(st, "is_final", is_final)
        return st

    @classmethod
    def initial(cls, params: Params, balances: Iterable[tuple[bytes, int, int]]) -> State:
        """Version 0 from ``(asset, balance_of_0, balance_of_1)`` triples."""
        return cls(
            channel_id=params.channel_id,
            version=0,
            allocations=tuple(
                Allocation(asset=Address(asset), balances=(b0, b1)) for asset, b0, b1 in balances
            ),
        )

    def totals(self) -> dict[bytes, int]:
        return {a.asset: a.total for a in self.allocations}

    def allocation(self, asset: bytes) -> Allocation:
        for a in self.allocations:
            if a.asset == asset:
                return a
        raise KeyError(asset.hex())

    def check_successor(self, new: State) -> None:
        """Raise ``ConservationError`` unless ``new`` keeps every asset's total.

        The asset list, its order and each asset's total are fixed for the life of
        a channel; the version check is the update machine's (it needs context).
        """
        if new.channel_id != self.channel_id:
            raise ConservationError("successor names another channel")
        if [a.asset for a in new.allocations] != [a.asset for a in self.allocations]:
            raise ConservationError(
                f"channel {self.channel_id.hex()[:16]} v{new.version}: asset list changed"
            )
        for old, nxt in zip(self.allocations, new.allocations, strict=True):
            if old.total != nxt.total:
                raise ConservationError(
                    f"channel {self.channel_id.hex()[:16]} v{new.version}: asset "
                    f"{old.asset.hex()} total {old.total} -> {nxt.total}"
                )


@attrs.frozen(kw_only=True)
class SignedState:
    """A state with the signatures collected so far (index = participant index)."""

    state: State
    signatures: tuple[bytes | None, bytes | None]

    @property
    def fully_signed(self) -> bool:
        return self.signatures[0] is not None and self.signatures[1] is not None
