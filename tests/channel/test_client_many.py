"""The client with many channels in one process, and its shutdown with pays in flight:
real TCP sockets, real SQLite stores, every party its own ``open_client``."""

from __future__ import annotations

import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import cbor2
import trio
import trio.lowlevel

from channel import codec
from channel.client import Client, open_client
from channel.eip712 import state_digest
from channel.keys import Signer, recover
from channel.state import ETH, SignedState
from channel.storeplan import COSIGNED, IN_FLIGHT

ADJ = b"\xad" * 20


# -- helpers, after those of tests/channel/test_client.py (the test modules are not a
#    package here, so they are not imported from there) --------------------------------


async def _open(maker: Client, peer: Client, ours: int, theirs: int) -> bytes:
    """The maker opens an ETH channel to ``peer`` with ``(ours, theirs)`` balances."""
    return await maker.open_channel(
        peer.peer_address(),
        chain_id=31337,
        adjudicator=ADJ,
        challenge_duration=60,
        balances=[(ETH, ours, theirs)],
    )


def _settled(a: Client, b: Client, cid: bytes) -> bool:
    """Both sides hold the same latest co-signed state and nothing of either is in flight."""
    la, lb = a.latest(cid), b.latest(cid)
    if la is None or la != lb:
        return False
    infos = [i for c in (a, b) for i in c.channels() if i.channel_id == cid]
    return len(infos) == 2 and all(i.in_flight == 0 for i in infos)


async def _wait_settled(a: Client, b: Client, cids: list[bytes]) -> None:
    with trio.fail_after(5):
        while not all(_settled(a, b, cid) for cid in cids):  # noqa: ASYNC110 - two views
            await trio.sleep(0.01)


async def _wait_connected(a: Client, b: Client) -> None:
    with trio.fail_after(5):
        await a.wait_connected(b.node_id)
        await b.wait_connected(a.node_id)


@attrs.frozen
class FileLatest:
    """A channel's row in a store file and the state row its ``latest_version`` names."""

    latest_version: int | None
    status: int | None
    signed: SignedState | None


def _file_latest(path: Path) -> dict[bytes, FileLatest]:
    """Each channel's latest co-signed state as the store file holds it, read by a
    second, read-only connection: what a restart would load."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT c.channel_id, c.latest_version, s.status, s.state, s.sig0, s.sig1 "
            "FROM channels c LEFT JOIN states s "
            "ON s.channel_id = c.channel_id AND s.version = c.latest_version"
        ).fetchall()
    finally:
        db.close()
    out = {}
    for cid, version, status, blob, sig0, sig1 in rows:
        signed = None
        if blob is not None:
            signed = SignedState(
                state=codec.state_from_wire(cbor2.loads(blob)),
                signatures=(
                    None if sig0 is None else bytes(sig0),
                    None if sig1 is None else bytes(sig1),
                ),
            )
        out[bytes(cid)] = FileLatest(latest_version=version, status=status, signed=signed)
    return out


def _in_flight_rows(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(
            db.execute("SELECT count(*) FROM states WHERE status = ?", (IN_FLIGHT,)).fetchone()[0]
        )
    finally:
        db.close()


def _assert_file_holds(path: Path, expected: dict[bytes, SignedState]) -> None:
    """The store file holds exactly ``expected`` as each channel's latest co-signed state."""
    rows = _file_latest(path)
    assert set(rows) == set(expected)
    for cid, signed in expected.items():
        row = rows[cid]
        assert row.latest_version == signed.state.version, cid.hex()[:16]
        assert row.status == COSIGNED, cid.hex()[:16]
        assert row.signed == signed, cid.hex()[:16]


def _latest(client: Client, cid: bytes) -> SignedState:
    latest = client.latest(cid)
    assert latest is not None
    return latest


def _version(client: Client, cid: bytes) -> int:
    return _latest(client, cid).state.version


def _balances(client: Client, cid: bytes) -> tuple[int, int]:
    (alloc,) = _latest(client, cid).state.allocations
    return alloc.balances


# -- many channels in one process ---------------------------------------------------


@attrs.frozen
class Spec:
    peer: int  # index of the peer client
    ours: int  # the maker's opening balance
    theirs: int  # the peer's opening balance
    maker_pays: tuple[int, int]  # (amount, count) the maker pays the peer
    peer_pays: tuple[int, int]  # (amount, count) the peer pays the maker


# Five peers, and a second channel to peer 0; amounts differ on every channel, and
# peer 0 pays on both of its channels (different amounts), so that a pay applied to
# the wrong channel shows in the balances.
SPECS = [
    Spec(0, 10_000, 5_000, (3, 30), (2, 15)),
    Spec(1, 11_000, 5_100, (5, 30), (0, 0)),
    Spec(2, 12_000, 5_200, (7, 30), (4, 20)),
    Spec(3, 13_000, 5_300, (11, 30), (0, 0)),
    Spec(4, 14_000, 5_400, (13, 30), (6, 10)),
    Spec(0, 15_000, 5_500, (17, 30), (9, 25)),
]
N_PEERS = 5


