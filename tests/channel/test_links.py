"""Links against real TCP: frames go out at once when the writer is idle, and a peer
that stops reading is disconnected once its queue overflows."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from test_transport import TEST_DEADLINE, start_server

from channel import links as links_module
from channel.errors import TransportError
from channel.keys import Signer
from channel.links import Links
from channel.transport import Connection, Handler, PeerAddress, connect, serve

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


def _links(signer: Signer, ups: list[bytes] | None = None) -> Links:
    return Links(
        signer,
        on_frame=lambda n, f: True,
        on_connected=lambda n: ups.append(n) if ups is not None else None,
        timeout=5.0,
    )


async def _still_open(conn: Connection, wait: float) -> bool:
    """True if the far side has not closed ``conn`` within ``wait`` seconds."""
    with trio.move_on_after(wait):
        try:
            while True:
                await conn.receive()
        except TransportError:
            return False
    return True


async def _serve_links(nursery: trio.Nursery, links: Links, key: Signer) -> PeerAddress:
    """Serve ``links.accept`` under ``key`` on a free port; its address."""
    links.attach(nursery)
    listening = await nursery.start(partial(serve, key, links.accept))
    return PeerAddress(node_id=key.node_id, host="127.0.0.1", port=listening.port)


async def _dial_at_once(
    address: PeerAddress, keys: list[Signer]
) -> tuple[list[Connection], list[bool]]:
    """One connection per entry of ``keys``, all dialled at once; then, for each, whether
    it is still open a second later (the far side closes those it replaced)."""
    conns: list[Connection] = []

    async def dial(key: Signer) -> None:
        conns.append(await connect(key, address))

    async with trio.open_nursery() as dials:
        for key in keys:
            dials.start_soon(dial, key)
    open_now = [False] * len(conns)

    async def probe(i: int) -> None:
        open_now[i] = await _still_open(conns[i], 1.0)

    async with trio.open_nursery() as probes:
        for i in range(len(conns)):
            probes.start_soon(probe, i)
    return conns, open_now


async def test_many_links_from_one_key_at_once_leave_exactly_one_running() -> None:
    """Ten connections from one key come up at once: each replaces the link before it,
    and when they have settled exactly one runs, the one ``peers`` tracks.  (Each waited
    for the link before it to close and then registered without looking again: the
    others ran on, untracked, and no cap on links counted them.)"""
    bob, alice = Signer.generate(), Signer.generate()  # test-only keys
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            links = _links(bob)
            address = await _serve_links(nursery, links, bob)
            conns, open_now = await _dial_at_once(address, [alice] * 10)
            assert sum(open_now) == 1, f"{sum(open_now)} of 10 links from one key still run"
            assert alice.node_id in links.peers
            for c in conns:
                await c.aclose()
            nursery.cancel_scope.cancel()


async def test_two_sides_that_dial_each_other_settle_on_one_link() -> None:
    """Both sides know the other's address and run a redial loop (both hold a channel
    they dialled for): the links come up a few times at most and one stays, the one
    the lower node id dialled.  (Each new link replaced the other side's, which
    redialled at once: 160 link-ups in 2 s.)"""
    a_key, b_key = Signer.generate(), Signer.generate()  # test-only keys
    ups_a: list[bytes] = []
    ups_b: list[bytes] = []
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            a, b = _links(a_key, ups_a), _links(b_key, ups_b)
            a.attach(nursery)
            b.attach(nursery)
            la = await nursery.start(partial(serve, a_key, a.accept))
            lb = await nursery.start(partial(serve, b_key, b.accept))
            a.redial(PeerAddress(node_id=b_key.node_id, host="127.0.0.1", port=lb.port))
            b.redial(PeerAddress(node_id=a_key.node_id, host="127.0.0.1", port=la.port))
            await trio.sleep(2.0)
            assert len(ups_a) <= 4 and len(ups_b) <= 4, (
                f"links came up {len(ups_a)} and {len(ups_b)} times in 2 s"
            )
            pa, pb = a.peers.get(b_key.node_id), b.peers.get(a_key.node_id)
            assert pa is not None and pb is not None, "no link is up"
            lower_dialled = a_key.node_id < b_key.node_id
            assert pa.dialled == lower_dialled and pb.dialled != lower_dialled
            # the one link carries frames both ways
            assert a.queue(b_key.node_id, [b"ping"], epoch=a.epoch(b_key.node_id))
            nursery.cancel_scope.cancel()


async def test_a_pile_of_connections_from_one_key_costs_one_replacement_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 connections from one key at once: each closes at most a few others (the
    newest claims the key, older waiters give way), where each used to close every
    link that registered while it waited (20,000 closes, seconds of CPU, for any key)."""
    closes = 0
    real_close = trio.aclose_forcefully

    async def counting(resource: trio.abc.AsyncResource) -> None:
        nonlocal closes
        closes += 1
        await real_close(resource)

    monkeypatch.setattr(links_module.trio, "aclose_forcefully", counting)
    bob, alice = Signer.generate(), Signer.generate()  # test-only keys
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            links = _links(bob)
            address = await _serve_links(nursery, links, bob)
            conns, open_now = await _dial_at_once(address, [alice] * 200)
            assert sum(open_now) == 1
            # five or so each (the replacement, its own close, the server's): linear, not N²
            assert closes <= 10 * len(conns), f"{closes} closes for {len(conns)} connections"
            for c in conns:
                await real_close(c)
            nursery.cancel_scope.cancel()


async def test_strangers_never_hold_more_links_than_the_cap() -> None:
    """Twelve stranger keys, each dialling twice at once, against a cap of 4: once they
    have settled at most 4 keys are counted and at most 4 of their connections are open
    (each key's one link: an evicted key loses every connection, the one waiting too)."""
    bob = Signer.generate()  # test-only keys
    keys = [Signer.generate() for _ in range(12)]
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            links = Links(
                bob,
                on_frame=lambda n, f: True,
                on_connected=lambda n: None,
                timeout=5.0,
                known_peers=lambda: (),
            )
            links.max_strangers = 4
            address = await _serve_links(nursery, links, bob)
            conns, open_now = await _dial_at_once(address, [k for k in keys for _ in (0, 1)])
            assert len(links._strangers) <= 4
            assert sum(open_now) <= 4, f"{sum(open_now)} stranger connections open, cap 4"
            assert len(links.peers) <= 4
            for c in conns:
                await c.aclose()
            nursery.cancel_scope.cancel()
