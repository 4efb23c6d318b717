"""Who may hold a link to a client: strangers (keys it holds no channel with) come to
open a channel, so they are let in, but only so many at once and only for so long;
its counterparties are never held back by them.  And the address it hands peers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_transport import wait_dropped

from channel.client import Client, open_client
from channel.errors import TransportError
from channel.keys import Signer
from channel.limits import MAX_HANDSHAKES
from channel.state import ETH
from channel.transport import Connection, connect

ADJ = b"\xad" * 20


async def _open(alice: Client, bob: Client) -> bytes:
    return await alice.open_channel(
        bob.peer_address(),
        chain_id=1,
        adjudicator=ADJ,
        challenge_duration=60,
        balances=[(ETH, 5, 5)],
    )


async def _closed_by_peer(conn: Connection, within: float) -> bool:
    """Whether the peer closes ``conn`` within ``within`` seconds (what it sends on the
    way, its resync messages, is read and dropped)."""
    with trio.move_on_after(within):
        try:
            while True:
                await conn.receive()
        except TransportError:
            return True
    return False


async def test_past_the_cap_on_strangers_a_new_one_closes_the_oldest(tmp_path: Path) -> None:
    """With ``max_strangers`` strangers linked, a new stranger's link closes the oldest
    one's (so idle keys cannot shut out a newcomer who comes to open a channel); a
    counterparty (a key with a channel) is never counted, and a stranger that opened a
    channel stops counting as one."""
    bob_key, alice_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await _open(alice, bob)
        bob.links.max_strangers = 2
        strangers = []
        for _ in range(2):
            strangers.append(await connect(Signer.generate(), bob.peer_address()))
            await trio.sleep(0.05)  # bob takes them in this order
        assert not any([await _closed_by_peer(c, 0.2) for c in strangers])
        third = await connect(Signer.generate(), bob.peer_address())
        assert await _closed_by_peer(strangers[0], 2)
        assert not await _closed_by_peer(strangers[1], 0.2)
        assert not await _closed_by_peer(third, 0.2)
        # A counterparty is never a stranger: alice comes back, pays, and closes no one.
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            await alice.connect(bob.peer_address())
            await alice.pay(cid, ETH, 1)
            assert not await _closed_by_peer(strangers[1], 0.2)
            # A stranger with a real client opens a channel (closing strangers[1] on
            # the way in); once it has one it no longer counts: the next stranger finds
            # room beside `third` and closes no one.
            async with open_client(Signer.generate(), tmp_path / "carol.sqlite") as carol:
                carol_cid = await _open(carol, bob)
                assert await _closed_by_peer(strangers[1], 2)
                fourth = await connect(Signer.generate(), bob.peer_address())
                assert not await _closed_by_peer(third, 0.3)
                assert not await _closed_by_peer(fourth, 0.2)
                await carol.pay(carol_cid, ETH, 1)
                await fourth.aclose()
        for c in (*strangers, third):
            await c.aclose()


@pytest.mark.parametrize("opens", [False, True])
async def test_a_strangers_link_lasts_the_grace_unless_a_channel_comes_of_it(
    tmp_path: Path, opens: bool
) -> None:
    """A stranger's link is closed after ``stranger_grace`` seconds; one that opened a
    channel within them is a counterparty by then and keeps its link."""
    bob_key, carol_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        bob.links.stranger_grace = 0.5
        if not opens:
            conn = await connect(carol_key, bob.peer_address())
            assert not await _closed_by_peer(conn, 0.3)
            assert await _closed_by_peer(conn, 2)
            return
        async with open_client(carol_key, tmp_path / "carol.sqlite") as carol:
            cid = await _open(carol, bob)
            await trio.sleep(1.0)
            assert bob.links.is_connected(carol_key.node_id)
            await carol.pay(cid, ETH, 1)


async def test_a_flood_of_stalled_sockets_never_keeps_a_counterparty_out(tmp_path: Path) -> None:
    """With the default cap (``MAX_HANDSHAKES``), MAX_HANDSHAKES + 72 sockets that
    never handshake: the oldest 72 are dropped at once, and the counterparty reconnects
    and pays while the rest still stall."""
    bob_key, alice_key = Signer.generate(), Signer.generate()  # test-only keys
    extra = 72
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await _open(alice, bob)
        addr = bob.peer_address()
        stalled = []
        for _ in range(MAX_HANDSHAKES + extra):
            stalled.append(await trio.open_tcp_stream(addr.host, addr.port))
        with trio.fail_after(5):  # long before the 10 s handshake timeout
            for s in stalled[:extra]:
                await wait_dropped(s)
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            with trio.fail_after(5):
                await alice.connect(addr)
                await alice.pay(cid, ETH, 1)
        for s in stalled:
            await s.aclose()


async def test_a_client_on_all_interfaces_hands_out_the_host_peers_reach_it_at(
    tmp_path: Path,
) -> None:
    """Listening on 0.0.0.0, ``peer_address()`` names the bound host, which no peer can
    dial; ``peer_address(host)`` names the one they can, with the listening port and
    key, and a peer opens a channel through it.  A host no address can carry is a
    ValueError."""
    bob_key = Signer.generate()  # test-only key
    async with open_client(bob_key, tmp_path / "bob.sqlite", host="0.0.0.0") as bob:
        bound = bob.peer_address()
        assert bound.host == "0.0.0.0"
        public = bob.peer_address("127.0.0.1")
        assert (public.node_id, public.port) == (bob_key.node_id, bound.port)
        assert str(public) == f"{bob_key.node_id.hex()}@127.0.0.1:{bound.port}"
        for bad in ("", "two words", "user@host"):
            with pytest.raises(ValueError, match="bad host"):
                bob.peer_address(bad)
        async with open_client(Signer.generate(), tmp_path / "alice.sqlite") as alice:
            cid = await alice.open_channel(
                public, chain_id=1, adjudicator=ADJ, challenge_duration=60, balances=[(ETH, 5, 5)]
            )
            await alice.pay(cid, ETH, 1)