def _expected(spec: Spec) -> tuple[int, int]:
    """The maker's and the peer's balances once every pay of ``spec`` landed."""
    net = spec.maker_pays[0] * spec.maker_pays[1] - spec.peer_pays[0] * spec.peer_pays[1]
    return spec.ours - net, spec.theirs + net


async def test_many_channels_concurrent_pays_both_ways_no_cross_talk_and_restart(
    tmp_path: Path,
) -> None:
    """One maker with channels to five peers (two to one of them), each peer its own
    client and store: concurrent pays on every channel from both sides all land on their
    own channel, both sides end on the same co-signed state, the maker's store file holds
    each latest, and a restart from that file lists every channel as it was and pays on
    each again."""
    maker_key = Signer.generate()  # test-only keys
    peer_keys = [Signer.generate() for _ in range(N_PEERS)]
    maker_path = tmp_path / "maker.sqlite"
    async with AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(
                open_client(k, tmp_path / f"peer{i}.sqlite", update_timeout=5)
            )
            for i, k in enumerate(peer_keys)
        ]
        async with open_client(maker_key, maker_path, update_timeout=5) as maker:
            cids: list[bytes] = [b""] * len(SPECS)

            async def open_one(i: int, spec: Spec) -> None:
                cids[i] = await _open(maker, peers[spec.peer], spec.ours, spec.theirs)

            with trio.fail_after(5):
                async with trio.open_nursery() as n:
                    for i, spec in enumerate(SPECS):
                        n.start_soon(open_one, i, spec)
            assert len(set(cids)) == len(SPECS)
            # Each peer knows exactly its own channels, the maker all of them.
            assert {i.channel_id for i in maker.channels()} == set(cids)
            for p, peer in enumerate(peers):
                mine = {cid for cid, s in zip(cids, SPECS, strict=True) if s.peer == p}
                assert {i.channel_id for i in peer.channels()} == mine

            results: dict[bytes, list[SignedState]] = {cid: [] for cid in cids}

            async def pay(client: Client, cid: bytes, amount: int) -> None:
                results[cid].append(await client.pay(cid, ETH, amount))

            with trio.fail_after(8):
                async with trio.open_nursery() as n:
                    # Interleaved, so that every channel is busy from both sides at once.
                    for k in range(max(max(s.maker_pays[1], s.peer_pays[1]) for s in SPECS)):
                        for cid, spec in zip(cids, SPECS, strict=True):
                            peer = peers[spec.peer]
                            if k < spec.maker_pays[1]:
                                n.start_soon(pay, maker, cid, spec.maker_pays[0])
                            if k < spec.peer_pays[1]:
                                n.start_soon(pay, peer, cid, spec.peer_pays[0])

            for cid, spec in zip(cids, SPECS, strict=True):
                peer = peers[spec.peer]
                await _wait_settled(maker, peer, [cid])
                # Every pay returned a co-signed state of its own channel.
                assert len(results[cid]) == spec.maker_pays[1] + spec.peer_pays[1]
                assert all(r.state.channel_id == cid and r.fully_signed for r in results[cid]), (
                    cid.hex()[:16]
                )
                latest = maker.latest(cid)
                assert latest is not None and latest == peer.latest(cid)
                assert latest.state.version >= spec.maker_pays[1] + spec.peer_pays[1]
                # Exactly what this channel's pays imply: conservation, no cross-talk.  (Fails
                # now and then: a pay of one side made while a proposal of the other waits for
                # its countersignature reverts it; see the deferred-proposal test below.)
                assert _balances(maker, cid) == _expected(spec), cid.hex()[:16]
                params = maker.params(cid)
                assert params == peer.params(cid)
                digest = state_digest(params, latest.state)
                assert [recover(digest, s) for s in latest.signatures if s] == list(
                    params.participants
                )

            before = {cid: _latest(maker, cid) for cid in cids}
            await maker.drain()
            _assert_file_holds(maker_path, before)
            assert _in_flight_rows(maker_path) == 0
            for p, peer in enumerate(peers):
                await peer.drain()
                _assert_file_holds(
                    tmp_path / f"peer{p}.sqlite",
                    {cid: before[cid] for cid, s in zip(cids, SPECS, strict=True) if s.peer == p},
                )

        # The maker restarts from its store; the peers kept running.
        _assert_file_holds(maker_path, before)
        async with open_client(maker_key, maker_path, update_timeout=5) as maker2:
            infos = {i.channel_id: i for i in maker2.channels()}
            assert set(infos) == set(cids)
            for cid, spec in zip(cids, SPECS, strict=True):
                assert infos[cid].latest == before[cid]
                assert infos[cid].peer_node_id == peer_keys[spec.peer].node_id
                assert infos[cid].in_flight == 0
            for peer in peers:
                await _wait_connected(maker2, peer)
            with trio.fail_after(5):
                async with trio.open_nursery() as n:
                    for cid in cids:
                        n.start_soon(pay, maker2, cid, 1)
            for cid, spec in zip(cids, SPECS, strict=True):
                await _wait_settled(maker2, peers[spec.peer], [cid])
                ours, theirs = _expected(spec)
                assert _balances(maker2, cid) == (ours - 1, theirs + 1), cid.hex()[:16]
                assert _version(maker2, cid) > _version(maker, cid)


