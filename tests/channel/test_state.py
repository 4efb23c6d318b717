"""Channel params: the random salt, and the channel id as the adjudicator computes it."""

from __future__ import annotations

from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from hypothesis import given
from hypothesis import strategies as st

from channel.state import Params

ALICE = b"\x11" * 20
BOB = b"\x22" * 20

#: ``Adjudicator.Params`` as ``abi.encode(params)`` lays it out (dispute/contracts/Adjudicator.sol)
PARAMS_ABI = "(uint256,address,address,address,bytes32,uint64,address)"


def _new(salt: bytes | None = None, app: bytes = b"\x00" * 20) -> Params:
    return Params.new(
        chain_id=31337,
        adjudicator=b"\xad" * 20,
        participants=(ALICE, BOB),
        challenge_duration=3600,
        app=app,
        salt=salt,
    )


def _contract_channel_id(
    chain_id: int,
    adjudicator: bytes,
    participants: tuple[bytes, bytes],
    salt: bytes,
    challenge_duration: int,
    app: bytes,
) -> bytes:
    """keccak256(abi.encode(params)), computed here from the contract's struct layout."""
    encoded = encode(
        [PARAMS_ABI],
        [
            (
                chain_id,
                to_checksum_address(adjudicator),
                to_checksum_address(participants[0]),
                to_checksum_address(participants[1]),
                salt,
                challenge_duration,
                to_checksum_address(app),
            )
        ],
    )
    # Seven static words: what the contract's _channelId hashes (calldatacopy of 0xe0 bytes).
    assert len(encoded) == 0xE0
    return keccak(encoded)


def test_params_new_draws_a_fresh_32_byte_salt() -> None:
    """Without a salt, each Params.new draws a fresh 32-byte one: two channels between the
    same parties with the same terms still get different salts and different ids."""
    salts = set()
    ids = set()
    for _ in range(8):
        p = _new()
        assert isinstance(p.salt, bytes) and len(p.salt) == 32
        salts.add(p.salt)
        ids.add(p.channel_id)
    assert len(salts) == 8
    assert len(ids) == 8


def test_params_new_keeps_a_given_salt() -> None:
    """A salt passed in is used as is (so a channel's params can be rebuilt exactly)."""
    salt = bytes(range(32))
    p, q = _new(salt=salt), _new(salt=salt)
    assert p.salt == q.salt == salt
    assert p.channel_id == q.channel_id


def test_random_salt_channel_id_is_the_contracts() -> None:
    """The id of a channel with a drawn salt is keccak256(abi.encode(params)) as the
    adjudicator's Params struct encodes it."""
    p = _new(app=b"\x0a" * 20)
    expected = _contract_channel_id(
        p.chain_id, p.adjudicator, p.participants, p.salt, p.challenge_duration, p.app
    )
    assert p.channel_id == expected


addresses = st.binary(min_size=20, max_size=20)


@given(
    chain_id=st.integers(0, 2**256 - 1),
    adjudicator=addresses,
    participants=st.tuples(addresses, addresses).filter(lambda t: t[0] != t[1]),
    salt=st.binary(min_size=32, max_size=32),
    challenge_duration=st.integers(0, 2**64 - 1),
    app=addresses,
)
def test_channel_id_is_keccak_of_abi_encoded_params(
    chain_id: int,
    adjudicator: bytes,
    participants: tuple[bytes, bytes],
    salt: bytes,
    challenge_duration: int,
    app: bytes,
) -> None:
    """For any params, channel_id == keccak256(abi.encode(chainId, adjudicator, participantA,
    participantB, salt, challengeDuration, app)), each field in the contract's order."""
    p = Params.new(
        chain_id=chain_id,
        adjudicator=adjudicator,
        participants=participants,
        challenge_duration=challenge_duration,
        app=app,
        salt=salt,
    )
    assert p.channel_id == _contract_channel_id(
        chain_id, adjudicator, participants, salt, challenge_duration, app
    )
