"""Links against real TCP: frames go out at once when the writer is idle, and a peer
that stops reading is disconnected once its queue overflows."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from test_transport import TEST_DEADLINE, start_server

from channel import links as links_module
from channel.errors import TransportError
from channel.keys import Signer
from channel.links import Links
from channel.transport import Connection, Handler

ALICE = Signer.generate()


@asynccontextmanager
async def linked(handler: Handler) -> AsyncIterator[tuple[Links, bytes]]:
    """A Links with a live link to a real server running ``handler``."""
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            _, address = await start_server(nursery, handler)
            links = Links(
                ALICE, on_frame=lambda n, f: True, on_connected=lambda n: None, timeout=5.0
            )
            links.attach(nursery)
            await links.connect(address)
            yield links, address.node_id
            nursery.cancel_scope.cancel()


async def test_queued_frames_arrive_in_order_whether_written_at_once_or_by_the_writer() -> None:
    """A burst larger than the socket buffer: the first frames are written at once by
    the queueing task, the rest by the peer's writer once the peer reads; none is lost
    or reordered."""
    got: list[bytes] = []
    reading = trio.Event()
    all_read = trio.Event()

    async def handler(conn: Connection) -> None:
        await reading.wait()
        while len(got) < 200:
            got.append(await conn.receive())
        all_read.set()

    async with linked(handler) as (links, node_id):
        blob = os.urandom(20_000)
        sent = [i.to_bytes(2, "big") + blob for i in range(200)]
        for i in range(0, 200, 4):
            assert links.queue(node_id, sent[i : i + 4], epoch=links.epoch(node_id))
        reading.set()
        await all_read.wait()
        assert got == sent


async def test_a_peer_that_stops_reading_is_dropped_once_its_queue_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The socket buffer fills, frames queue for the writer, and past SEND_QUEUE_LIMIT
    queue() refuses them and the link is closed (without the queueing task waiting)."""
    monkeypatch.setattr(links_module, "SEND_QUEUE_LIMIT", 50)
    closed = trio.Event()
    stop_sleeping = trio.Event()

    async def handler(conn: Connection) -> None:
        await stop_sleeping.wait()
        try:
            while True:
                await conn.receive()
        except TransportError:
            closed.set()

    async with linked(handler) as (links, node_id):
        blob = os.urandom(30_000)
        refused_at = None
        for i in range(1000):
            if not links.queue(node_id, [blob], epoch=links.epoch(node_id)):
                refused_at = i
                break
        assert refused_at is not None and refused_at > 50
        stop_sleeping.set()  # the peer reads what reached it, then sees the close
        await closed.wait()


async def test_frames_made_for_an_earlier_link_are_never_sent_on_a_later_one() -> None:
    """A frame made while link 1 was up is refused once link 2 has replaced it, and never
    reaches the peer: the new link's ``Sync`` carries everything, and a stale frame ahead
    of it would be judged against state the peer dropped on reconnect.  A frame made for
    the current link goes out."""
    conns: list[Connection] = []
    got: list[bytes] = []

    async def handler(conn: Connection) -> None:
        conns.append(conn)
        if len(conns) == 1:
            return  # the server hangs up the first link: the dialler redials
        while True:
            got.append(await conn.receive())

    async with linked(handler) as (links, node_id):
        first = links.epoch(node_id)
        assert first == 1
        with trio.fail_after(TEST_DEADLINE):
            while not (links.epoch(node_id) > first and links.is_connected(node_id)):  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert not links.queue(node_id, [b"made for link 1"], epoch=first)
        assert links.queue(node_id, [b"made for link 2"], epoch=links.epoch(node_id))
        with trio.fail_after(TEST_DEADLINE):
            while not got:  # noqa: ASYNC110 - the server task appends
                await trio.sleep(0.01)
        assert got == [b"made for link 2"]