# -- shutdown -------------------------------------------------------------------------

EACH = 1_000_000
MAKER_PAYS, MAKER_AMOUNT = 50, 1
PEER_PAYS, PEER_AMOUNT = 20, 100  # MAKER_PAYS * MAKER_AMOUNT < PEER_AMOUNT: unique counts


def _counts(maker_balance: int) -> tuple[int, int]:
    """How many maker pays and peer pays a maker balance implies (unique, given the
    amounts)."""
    net = EACH - maker_balance  # = maker_pays * MAKER_AMOUNT - peer_pays * PEER_AMOUNT
    peer_pays = -(net // PEER_AMOUNT)
    maker_paid = net + peer_pays * PEER_AMOUNT
    assert maker_paid % MAKER_AMOUNT == 0, maker_balance
    return maker_paid // MAKER_AMOUNT, peer_pays


async def _shutdown_with_pays_in_flight(tmp_path: Path, round_: int, cut: int | None) -> None:
    """One round: the maker's ``open_client`` is left while its pays (and the peer's) are
    in flight, cut off ``cut`` scheduler passes after they started (None: once the
    first of the maker's pays returned)."""
    maker_key, peer_key = Signer.generate(), Signer.generate()  # test-only keys
    maker_path = tmp_path / f"maker{round_}.sqlite"
    async with open_client(peer_key, tmp_path / f"peer{round_}.sqlite", update_timeout=5) as peer:
        done = {"maker": 0, "peer": 0}
        with trio.fail_after(8):  # a hung exit fails here rather than hanging the run
            async with open_client(maker_key, maker_path, update_timeout=5) as maker:
                cid = await _open(maker, peer, EACH, EACH)
                await maker.pay(cid, ETH, MAKER_AMOUNT)  # one that surely landed
                done["maker"] += 1

                async def pay(client: Client, who: str, amount: int) -> None:
                    await client.pay(cid, ETH, amount)
                    done[who] += 1

                with trio.fail_after(5):
                    async with trio.open_nursery() as n:
                        for k in range(MAKER_PAYS):
                            n.start_soon(pay, maker, "maker", MAKER_AMOUNT)
                            if k < PEER_PAYS:
                                n.start_soon(pay, peer, "peer", PEER_AMOUNT)
                        if cut is None:  # once the first of them returned
                            while done["maker"] < 2:
                                await trio.lowlevel.checkpoint()
                        else:
                            for _ in range(cut):
                                await trio.lowlevel.checkpoint()
                        # Pays are cut off in flight, not finished.
                        assert done["maker"] < 1 + MAKER_PAYS, (cut, done)
                        n.cancel_scope.cancel()
                left_at = trio.current_time()
        # The context is left promptly, and raised nothing (the nursery took the
        # cancellation it was given).
        assert trio.current_time() - left_at < 3

        # What the maker's file holds co-signed is what its client last reported...
        file_rows = _file_latest(maker_path)
        assert set(file_rows) == {cid}
        row = file_rows[cid]
        assert row.status == COSIGNED
        assert row.signed == maker.latest(cid)
        assert row.signed is not None and row.signed.fully_signed
        maker_v = row.signed.state.version
        # ...and the peer knows it: it holds that state or a newer co-signed one.
        with trio.fail_after(5):
            while _version(peer, cid) < maker_v:  # noqa: ASYNC110 - the peer's view
                await trio.sleep(0.01)
        if _version(peer, cid) == maker_v:
            assert peer.latest(cid) == row.signed

        # The maker restarts from its file; both sides resync to one co-signed state.
        async with open_client(maker_key, maker_path, update_timeout=5) as maker2:
            assert maker2.latest(cid) == row.signed
            await _wait_connected(maker2, peer)
            await _wait_settled(maker2, peer, [cid])
            before = maker2.latest(cid)
            assert before is not None and before.state.version >= maker_v
            maker_landed, peer_landed = _counts(_balances(maker2, cid)[0])
            # Every pay that returned landed, once; none landed that was never made.
            assert done["maker"] <= maker_landed <= 1 + MAKER_PAYS, (done, maker_landed)
            assert done["peer"] <= peer_landed <= PEER_PAYS, (done, peer_landed)
            assert sum(_balances(maker2, cid)) == 2 * EACH
            signed = await maker2.pay(cid, ETH, 7)
            assert signed.state.version > before.state.version
            await _wait_settled(maker2, peer, [cid])
            ours, theirs = before.state.allocations[0].balances
            assert _balances(maker2, cid) == _balances(peer, cid) == (ours - 7, theirs + 7)


async def test_leaving_open_client_with_pays_in_flight(tmp_path: Path) -> None:
    """50 pays of the maker and 20 of the peer run on one channel; the maker cancels them
    mid-flight and leaves ``open_client``.  It leaves within seconds raising nothing; the
    co-signed state its file holds is the one its client reported and is known to the
    peer; restarted from that file it resyncs with the peer to one co-signed state in
    which every pay that returned landed exactly once; and it pays again.  Several cut
    points: with the first proposals in flight, and after some pays returned."""
    for round_, cut in enumerate((0, 1, 3, 10, 100, None)):
        await _shutdown_with_pays_in_flight(tmp_path, round_, cut)


async def test_clean_exit_leaves_exactly_the_reported_latest_in_the_file(tmp_path: Path) -> None:
    """With nothing in flight, leaving ``open_client`` leaves in the store file exactly the
    state ``latest()`` last returned, co-signed, with no proposal in flight; a restart
    loads it."""
    maker_key, peer_key = Signer.generate(), Signer.generate()  # test-only keys
    maker_path = tmp_path / "maker.sqlite"
    async with open_client(peer_key, tmp_path / "peer.sqlite") as peer:
        async with open_client(maker_key, maker_path) as maker:
            cid = await _open(maker, peer, EACH, EACH)
            with trio.fail_after(5):
                async with trio.open_nursery() as n:  # pipelined: the flusher commits
                    for _ in range(40):
                        n.start_soon(maker.pay, cid, ETH, 3)
            for _ in range(10):
                await peer.pay(cid, ETH, 2)
            await _wait_settled(maker, peer, [cid])
            last = await maker.pay(cid, ETH, 1)  # and one lock-step pay last
            reported = maker.latest(cid)
            assert reported is not None and reported == last
        _assert_file_holds(maker_path, {cid: reported})
        assert _in_flight_rows(maker_path) == 0
        assert reported.state.allocations[0].balances == (EACH - 121 + 20, EACH + 121 - 20)
        async with open_client(maker_key, maker_path) as maker2:
            assert maker2.latest(cid) == reported


# -- what the many-channel test found ------------------------------------------------


async def test_a_pay_made_while_the_peers_proposal_awaits_countersignature_keeps_it(
    tmp_path: Path,
) -> None:
    """The peer pays 4; the maker's reader has checked that proposal but not yet
    countersigned it (it does so when its reader goes idle: mid-burst, or paced, other
    tasks run first) when the maker pays 7.  Both pays return co-signed states, so the
    final state must hold both.

    It once did not: the client computed ``fn`` on the latest co-signed state while the
    machine then countersigned the held proposal first and numbered the maker's on top
    of it, so conservation held, the peer accepted, and its co-signed pay was silently
    undone.  The reader's idle hook is held here to open that window every time; the
    many-channel test above hit it by itself in some runs."""
    maker_key, peer_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(peer_key, tmp_path / "peer.sqlite", update_timeout=5) as peer,
        open_client(maker_key, tmp_path / "maker.sqlite", update_timeout=5) as maker,
    ):
        cid = await _open(maker, peer, EACH, EACH)
        machine = maker._channels[cid].machine
        on_idle = maker.inbound.on_idle
        maker.inbound.on_idle = lambda node_id: None  # type: ignore[method-assign]
        peer_paid: list[SignedState] = []

        async def peer_pays() -> None:
            peer_paid.append(await peer.pay(cid, ETH, 4))

        async with trio.open_nursery() as n:
            n.start_soon(peer_pays)
            with trio.fail_after(5):
                while not machine.deferred:  # noqa: ASYNC110 - the maker's reader got it
                    await trio.sleep(0.01)
            maker.inbound.on_idle = on_idle  # type: ignore[method-assign]
            maker_paid = await maker.pay(cid, ETH, 7)
        await _wait_settled(maker, peer, [cid])
        (theirs,) = peer_paid
        assert theirs.state.allocations[0].balances == (EACH + 4, EACH - 4)
        assert maker_paid.state.version > theirs.state.version
        assert _balances(maker, cid) == _balances(peer, cid)
        assert _balances(maker, cid) == (EACH + 4 - 7, EACH - 4 + 7), (
            f"the peer's pay, co-signed at v{theirs.state.version}, was undone by the "
            f"maker's v{maker_paid.state.version}, computed on the state before it"
        )
