"""The receive side's bookkeeping of what one read brought (pure logic, a recording
double for the outbox)."""

from __future__ import annotations

from typing import Any

from channel import codec
from channel.codec import Error
from channel.inbound import Inbound
from channel.keys import Signer

PEER = b"\x02" + b"\x11" * 32


class RecordingOutbox:
    def __init__(self) -> None:
        self.flushes = 0
        self.sends: list[tuple[bytes, bytes]] = []

    def emit(self, peer: bytes, outputs: Any) -> None:
        pass

    def add_send(self, peer: bytes, frame: bytes) -> None:
        self.sends.append((peer, frame))

    def flush_now(self) -> None:
        self.flushes += 1


def make_inbound() -> tuple[Inbound, RecordingOutbox]:
    outbox = RecordingOutbox()
    inbound = Inbound(
        signer=Signer.generate(),
        channels={},
        outbox=outbox,  # type: ignore[arg-type]
        policy=lambda *args: None,
        open_policy=None,
        window=8,
        require_funding=False,
        pump=lambda ch: None,
    )
    return inbound, outbox


FRAME = codec.encode(Error(reason="a peer's complaint"))


def test_one_frame_per_read_is_lock_step_and_flushes_inline() -> None:
    inbound, outbox = make_inbound()
    assert inbound.on_frame(PEER, FRAME)
    inbound.on_idle(PEER)
    assert outbox.flushes == 1
    assert inbound.on_frame(PEER, FRAME) and inbound.on_frame(PEER, FRAME)
    inbound.on_idle(PEER)  # two frames in one read: left to the flusher
    assert outbox.flushes == 1


def test_a_new_link_forgets_what_the_last_reader_left_half_counted() -> None:
    inbound, outbox = make_inbound()
    # The old link's reader handled two frames, then the link failed before its idle.
    assert inbound.on_frame(PEER, FRAME) and inbound.on_frame(PEER, FRAME)
    inbound.on_connected(PEER)
    # On the new link the first read brings one frame: lock-step again.
    assert inbound.on_frame(PEER, FRAME)
    inbound.on_idle(PEER)
    assert outbox.flushes == 1
