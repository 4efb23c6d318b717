"""The lane's window: narrowed by a conflict, widened again by co-signed proposals."""

from __future__ import annotations

from channel.keys import Signer
from channel.lane import CONFLICT_WINDOW, Lane
from channel.machine import ChannelMachine
from channel.state import ETH, Params, State

ALICE = Signer.from_bytes(b"\x01" * 32)  # test-only keys
BOB = Signer.from_bytes(b"\x02" * 32)


def _lane(window: int) -> Lane:
    params = Params.new(
        chain_id=31337,
        adjudicator=b"\xad" * 20,
        participants=(ALICE.address, BOB.address),
        challenge_duration=3600,
    )
    machine, _ = ChannelMachine.open(
        params=params,
        me=0,
        sign=ALICE.sign,
        initial=State.initial(params, [(ETH, 10, 10)]),
        update_id=1,
        window=window,
    )
    return Lane(machine, BOB.node_id, None)


async def test_conflict_narrows_the_window_and_successes_widen_it_back() -> None:
    """After a conflict at most CONFLICT_WINDOW proposals go out at once; each co-signed
    proposal adds one, never beyond the configured window."""
    lane = _lane(256)
    lane.note_conflict()
    assert lane.machine.window == CONFLICT_WINDOW
    lane.note_conflict()  # a second conflict does not shrink it further
    assert lane.machine.window == CONFLICT_WINDOW
    for _ in range(10):
        lane.note_accepted()
    assert lane.machine.window == CONFLICT_WINDOW + 10
    for _ in range(1000):
        lane.note_accepted()
    assert lane.machine.window == 256


async def test_a_window_below_the_conflict_window_is_kept() -> None:
    """A client configured with a small window keeps it through conflicts."""
    lane = _lane(4)
    lane.note_conflict()
    assert lane.machine.window == 4
    lane.note_accepted()
    assert lane.machine.window == 4
