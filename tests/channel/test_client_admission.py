"""Who may hold a link to a client: strangers (keys it holds no channel with) come to
open a channel, so they are let in, but only so many at once and only for so long;
its counterparties are never held back by them.  And the address it hands peers."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from test_transport import wait_dropped

from channel import codec
from channel.client import Client, open_client
from channel.codec import Open, Reject
from channel.eip712 import state_digest
from channel.errors import TransportError, UpdateRejected
from channel.keys import Signer
from channel.lane import CLOSED
from channel.limits import MAX_HANDSHAKES
from channel.links import MAX_PEER_ERRORS
from channel.state import ETH, Params, State
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


def _an_open(opener: Signer, us: Client, *, locked: int = 0) -> Open:
    params = Params.new(
        chain_id=1,
        adjudicator=b"\xad" * 20,
        participants=(opener.address, us.address),
        challenge_duration=60,
    )
    state = State.initial(params, [(ETH, 5, 5)])
    if locked:
        a = state.allocations[0]
        state = attrs.evolve(state, allocations=(attrs.evolve(a, locked=locked),))
    return Open(params=params, state=state, signature=opener.sign(state_digest(params, state)))


async def _next_of(conn: Connection, kinds: tuple[type, ...]) -> codec.Message:
    with trio.fail_after(5):
        while True:
            msg = codec.decode(await conn.receive())
            if isinstance(msg, kinds):
                return msg


async def test_an_open_refused_as_a_conflict_closes_the_channel_at_once(tmp_path: Path) -> None:
    """The peer refuses our Open with a "ProposalConflict" reason (which reads as
    retryable): the channel never existed, so it is closed at once, not left ``open``
    with no state, counted against our caps until a restart."""
    mallory = Signer.generate()  # test-only keys
    async with open_client(Signer.generate(), tmp_path / "bob.sqlite", update_timeout=1) as bob:
        conn = await connect(mallory, bob.peer_address())

        async def refuse_opens() -> None:
            while True:
                m = await _next_of(conn, (Open,))
                assert isinstance(m, Open)
                digest = state_digest(m.params, m.state)
                reject = Reject(
                    channel_id=m.params.channel_id, version=0, state_hash=digest,
                    reason="ProposalConflict: no",
                )
                await conn.send(codec.encode(reject))

        async with trio.open_nursery() as n:
            n.start_soon(refuse_opens)
            with trio.fail_after(5):
                await bob.wait_connected(mallory.node_id)
            with pytest.raises(UpdateRejected):
                await bob.open_channel(
                    mallory.node_id,
                    chain_id=1,
                    adjudicator=b"\xad" * 20,
                    challenge_duration=60,
                    balances=[(ETH, 5, 5)],
                )
            await bob.drain()
            (info,) = bob.channels()
            assert bob.status(info.channel_id) == CLOSED
            n.cancel_scope.cancel()
        await conn.aclose()


async def test_opens_are_judged_valid_first_and_refusals_count_against_the_link(
    tmp_path: Path,
) -> None:
    """An invalid Open (it locks funds) is refused before the open policy is asked; the
    policy's refusals count against the link like refused frames, so a key that sends
    Open after Open is cut off past ``MAX_PEER_ERRORS``; and a repeated Open for a
    channel we hold is answered once per link (each answer re-sends our proposals)."""
    asked: list[Params] = []

    def open_policy(params: Params, state: State) -> str | None:
        asked.append(params)
        return None if params.challenge_duration == 60 and not asked[:-1] else "no"

    stranger = Signer.generate()  # test-only keys
    path = tmp_path / "bob.sqlite"
    async with open_client(Signer.generate(), path, open_policy=open_policy) as bob:
        conn = await connect(stranger, bob.peer_address())
        await conn.send(codec.encode(_an_open(stranger, bob, locked=1)))
        assert isinstance(await _next_of(conn, (codec.Error,)), codec.Error)
        assert asked == []
        first = _an_open(stranger, bob)
        await conn.send(codec.encode(first))
        assert isinstance(await _next_of(conn, (codec.Accept,)), codec.Accept)
        await conn.send(codec.encode(first))  # repeated: answered with a Sync
        assert isinstance(await _next_of(conn, (codec.Sync,)), codec.Sync)
        await conn.send(codec.encode(first))  # again on the same link: refused
        error = await _next_of(conn, (codec.Error,))
        assert isinstance(error, codec.Error) and error.reason.startswith("StaleVersion")
        refused = 0
        with trio.fail_after(10):
            try:
                while True:
                    await conn.send(codec.encode(_an_open(stranger, bob)))
                    if isinstance(await _next_of(conn, (Reject,)), Reject):
                        refused += 1
            except TransportError:
                pass
        assert MAX_PEER_ERRORS - 2 <= refused <= MAX_PEER_ERRORS + 1
        await conn.aclose()


async def test_an_accepted_open_is_not_reported_latest_before_it_is_durable(
    tmp_path: Path,
) -> None:
    """While the commit of an accepted Open waits (the store is held, as by a WAL
    checkpoint), ``latest()`` says nothing: it reports only durable states, and a claim
    on chain or an export must not use a v0 a crash would lose.  Once committed, it is."""
    opener = Signer.generate()  # test-only keys
    async with open_client(Signer.generate(), tmp_path / "bob.sqlite") as bob:
        committer = bob.outbox._committer
        assert committer is not None
        conn = await connect(opener, bob.peer_address())
        msg = _an_open(opener, bob)
        cid = msg.params.channel_id
        assert committer._lock.acquire(blocking=False)
        try:
            await conn.send(codec.encode(msg))
            with trio.fail_after(5):
                while not bob.channels():  # noqa: ASYNC110 - the Open being handled
                    await trio.sleep(0.001)
            assert bob.latest(cid) is None
        finally:
            committer._lock.release()
        assert isinstance(await _next_of(conn, (codec.Accept,)), codec.Accept)
        latest = bob.latest(cid)
        assert latest is not None and latest.state == msg.state
        await conn.aclose()
