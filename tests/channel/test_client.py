"""The Trio client over real TCP sockets and real SQLite stores."""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import cbor2
import pytest
import trio

from channel import codec, noise
from channel.client import FUNDING, OPEN, Client, Update, open_client
from channel.codec import Propose, Reject
from channel.eip712 import state_digest
from channel.errors import (
    FundsAtRiskError,
    LocalProtocolError,
    PeerTimeout,
    StoreError,
    TransportError,
    UpdateRejected,
)
from channel.keys import HALF_N, SECP256K1_N, Signer, recover
from channel.lane import CLOSED
from channel.links import MAX_PEER_ERRORS
from channel.noise import ACT_TWO_SIZE, Initiator
from channel.state import ETH, UINT256_MAX, Address, Allocation, Params, SignedState, State
from channel.store import WARM_WAL_BYTES, Store
from channel.transport import Connection, PeerAddress, connect, serve

ADJ = b"\xad" * 20
TOTAL = 1_000_000


@asynccontextmanager
async def pair(tmp_path: Path, **bob_kwargs: object) -> AsyncIterator[tuple[Client, Client, bytes]]:
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=3) as alice,
        open_client(bob_key, tmp_path / "bob.sqlite", **bob_kwargs) as bob,  # type: ignore[arg-type]
    ):
        yield alice, bob, await _open(alice, bob, TOTAL, chain_id=31337)


async def _open(alice: Client, bob: Client, each: int, *, chain_id: int = 1) -> bytes:
    """Alice opens an ETH channel to bob, ``each`` on either side."""
    return await alice.open_channel(
        bob.peer_address(),
        chain_id=chain_id,
        adjudicator=ADJ,
        challenge_duration=60,
        balances=[(ETH, each, each)],
    )


def _same_latest(a: Client, b: Client, cid: bytes) -> bool:
    la, lb = a.latest(cid), b.latest(cid)
    return la is not None and la == lb


async def _wait_same(a: Client, b: Client, cid: bytes) -> None:
    with trio.fail_after(5):
        while not _same_latest(a, b, cid):  # noqa: ASYNC110 - polling two processes' views
            await trio.sleep(0.01)


async def test_open_pay_and_both_hold_the_same_cosigned_state(tmp_path: Path) -> None:
    """After a burst of pipelined pays both parties hold one co-signed state signed by both keys."""
    async with pair(tmp_path) as (alice, bob, cid):
        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(alice.pay, cid, ETH, 3)
        for _ in range(50):
            await bob.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)
        latest = alice.latest(cid)
        assert latest is not None
        assert latest.state.version == 250
        assert latest.state.allocations[0].balances == (TOTAL - 600 + 50, TOTAL + 600 - 50)
        params = alice.params(cid)
        digest = state_digest(params, latest.state)
        assert [recover(digest, s) for s in latest.signatures if s] == list(params.participants)


async def test_a_started_client_has_a_warm_wal_and_lock_step_pays_do_not_grow_it(
    tmp_path: Path,
) -> None:
    """open_client gives each store's WAL its blocks before the first commit (after a
    restart too: a clean close deletes the WAL), so that lock-step commits write over
    the file instead of growing it (an fsync that grows a file costs twice as much)."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    paths = [tmp_path / "alice.sqlite", tmp_path / "bob.sqlite"]
    wals = [p.with_name(p.name + "-wal") for p in paths]
    bob_port = 0
    for life in range(2):
        async with (
            open_client(alice_key, paths[0]) as alice,
            open_client(bob_key, paths[1], port=bob_port) as bob,
        ):
            sizes = [w.stat().st_size for w in wals]
            assert min(sizes) >= WARM_WAL_BYTES
            if life == 0:
                cid = await _open(alice, bob, TOTAL)
                bob_port = bob.peer_address().port
            with trio.fail_after(5):
                await alice.wait_connected(bob_key.node_id)
            for _ in range(100):
                await alice.pay(cid, ETH, 1)
            assert [w.stat().st_size for w in wals] == sizes
        assert not any(w.exists() for w in wals)
    store = Store(paths[0], owner=alice_key.address)
    (rec,) = store.load()
    store.close()
    assert rec.latest is not None and rec.latest.state.version == 200


async def test_simultaneous_proposals_both_complete(tmp_path: Path) -> None:
    """When both sides propose at once, the conflict resolves and every update lands once."""
    async with pair(tmp_path) as (alice, bob, cid):
        for _ in range(20):
            async with trio.open_nursery() as n:
                n.start_soon(alice.pay, cid, ETH, 5)
                n.start_soon(bob.pay, cid, ETH, 2)
        await _wait_same(alice, bob, cid)
        latest = alice.latest(cid)
        assert latest is not None
        assert latest.state.allocations[0].balances == (TOTAL - 100 + 40, TOTAL + 100 - 40)


async def test_policy_rejects_with_reason_and_channel_keeps_working(tmp_path: Path) -> None:
    """A proposal refused by the peer's risk policy raises UpdateRejected and changes nothing."""

    def risk(params: Params, old: State, new: State) -> str | None:
        me = 1
        if old.allocations[0].balances[me] - new.allocations[0].balances[me] > 100:
            return "over the per-update risk limit"
        return None

    async with pair(tmp_path, policy=risk) as (alice, bob, cid):
        await alice.pay(cid, ETH, 10)
        before = alice.latest(cid)

        def take_from_bob(tip: State) -> Update:
            a = tip.allocations[0]
            return Update(
                allocations=(attrs.evolve(a, balances=(a.balances[0] + 500, a.balances[1] - 500)),)
            )

        with pytest.raises(UpdateRejected, match="risk limit"):
            await alice.update(cid, take_from_bob)
        assert alice.latest(cid) == before
        assert bob.latest(cid) == before
        signed = await alice.pay(cid, ETH, 1)
        assert signed.state.version > before.state.version  # type: ignore[union-attr]
        await _wait_same(alice, bob, cid)


async def test_conservation_violation_by_caller_is_refused_locally(tmp_path: Path) -> None:
    """An update that mints funds is refused before anything is signed or sent."""
    from channel.errors import LocalProtocolError

    async with pair(tmp_path) as (alice, bob, cid):

        def mint(tip: State) -> Update:
            a = tip.allocations[0]
            return Update(
                allocations=(attrs.evolve(a, balances=(a.balances[0] + 1, a.balances[1])),)
            )

        with pytest.raises(LocalProtocolError):
            await alice.update(cid, mint)
        await alice.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)


def _durable(path: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Every row of a store's channels and states, read from the file by a second
    connection: what a restart would load."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        channels = db.execute("SELECT * FROM channels ORDER BY channel_id").fetchall()
        states = db.execute("SELECT * FROM states ORDER BY channel_id, version").fetchall()
    finally:
        db.close()
    return channels, states


def _alice_pays_one(state: State) -> State:
    """The next version of a one-asset ``state``: participant 0 pays 1 to participant 1."""
    a0 = state.allocations[0]
    return attrs.evolve(
        state,
        version=state.version + 1,
        allocations=(attrs.evolve(a0, balances=(a0.balances[0] - 1, a0.balances[1] + 1)),),
    )


@asynccontextmanager
async def bob_alone_after_a_pay(
    tmp_path: Path, alice_key: Signer, bob_key: Signer
) -> AsyncIterator[tuple[Client, bytes, Params, SignedState]]:
    """Bob running, after alice opened a channel with him, paid 1 and stopped:
    ``(bob, channel id, params, bob's latest co-signed state)``.  Alice's store stays in
    ``tmp_path`` for her to come back."""
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await _open(alice, bob, TOTAL)
            await alice.pay(cid, ETH, 1)
            params = alice.params(cid)
        latest = bob.latest(cid)
        assert latest is not None
        yield bob, cid, params, latest


async def _refusal(conn: Connection) -> Reject | codec.Error:
    """The next ``Reject`` or ``Error`` the peer sends (its resync messages skipped)."""
    with trio.fail_after(5):
        while True:
            msg = codec.decode(await conn.receive())
            if isinstance(msg, Reject | codec.Error):
                return msg


async def _raw_stranger_frames(bob: Client, frames: list[bytes], key: Signer) -> list[str]:
    """Send ``frames`` to bob one at a time over a connection of ``key``'s own; the
    reason of each refusal he answers with."""
    conn = await connect(key, bob.peer_address())
    reasons = []
    for frame in frames:
        await conn.send(frame)
        reasons.append((await _refusal(conn)).reason)
    await conn.aclose()
    return reasons


async def test_bad_frames_from_a_stranger_change_nothing(tmp_path: Path) -> None:
    """Malformed CBOR, unknown types, trailing bytes and forged proposals from a stranger are
    refused; both stores are unchanged and the channel keeps working."""
    async with pair(tmp_path) as (alice, bob, cid):
        await alice.pay(cid, ETH, 7)
        before_a, before_b = alice.latest(cid), bob.latest(cid)
        assert before_b is not None
        stranger = Signer.generate()
        forged_state = attrs.evolve(before_b.state, version=before_b.state.version + 1)
        good = codec.encode(
            Propose(
                base_version=before_b.state.version,
                state=forged_state,
                signature=stranger.sign(b"\x11" * 32),
            )
        )
        frames = [
            b"\xff\x00",
            b"\x82\x01\x63abc",
            codec.encode(codec.Error(reason="x")) + b"\x00",
            b"\x83\x01\x18\x63\x00",
            good,
        ]
        durable = _durable(tmp_path / "alice.sqlite"), _durable(tmp_path / "bob.sqlite")
        reasons = await _raw_stranger_frames(bob, frames, stranger)
        assert [r.split(":")[0] for r in reasons] == ["DecodeError"] * 4 + ["UnknownPeer"]
        assert bob.latest(cid) == before_b and alice.latest(cid) == before_a
        assert (_durable(tmp_path / "alice.sqlite"), _durable(tmp_path / "bob.sqlite")) == durable
        await alice.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)


async def test_each_bad_input_from_the_counterparty_is_refused_by_type_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's own key, over a connection of its own (a buggy or malicious alice), sends
    bob one bad frame at a time and waits for his answer: each is refused with the error
    type named in the reply, bob's in-memory latest state and every row of his store file
    stay as they were, and the link stays up.  An oversized and a truncated frame close
    the link instead.  Then the real alice restarts from her store and pays as usual."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await _open(alice, bob, TOTAL, chain_id=31337)
            for _ in range(3):
                await alice.pay(cid, ETH, 1)
            params = alice.params(cid)
        latest = bob.latest(cid)
        assert latest is not None
        await bob.drain()
        durable = _durable(tmp_path / "bob.sqlite")
        assert durable[1], "the store holds the channel's states"
        v = latest.state.version
        a0 = latest.state.allocations[0]
        nxt = _alice_pays_one(latest.state)

        def signed(state: State, p: Params = params) -> bytes:
            return alice_key.sign(state_digest(p, state))

        good_sig = signed(nxt)
        s = int.from_bytes(good_sig[32:64], "big")
        high_s = good_sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([good_sig[64] ^ 1])
        assert SECP256K1_N - s > HALF_N
        minted = attrs.evolve(
            nxt, allocations=(attrs.evolve(a0, balances=(a0.balances[0], a0.balances[1] + 9)),)
        )
        old = attrs.evolve(latest.state, version=v - 1)
        wrong_cid = attrs.evolve(nxt, channel_id=b"\x01" * 32)
        other_chain = attrs.evolve(params, chain_id=1)
        other_contract = attrs.evolve(params, adjudicator=b"\xbe" * 20)
        garbage_types = cbor2.dumps([1, Reject.TYPE, cid, "v9", b"\x00" * 32, "r"], canonical=True)

        def prop(base: int, state: State, sig: bytes) -> bytes:
            return codec.encode(Propose(base_version=base, state=state, signature=sig))

        cases: list[tuple[str, bytes, str]] = [
            ("bad v", prop(v, nxt, good_sig[:64] + b"\x05"), "InvalidSignature"),
            ("high s", prop(v, nxt, high_s), "InvalidSignature"),
            (
                "wrong key",
                prop(v, nxt, Signer.generate().sign(state_digest(params, nxt))),
                "InvalidSignature",
            ),
            (
                "other chain id",
                prop(v, nxt, signed(nxt, other_chain)),
                "InvalidSignature",
            ),
            (
                "other verifying contract",
                prop(v, nxt, signed(nxt, other_contract)),
                "InvalidSignature",
            ),
            ("replayed", prop(v, latest.state, signed(latest.state)), "StaleVersion"),
            ("rolled back", prop(v - 1, old, signed(old)), "StaleVersion"),
            ("minted funds", prop(v, minted, signed(minted)), "ConservationError"),
            ("wrong channel", prop(v, wrong_cid, signed(wrong_cid)), "WrongChannel"),
            ("malformed CBOR", b"\xff\x00", "DecodeError"),
            ("unknown type", b"\x83\x01\x18\x63\x00", "DecodeError"),
            ("trailing bytes", codec.encode(codec.Error(reason="x")) + b"\x00", "DecodeError"),
            ("wrong field type", garbage_types, "DecodeError"),
        ]
        conn = await connect(alice_key, bob.peer_address())
        with trio.fail_after(5):
            await bob.wait_connected(alice_key.node_id)
        for label, frame, error in cases:
            await conn.send(frame)
            reply = await _refusal(conn)
            assert reply.reason.startswith(f"{error}: "), (label, reply)
            if isinstance(reply, Reject):
                assert reply.version == codec.decode(frame).state.version  # type: ignore[union-attr]
            assert bob.latest(cid) == latest, label
            assert _durable(tmp_path / "bob.sqlite") == durable, label

        await conn.aclose()

        # Transport level: the link is closed (the reply to a frame that cannot be read),
        # and still nothing changes.
        caplog.set_level(logging.INFO, logger="optichannel")
        expected = {
            "oversized": "OversizeError: frame length 2000",
            "truncated": "TransportError: peer closed the connection mid-frame",
        }
        for label, error in expected.items():
            stream = await trio.open_tcp_stream("127.0.0.1", bob.peer_address().port)
            initiator = Initiator(alice_key.private_key, bob.node_id)
            await stream.send_all(initiator.act_one())
            act_two = b""
            while len(act_two) < ACT_TWO_SIZE:
                act_two += await stream.receive_some(ACT_TWO_SIZE - len(act_two))
            act_three, session = initiator.receive_act_two(act_two)
            await stream.send_all(act_three)
            frame = session.encrypt(b"\x00" * 2000)
            if label == "oversized":
                # MAX_FRAME is the largest a 2-byte length can say: lower bob's limit.
                monkeypatch.setattr(noise, "MAX_FRAME", 1000)
                await stream.send_all(frame)
            else:
                await stream.send_all(frame[:-100])
                await stream.send_eof()
            with trio.fail_after(5):
                while await stream.receive_some(65536):  # bob's resync, then his hang-up
                    pass
            monkeypatch.undo()
            await stream.aclose()
            with trio.fail_after(5):  # bob logs it as his reader ends, maybe after we see EOF
                while not any(error in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert bob.latest(cid) == latest, label
            assert _durable(tmp_path / "bob.sqlite") == durable, label

        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice2:
            await _wait_connected(alice2, bob)
            await alice2.pay(cid, ETH, 1)
            await _wait_same(alice2, bob, cid)
            assert bob.latest(cid).state.version == v + 1  # type: ignore[union-attr]


async def _wait_connected(alice: Client, bob: Client) -> None:
    with trio.fail_after(5):
        await alice.wait_connected(bob.node_id)
        await bob.wait_connected(alice.node_id)


async def test_restart_from_store_resumes_the_channel(tmp_path: Path) -> None:
    """A party that restarts from its store reloads the channel, redials, and keeps updating."""
    alice_key, bob_key = Signer.generate(), Signer.generate()
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await _open(alice, bob, 100)
            for _ in range(5):
                await alice.pay(cid, ETH, 1)
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice2:
            assert alice2.latest(cid) is not None
            assert alice2.latest(cid).state.version == 5  # type: ignore[union-attr]
            await _wait_connected(alice2, bob)
            await alice2.pay(cid, ETH, 1)
            await _wait_same(alice2, bob, cid)
            assert bob.latest(cid).state.allocations[0].balances == (94, 106)  # type: ignore[union-attr]


async def test_stalled_peer_times_out_and_channel_resyncs(tmp_path: Path) -> None:
    """A peer that stops answering mid-update yields PeerTimeout; once it answers again, both
    sides resync to the same latest co-signed version and keep working."""
    async with pair(tmp_path) as (alice, bob, cid):
        await alice.pay(cid, ETH, 1)
        # Freeze bob's processing by making its dispatcher stall.
        gate = trio.Event()
        original = bob.inbound.dispatch
        stalled: list[tuple[bytes, codec.Message]] = []

        def frozen(node_id: bytes, msg: codec.Message) -> None:
            if not gate.is_set():
                stalled.append((node_id, msg))
                return
            original(node_id, msg)

        bob.inbound.dispatch = frozen  # type: ignore[method-assign]
        with pytest.raises(PeerTimeout):
            await alice.pay(cid, ETH, 1)
        gate.set()
        bob.inbound.dispatch = original  # type: ignore[method-assign]
        await _wait_connected(alice, bob)
        await _wait_same(alice, bob, cid)
        await alice.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)


def test_store_is_wal_with_full_sync(tmp_path: Path) -> None:
    """The store runs SQLite in WAL mode with synchronous=FULL."""
    st = Store(tmp_path / "s.sqlite", owner=b"\x01" * 20)
    assert st._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._db.execute("PRAGMA synchronous").fetchone()[0] == 2


async def test_both_sides_saturating_the_channel_all_updates_land(tmp_path: Path) -> None:
    """Hundreds of concurrent pays from both sides at once all land exactly once: conflicts
    resolve by turn-taking, nothing times out, and the balances add up."""
    async with pair(tmp_path) as (alice, bob, cid):
        async with trio.open_nursery() as n:
            for i in range(400):
                n.start_soon(alice.pay if i % 2 else bob.pay, cid, ETH, 1 + i % 3)
        await _wait_same(alice, bob, cid)
        latest = alice.latest(cid)
        assert latest is not None
        paid_by_alice = sum(1 + i % 3 for i in range(400) if i % 2)
        paid_by_bob = sum(1 + i % 3 for i in range(400) if not i % 2)
        net = paid_by_alice - paid_by_bob
        assert latest.state.allocations[0].balances == (TOTAL - net, TOTAL + net)


async def test_raising_policy_refuses_instead_of_crashing(tmp_path: Path) -> None:
    """A risk policy that raises refuses the update (UpdateRejected); the client survives."""

    def broken(params: Params, old: State, new: State) -> str | None:
        raise RuntimeError("risk service down")

    async with pair(tmp_path, policy=broken) as (alice, bob, cid):
        with pytest.raises(UpdateRejected, match="policy failed"):
            await alice.pay(cid, ETH, 1)
        assert bob.latest(cid) is not None
        assert bob.latest(cid).state.version == 0  # type: ignore[union-attr]
        signed = await bob.pay(cid, ETH, 1)  # bob's own proposals are unaffected
        assert signed.state.allocations[0].balances == (TOTAL + 1, TOTAL - 1)


@pytest.mark.parametrize(
    ("fault", "balances", "locked", "error"),
    [
        ("locks funds", (5, 10), 5, "ConservationError: "),
        # Each balance a uint256, their sum not: the adjudicator could never hold it.
        ("total over uint256", (UINT256_MAX, 1), 0, "DecodeError: "),
    ],
)
async def test_an_invalid_open_is_refused_and_responder_survives(
    tmp_path: Path, fault: str, balances: tuple[int, int], locked: int, error: str
) -> None:
    """An Open whose initial state locks funds, or holds more of an asset than uint256,
    is refused with a typed Error, nothing is stored, and the responder keeps serving
    honest peers."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        params = Params.new(
            chain_id=1,
            adjudicator=ADJ,
            participants=(alice_key.address, bob_key.address),
            challenge_duration=60,
        )
        # Built unchecked: the validating constructors refuse the overflowing total.
        alloc = Allocation.unchecked(Address(ETH), balances, locked)
        bad = State.unchecked(params.channel_id, 0, (alloc,), b"", False)
        frame = codec.encode(
            codec.Open(
                params=params, state=bad, signature=alice_key.sign(state_digest(params, bad))
            )
        )
        (reason,) = await _raw_stranger_frames(bob, [frame], alice_key)
        assert reason.startswith(error), (fault, reason)
        assert _durable(tmp_path / "bob.sqlite") == ([], [])
        assert bob.channels() == []
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            cid = await alice.open_channel(
                bob.peer_address(),
                chain_id=1,
                adjudicator=ADJ,
                challenge_duration=60,
                balances=[(ETH, 10, 10)],
            )
            await alice.pay(cid, ETH, 3)
            await _wait_same(alice, bob, cid)


async def test_bad_open_over_a_dialled_link_does_not_bring_the_client_down(
    tmp_path: Path,
) -> None:
    """A peer we dialled that sends an invalid Open (locked funds) is refused; our client,
    its dial loop and its other channels keep working."""
    from functools import partial

    from channel.transport import PeerAddress, serve

    alice_key, mallory_key = Signer.generate(), Signer.generate()  # test-only keys
    params = Params.new(
        chain_id=1,
        adjudicator=ADJ,
        participants=(mallory_key.address, alice_key.address),
        challenge_duration=60,
    )
    s0 = State.initial(params, [(ETH, 10, 10)])
    bad = attrs.evolve(
        s0, allocations=(attrs.evolve(s0.allocations[0], balances=(5, 10), locked=5),)
    )
    frame = codec.encode(
        codec.Open(params=params, state=bad, signature=mallory_key.sign(state_digest(params, bad)))
    )
    sent = trio.Event()

    async def mallory(conn: Connection) -> None:
        await conn.send(frame)
        sent.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listening = await n.start(partial(serve, mallory_key, mallory))
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            await alice.connect(
                PeerAddress(node_id=mallory_key.node_id, host="127.0.0.1", port=listening.port)
            )
            await sent.wait()
            await trio.sleep(0.1)
            assert alice.channels() == []
            async with open_client(Signer.generate(), tmp_path / "bob.sqlite") as bob:
                cid = await alice.open_channel(
                    bob.peer_address(),
                    chain_id=1,
                    adjudicator=ADJ,
                    challenge_duration=60,
                    balances=[(ETH, 9, 9)],
                )
                await alice.pay(cid, ETH, 2)
                await _wait_same(alice, bob, cid)
        n.cancel_scope.cancel()


async def test_one_countersignature_covers_the_proposals_of_one_read(tmp_path: Path) -> None:
    """Pipelined pays read together are countersigned once: every pay returns a co-signed
    state that includes it (its version at or above the pay's own), the responder stores
    fewer co-signed states than there were pays, and the proposer keeps none in flight."""
    async with pair(tmp_path) as (alice, bob, cid):
        results = []

        async def pay() -> None:
            results.append(await alice.pay(cid, ETH, 1))

        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(pay)
        await _wait_same(alice, bob, cid)
        await alice.drain()
        await bob.drain()
        latest = alice.latest(cid)
        assert latest is not None and latest.state.version == 200
        assert all(r.fully_signed for r in results)
        # pay k (in the order they completed) sees at least k pays
        paid = [TOTAL - r.state.allocations[0].balances[0] for r in results]
        assert all(p >= k + 1 for k, p in enumerate(sorted(paid)))
        rows = bob.store._db.execute(
            "SELECT count(*) FROM states WHERE channel_id = ?", (cid,)
        ).fetchone()[0]
        assert rows < 100  # v0, and one row per countersigned read, not 200
        in_flight = alice.store.load()[0].in_flight
        assert in_flight == ()


async def test_prune_history_during_traffic_keeps_the_channel_claimable(tmp_path: Path) -> None:
    """Pruning while pays stream on: every pay lands, the history below the latest goes,
    the latest co-signed state and max_signed stay, and a restart from the pruned store
    resumes the channel."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        async with open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=5) as alice:
            cid = await _open(alice, bob, TOTAL)
            for _ in range(1500):  # more than one prune chunk
                await alice.pay(cid, ETH, 1)
            pruned = 0

            async def prune() -> None:
                nonlocal pruned
                pruned = await alice.prune_history()

            async with trio.open_nursery() as n:
                n.start_soon(prune)
                for _ in range(100):
                    n.start_soon(alice.pay, cid, ETH, 2)
            assert pruned >= 1500
            pruned_bob = await bob.prune_history(cid)
            assert pruned_bob >= 1500
            latest = alice.latest(cid)
            assert latest is not None and latest.state.version == 1600
            trail = alice.store.signed_states(cid)
            assert trail[0][0] >= 1500 and trail[-1][2] == latest
            with pytest.raises(LocalProtocolError):
                await alice.prune_history(b"\x00" * 32)
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice2:
            assert alice2.latest(cid) == latest
            await _wait_connected(alice2, bob)
            await alice2.pay(cid, ETH, 1)
            await _wait_same(alice2, bob, cid)
            assert bob.latest(cid).state.allocations[0].balances == (  # type: ignore[union-attr]
                TOTAL - 1701,
                TOTAL + 1701,
            )


async def test_lockstep_pays_commit_inline_and_pipelined_pays_after_them_share_commits(
    tmp_path: Path,
) -> None:
    """Lock-step pays take the shortcut: each party commits on the task that handled the
    update (the loop thread), three commits an update.  Pipelined pays right after them
    are group-committed by the flusher instead: a commit on the loop in pipelined traffic
    holds up the reader and sends a train of one update, which the peer then answers on
    its own (measured: four times the fsyncs and a third less throughput)."""
    import threading

    async with pair(tmp_path) as (alice, bob, cid):
        commits: dict[str, list[bool]] = {"alice": [], "bob": []}
        for name, client in (("alice", alice), ("bob", bob)):
            store = client.outbox.store
            original = store.commit

            def counted(plan: object, name: str = name, original: object = original) -> None:
                commits[name].append(threading.current_thread() is threading.main_thread())
                original(plan)  # type: ignore[operator]

            store.commit = counted  # type: ignore[method-assign]
        await alice.pay(cid, ETH, 1)  # one lock-step pay to settle the pattern in
        for c in commits.values():
            c.clear()
        for _ in range(20):
            await alice.pay(cid, ETH, 1)
        await bob.drain()
        # Three commits an update, on the loop thread (a sweep that happens to be due
        # makes the shortcut stand aside for an update, hence the margin).
        assert len(commits["alice"]) == 40 and len(commits["bob"]) == 20
        assert sum(commits["alice"]) >= 36 and sum(commits["bob"]) >= 18
        for c in commits.values():
            c.clear()
        async with trio.open_nursery() as n:
            for _ in range(256):
                n.start_soon(alice.pay, cid, ETH, 1)
        await bob.drain()
        # A few group commits each (5 and 3 when this was written; 259 and 3 when the
        # shortcut still took alice's pipelined proposals one at a time).
        assert len(commits["alice"]) <= 16, commits["alice"]
        assert len(commits["bob"]) <= 16, commits["bob"]
        latest = bob.latest(cid)
        assert latest is not None and latest.state.version == 1 + 20 + 256


async def test_a_pay_in_an_asset_the_channel_does_not_hold_is_refused(tmp_path: Path) -> None:
    """Paying an asset the channel holds none of is the caller's mistake: refused before
    anything is signed, never a co-signed state that moves nothing."""
    async with pair(tmp_path) as (alice, bob, cid):
        before = alice.latest(cid)
        with pytest.raises(LocalProtocolError, match="holds no asset"):
            await alice.pay(cid, b"\x77" * 20, 1)
        assert alice.latest(cid) == before == bob.latest(cid)
        await alice.pay(cid, ETH, 1)
        latest = alice.latest(cid)
        assert latest is not None and latest.state.version == 1


async def test_connecting_to_an_unreachable_peer_raises_peer_timeout_and_keeps_redialling(
    tmp_path: Path,
) -> None:
    """connect() and open_channel() to an address nothing listens on raise PeerTimeout
    (a ChannelError) after update_timeout; the client keeps redialling, so the peer is
    reached once it listens there."""
    bob_key = Signer.generate()  # test-only key
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = PeerAddress(node_id=bob_key.node_id, host="127.0.0.1", port=port)
    async with open_client(
        Signer.generate(), tmp_path / "alice.sqlite", update_timeout=0.3
    ) as alice:
        with pytest.raises(PeerTimeout, match="still redialling"):
            await alice.connect(address)
        with pytest.raises(PeerTimeout):
            await alice.open_channel(
                address, chain_id=1, adjudicator=ADJ, challenge_duration=60, balances=[(ETH, 1, 1)]
            )
        assert alice.channels() == []
        async with open_client(bob_key, tmp_path / "bob.sqlite", port=port) as bob:
            with trio.fail_after(5):
                await alice.wait_connected(bob_key.node_id)
            cid = await _open(alice, bob, 5)
            await alice.pay(cid, ETH, 2)
            await _wait_same(alice, bob, cid)


async def test_open_channel_with_balances_no_channel_can_hold_raises_before_dialling(
    tmp_path: Path,
) -> None:
    """Balances whose sum exceeds uint256 (the adjudicator could never hold them), or a
    node id that is no public key, raise ValueError at once: nothing is dialled, stored
    or left behind, and the client goes on opening channels."""
    bob_key = Signer.generate()  # test-only key
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here: a dial would wait for the timeout
    address = PeerAddress(node_id=bob_key.node_id, host="127.0.0.1", port=port)
    async with open_client(
        Signer.generate(), tmp_path / "alice.sqlite", update_timeout=30
    ) as alice:
        with trio.fail_after(2):
            with pytest.raises(ValueError, match="more than uint256"):
                await alice.open_channel(
                    address,
                    chain_id=1,
                    adjudicator=ADJ,
                    challenge_duration=60,
                    balances=[(ETH, UINT256_MAX, 1)],
                )
            with pytest.raises(ValueError, match="not a node id"):
                await alice.open_channel(
                    b"\x05" * 33,
                    chain_id=1,
                    adjudicator=ADJ,
                    challenge_duration=60,
                    balances=[(ETH, 1, 1)],
                )
        assert alice.channels() == []
        assert not alice.links.is_connected(bob_key.node_id)
        async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
            cid = await _open(alice, bob, 5)
            await alice.pay(cid, ETH, 2)
            await _wait_same(alice, bob, cid)
    assert [bytes(row[0]) for row in _durable(tmp_path / "alice.sqlite")[0]] == [cid]


async def test_remember_peer_address_is_checked_and_redialled_after_a_restart(
    tmp_path: Path,
) -> None:
    """The responder of a channel learns no address for its opener; remember_peer_address
    records one (refusing an unknown channel or another key's address), and after a
    restart of both the responder redials the opener there."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    alice_path, bob_path = tmp_path / "alice.sqlite", tmp_path / "bob.sqlite"
    async with (
        open_client(alice_key, alice_path) as alice,
        open_client(bob_key, bob_path) as bob,
    ):
        cid = await _open(alice, bob, 10)
        alice_port = alice.peer_address().port
        with pytest.raises(LocalProtocolError, match="no channel"):
            bob.remember_peer_address(b"\x01" * 32, alice.peer_address())
        with pytest.raises(LocalProtocolError, match="not the channel's peer"):
            bob.remember_peer_address(cid, bob.peer_address())
        bob.remember_peer_address(cid, alice.peer_address())
    # Bob no longer listens, so alice's redials fail: only bob's, to the address he was
    # given, can bring the link up.
    async with (
        open_client(bob_key, bob_path, port=None) as bob,
        open_client(alice_key, alice_path, port=alice_port) as alice,
    ):
        with trio.fail_after(5):
            await bob.wait_connected(alice_key.node_id)
        await bob.pay(cid, ETH, 3)
        await _wait_same(alice, bob, cid)


async def test_a_pay_made_while_the_peer_still_waits_for_funding_waits_for_it(
    tmp_path: Path,
) -> None:
    """Each party's ``onchain.fund`` sees the deposits confirmed at its own poll, so a
    party may open its side first and pay at once: the peer refuses while it is still
    ``funding``, and the pay retries until the peer is open instead of failing (within
    ``update_timeout``; past it, it fails with the funding reason)."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(
            alice_key, tmp_path / "a.sqlite", require_funding=True, update_timeout=2
        ) as alice,
        open_client(bob_key, tmp_path / "b.sqlite", require_funding=True) as bob,
    ):
        cid = await _open(alice, bob, 100)
        assert alice.status(cid) == bob.status(cid) == FUNDING
        alice.set_status(cid, OPEN)

        async def open_bob_later() -> None:
            await trio.sleep(0.3)
            latest = alice.latest(cid)
            assert latest is not None and latest.state.version == 0  # nothing got through
            bob.set_status(cid, OPEN)

        async with trio.open_nursery() as n:
            n.start_soon(open_bob_later)
            t0 = trio.current_time()
            signed = await alice.pay(cid, ETH, 7)
            assert trio.current_time() - t0 >= 0.3
        assert signed.state.allocations[0].balances == (93, 107)
        await _wait_same(alice, bob, cid)

    async with (
        open_client(
            alice_key, tmp_path / "a2.sqlite", require_funding=True, update_timeout=0.5
        ) as alice,
        open_client(bob_key, tmp_path / "b2.sqlite", require_funding=True) as bob,
    ):
        cid = await _open(alice, bob, 100)
        alice.set_status(cid, OPEN)
        with pytest.raises(UpdateRejected, match="channel is funding"):
            await alice.pay(cid, ETH, 7)
        latest = alice.latest(cid)
        assert latest is not None and latest.state.allocations[0].balances == (100, 100)


async def test_an_exception_ending_the_client_leaves_open_client_as_itself(
    tmp_path: Path,
) -> None:
    """What the block raises comes out of ``open_client`` as itself (the client's
    nurseries would wrap it in groups), so that a plain ``except`` matches; two at once
    stay a group."""
    with pytest.raises(UpdateRejected, match="too risky"):
        async with open_client(Signer.generate(), tmp_path / "a.sqlite"):
            raise UpdateRejected("too risky", reason="too risky")
    with pytest.raises(PeerTimeout):
        async with open_client(Signer.generate(), tmp_path / "b.sqlite", update_timeout=0.2) as c:
            await c.connect(
                PeerAddress(node_id=Signer.generate().node_id, host="127.0.0.1", port=1)
            )
    with pytest.RaisesGroup(KeyError, ValueError):
        async with open_client(Signer.generate(), tmp_path / "c.sqlite"), trio.open_nursery() as n:

            async def fail(exc: Exception) -> None:
                raise exc

            n.start_soon(fail, KeyError("k"))
            n.start_soon(fail, ValueError("v"))


async def test_opens_past_the_caps_on_live_channels_are_refused(tmp_path: Path) -> None:
    """A peer's Open is refused (UpdateRejected at the opener, nothing stored by the
    responder) while the peer has ``max_channels_per_peer`` live channels with it, or it
    has ``max_channels`` in all; our own opens are not capped; a closed channel frees
    its slot, also after a restart; the refused opener keeps working."""
    alice_key, bob_key, carol_key = (Signer.generate() for _ in range(3))  # test-only keys
    bob_path = tmp_path / "bob.sqlite"
    caps = {"max_channels_per_peer": 2, "max_channels": 3}
    async with (
        open_client(alice_key, tmp_path / "alice.sqlite") as alice,
        open_client(carol_key, tmp_path / "carol.sqlite") as carol,
    ):
        async with open_client(bob_key, bob_path, **caps) as bob:
            a1, a2 = await _open(alice, bob, 5), await _open(alice, bob, 5)
            await bob.drain()
            before = _durable(bob_path)
            with pytest.raises(UpdateRejected, match="with this peer: 2 live, the cap is 2"):
                await _open(alice, bob, 5)
            # The refused channel never existed: alice closes it, and says nothing of it.
            (refused,) = {c.channel_id for c in alice.channels()} - {a1, a2}
            assert alice.status(refused) == CLOSED and alice.latest(refused) is None
            c1 = await _open(carol, bob, 5)
            await bob.drain()
            before = _durable(bob_path)
            with pytest.raises(UpdateRejected, match="too many channels: 3 live, the cap is 3"):
                await _open(carol, bob, 5)
            await bob.drain()
            assert _durable(bob_path) == before
            b1 = await _open(bob, carol, 5)  # ours: not capped
            assert {c.channel_id for c in bob.channels()} == {a1, a2, c1, b1}
            await alice.pay(a1, ETH, 1)  # the refused opener's channels work on
            bob.set_status(a1, CLOSED)
            bob.set_status(b1, CLOSED)
        async with open_client(bob_key, bob_path, **caps) as bob:
            a3 = await _open(alice, bob, 5)  # a1 and b1 closed: 2 live with bob, 1 alice's
            await alice.pay(a3, ETH, 2)
            await _wait_same(alice, bob, a3)
            with pytest.raises(UpdateRejected, match="too many channels: 3 live"):
                await _open(carol, bob, 5)
    async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
        assert alice.status(refused) == CLOSED
        async with open_client(bob_key, bob_path, **caps) as bob:
            await alice.connect(bob.peer_address())  # bob listens on a new port
            await alice.pay(a3, ETH, 1)
            await _wait_same(alice, bob, a3)


async def test_an_open_the_peers_policy_refuses_leaves_nothing_to_resync(tmp_path: Path) -> None:
    """bob's open_policy refuses alice's Open: she gets UpdateRejected with his reason,
    he stores nothing, and her refused channel is closed.  Reconnecting and restarting
    after that work (a refused Open used to crash the opener's next resync), and the
    channel bob admits works."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    alice_path, bob_path = tmp_path / "alice.sqlite", tmp_path / "bob.sqlite"

    def admit(params: Params, initial: State) -> str | None:
        return None if initial.allocations[0].balances[0] <= 100 else "opener's deposit over 100"

    async with open_client(bob_key, bob_path, open_policy=admit) as bob:
        async with open_client(alice_key, alice_path) as alice:
            with pytest.raises(UpdateRejected, match="opener's deposit over 100"):
                await _open(alice, bob, 500)
            (refused,) = [c.channel_id for c in alice.channels()]
            assert alice.status(refused) == CLOSED
            await bob.drain()
            assert _durable(bob_path) == ([], [])
            # The link drops and comes back: nothing about the refused channel is said.
            epoch = alice.links.epoch(bob_key.node_id)
            await alice.links.drop(bob_key.node_id)
            with trio.fail_after(5):
                # No event marks a new link's epoch: a test may poll for it.
                while alice.links.epoch(bob_key.node_id) == epoch:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await alice.wait_connected(bob_key.node_id)
            cid = await _open(alice, bob, 50)
            await alice.pay(cid, ETH, 1)
        async with open_client(alice_key, alice_path) as alice:
            assert alice.status(refused) == CLOSED
            await alice.pay(cid, ETH, 2)
            await _wait_same(alice, bob, cid)
    assert bob.channels()[0].latest is not None
    assert [c.channel_id for c in bob.channels()] == [cid]


async def test_connect_reaches_a_peer_at_its_new_address_at_once(tmp_path: Path) -> None:
    """A peer that moved (restarted on another port) is dialled at the address connect()
    is given, even while the redial loop still tries the old one with a long backoff."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=30) as alice:
        async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
            cid = await _open(alice, bob, 5)
        # bob is gone: alice's redial loop backs off (up to 5 s) at his old address.
        await trio.sleep(1.0)
        async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
            with trio.fail_after(1):
                await alice.connect(bob.peer_address())
            await alice.pay(cid, ETH, 1)
            await _wait_same(alice, bob, cid)
            alice.remember_peer_address(cid, bob.peer_address())
    # Moved again: remember_peer_address points the running redial loop there too.
    async with (
        open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=30) as alice,
        open_client(bob_key, tmp_path / "bob.sqlite") as bob,
    ):
        await trio.sleep(1.0)  # alice's loop backs off at the address she remembered
        alice.remember_peer_address(cid, bob.peer_address())
        with trio.fail_after(1):
            await alice.wait_connected(bob_key.node_id)
        await alice.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)


@pytest.mark.parametrize("kind", ["forged Sync", "proposal signed by another key", "replay"])
async def test_a_counterparty_sending_forged_messages_is_cut_off_and_a_stale_one_is_not(
    tmp_path: Path, kind: str
) -> None:
    """Well-formed messages no honest peer sends (a Sync whose state carries forged
    signatures, refused silently; proposals signed by another key, refused once bob
    checks them) count like malformed frames: past ``MAX_PEER_ERRORS`` bob drops the
    link, his state unchanged.  Replayed proposals, which an honest peer can send after
    a reconnect, are refused each time and never cost the link."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with bob_alone_after_a_pay(tmp_path, alice_key, bob_key) as (bob, cid, params, latest):
        v = latest.state.version
        nxt = _alice_pays_one(latest.state)
        forged = alice_key.sign(b"\x11" * 32)  # well formed, over another digest
        if kind == "forged Sync":
            frame = codec.encode(
                codec.Sync(
                    latest=SignedState(state=nxt, signatures=(forged, forged)),
                    max_signed=v + 1,
                    pending=(),
                )
            )
        elif kind == "replay":
            frame = codec.encode(
                Propose(base_version=v - 1, state=latest.state, signature=latest.signatures[0])
            )
        else:
            other = Signer.generate().sign(state_digest(params, nxt))
            frame = codec.encode(Propose(base_version=v, state=nxt, signature=other))
        # Some of the forged proposals are refused as stale instead (each repeats the
        # version of the one bob still holds unchecked): send enough for 100 forgeries.
        sent = 3 * MAX_PEER_ERRORS
        conn = await connect(alice_key, bob.peer_address())
        closed, rejects = False, 0
        with trio.fail_after(10):
            try:
                for _ in range(sent):
                    await conn.send(frame)
                while rejects < sent:
                    msg = codec.decode(await conn.receive())
                    rejects += isinstance(msg, Reject)
            except TransportError:  # bob closed the link (a send or a read saw it)
                closed = True
        await conn.aclose()
        if kind == "replay":
            assert not closed and rejects == sent  # each refused, the link kept
        else:
            assert closed and rejects < sent
        assert bob.latest(cid) == latest
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            await alice.pay(cid, ETH, 1)
            await _wait_same(alice, bob, cid)


async def test_a_second_client_on_a_store_in_use_is_refused_and_the_first_goes_on(
    tmp_path: Path,
) -> None:
    """Two clients on one store would each run a machine over the same channels, each
    signing versions the other does not know it signed: the second is refused before
    it touches the file, and the first keeps working."""
    async with pair(tmp_path) as (alice, bob, cid):
        await alice.pay(cid, ETH, 1)
        mtime = (tmp_path / "alice.sqlite").stat().st_mtime_ns
        with pytest.raises(StoreError, match=r"in use by another running client \(pid \d+\)"):
            async with open_client(alice.signer, tmp_path / "alice.sqlite"):
                pass
        assert (tmp_path / "alice.sqlite").stat().st_mtime_ns == mtime
        await alice.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)
        key = alice.signer
    async with open_client(key, tmp_path / "alice.sqlite", port=None) as again:
        latest = again.latest(cid)
        assert latest is not None and latest.state.version == 2


@pytest.mark.parametrize("revived", ["after-the-retry", "before-the-retry"])
async def test_a_pay_the_peer_refuses_and_then_countersigns_after_all_is_made_once(
    tmp_path: Path, revived: str
) -> None:
    """A dishonest bob (a raw connection with his key) countersigns alice's pay of 10 in
    private and refuses it as a conflict; alice's client retries the pay, and bob
    answers the retry with a ``Sync`` bringing the refused proposal co-signed (or sends
    that ``Sync`` right behind the refusal, before the client retries).  Alice must
    adopt it (the adjudicator would honour it) and her ``pay`` return it, without
    proposing the pay again: bob countersigns anything alice proposes after his
    ``Sync``, so a client that proposed it once more would pay 20 for one ``pay``."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=3) as alice:
        # Bob opens the channel (so alice never dials him), pays 1, and goes away.
        async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
            cid = await _open(bob, alice, TOTAL)
            await bob.pay(cid, ETH, 1)
            await _wait_same(alice, bob, cid)
        params = alice.params(cid)
        start = alice.latest(cid)
        assert start is not None
        me = alice._channels[cid].machine.me

        def paid(signed: SignedState) -> int:
            before, after = start.state.allocations[0], signed.state.allocations[0]
            return before.balances[me] - after.balances[me]

        conn = await connect(bob_key, alice.peer_address())
        proposals: list[Propose] = []
        returned: list[SignedState] = []

        async def alice_pays() -> None:
            returned.append(await alice.pay(cid, ETH, 10))

        async def next_proposal() -> Propose:
            while True:
                msg = codec.decode(await conn.receive())
                if isinstance(msg, Propose):
                    proposals.append(msg)
                    return msg

        def countersign(p: Propose) -> bytes:
            return bob_key.sign(state_digest(params, p.state))

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await alice.wait_connected(bob_key.node_id)
                n.start_soon(alice_pays)
                first = await next_proposal()
                kept = SignedState(
                    state=first.state,
                    signatures=(countersign(first), first.signature)
                    if me == 1
                    else (first.signature, countersign(first)),
                )
                reject = codec.encode(
                    Reject(
                        channel_id=cid,
                        version=first.state.version,
                        state_hash=state_digest(params, first.state),
                        reason="ProposalConflict: the peer's proposal won",
                    )
                )
                sync = codec.encode(
                    codec.Sync(latest=kept, max_signed=first.state.version + 1, pending=())
                )
                if revived == "before-the-retry":
                    await conn.send_many([reject, sync])  # one read: before any retry
                else:
                    await conn.send(reject)
                    retry = await next_proposal()
                    assert retry.state.version > first.state.version
                    assert retry.base_version == start.state.version
                    await conn.send(sync)

                async def honest_from_now_on() -> None:
                    while True:
                        p = await next_proposal()
                        await conn.send(
                            codec.encode(
                                codec.Accept(
                                    channel_id=cid,
                                    version=p.state.version,
                                    signature=countersign(p),
                                )
                            )
                        )

                n.start_soon(honest_from_now_on)
                while not returned:  # noqa: ASYNC110 - the pay's outcome
                    await trio.sleep(0.01)
                await alice.drain()
                await trio.sleep(0.2)  # a third proposal would have been sent by now
                n.cancel_scope.cancel()
        await conn.aclose()
        assert returned == [kept], "pay returned another state than the one bob co-signed"
        latest = alice.latest(cid)
        assert latest is not None
        assert paid(latest) == 10, f"one pay of 10 moved {paid(latest)}"
        expected = 1 if revived == "before-the-retry" else 2
        assert len(proposals) == expected, f"alice proposed {len(proposals)} times for one pay"
        assert all(i.in_flight == 0 for i in alice.channels() if i.channel_id == cid)


@pytest.mark.parametrize("link", ["accepted", "dialled"])
async def test_another_co_signed_state_at_our_latest_version_ends_the_client(
    tmp_path: Path, link: str
) -> None:
    """Two different co-signed states at one version mean our key signed both (a store
    restored from an older copy, the key run twice): ``FundsAtRiskError``, which must
    end the client rather than be logged as a peer's bad frame, on a link it accepted as
    on one it dialled; its store is left as it was."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(bob_key, tmp_path / "bob.sqlite") as bob,
        open_client(alice_key, tmp_path / "alice.sqlite") as alice,
    ):
        cid = await _open(bob, alice, TOTAL)  # bob opened it: alice never dials him
        await bob.pay(cid, ETH, 1)
        await _wait_same(alice, bob, cid)
        params = alice.params(cid)
    ours = alice.latest(cid)
    assert ours is not None
    other = attrs.evolve(
        ours.state,
        allocations=(
            attrs.evolve(
                ours.state.allocations[0],
                balances=(
                    ours.state.allocations[0].balances[0] - 5,
                    ours.state.allocations[0].balances[1] + 5,
                ),
            ),
        ),
    )
    digest = state_digest(params, other)
    # bob opened the channel: he is participant 0
    forged = SignedState(state=other, signatures=(bob_key.sign(digest), alice_key.sign(digest)))
    sync = codec.encode(codec.Sync(latest=forged, max_signed=other.version, pending=()))

    async def bob_sends_it(conn: Connection) -> None:
        await conn.send(sync)
        await trio.sleep_forever()

    with trio.fail_after(10), pytest.raises(FundsAtRiskError, match="two states at one version"):
        async with (
            open_client(alice_key, tmp_path / "alice.sqlite") as alice,
            trio.open_nursery() as n,
        ):
            if link == "accepted":
                conn = await connect(bob_key, alice.peer_address())
                n.start_soon(bob_sends_it, conn)
            else:
                listening = await n.start(partial(serve, bob_key, bob_sends_it))
                where = PeerAddress(node_id=bob_key.node_id, host="127.0.0.1", port=listening.port)
                await alice.connect(where)
            await trio.sleep_forever()
    store = Store(tmp_path / "alice.sqlite", owner=alice_key.address)
    try:
        (rec,) = store.load()
        assert rec.latest == ours
    finally:
        store.close()


@asynccontextmanager
async def alice_and_a_raw_bob(
    tmp_path: Path, **alice_kwargs: object
) -> AsyncIterator[tuple[Client, Connection, Signer, bytes]]:
    """Alice running with a channel bob opened (so she never dials him), and bob as a
    raw connection of his key to her, to send what he likes: ``(alice, conn, bob's key,
    channel id)``.  Alice has the higher address (she yields after a conflict)."""
    while True:
        alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
        if alice_key.address > bob_key.address:
            break
    async with open_client(
        alice_key, tmp_path / "alice.sqlite", **alice_kwargs  # type: ignore[arg-type]
    ) as alice:
        async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
            cid = await _open(bob, alice, TOTAL)
            await bob.pay(cid, ETH, 1)
            await _wait_same(alice, bob, cid)
        conn = await connect(bob_key, alice.peer_address())
        with trio.fail_after(5):
            await alice.wait_connected(bob_key.node_id)
        try:
            yield alice, conn, bob_key, cid
        finally:
            await conn.aclose()


async def _next_proposal(conn: Connection) -> Propose:
    with trio.fail_after(5):
        while True:
            msg = codec.decode(await conn.receive())
            if isinstance(msg, Propose):
                return msg


def _bobs_copy(params: Params, bob_key: Signer, p: Propose) -> SignedState:
    """Alice's proposal ``p`` countersigned by bob (participant 0: he opened it)."""
    return SignedState(
        state=p.state, signatures=(bob_key.sign(state_digest(params, p.state)), p.signature)
    )


def _reject(params: Params, p: Propose, reason: str) -> bytes:
    return codec.encode(
        Reject(
            channel_id=params.channel_id,
            version=p.state.version,
            state_hash=state_digest(params, p.state),
            reason=reason,
        )
    )


async def test_a_refused_pay_whose_proposal_comes_back_in_the_same_read_returns_it(
    tmp_path: Path,
) -> None:
    """Bob refuses alice's pay for good (his policy), and in the same write sends a Sync
    bringing that very proposal co-signed: the pay is made, so ``pay`` returns the state
    (it raised ``UpdateRejected`` for a pay that was made, with no warning)."""
    async with alice_and_a_raw_bob(tmp_path, update_timeout=3) as (alice, conn, bob_key, cid):

        async def respond(p: Propose, kept: SignedState, start: SignedState) -> None:
            sync = codec.encode(codec.Sync(latest=kept, max_signed=p.state.version, pending=()))
            await conn.send_many([_reject(alice.params(cid), p, "over the risk limit"), sync])

        returned, kept = await _a_pay_bob_answers(alice, conn, bob_key, cid, respond)
        assert returned == [kept]
        assert alice.latest(cid) == kept


async def _a_pay_bob_answers(
    alice: Client,
    conn: Connection,
    bob_key: Signer,
    cid: bytes,
    respond: Callable[[Propose, SignedState, SignedState], Awaitable[None]],
) -> tuple[list[SignedState], SignedState]:
    """Alice pays 10; bob (raw) countersigns her proposal in private and answers with
    ``respond(proposal, his co-signed copy, the state before)``: what ``pay`` returned,
    and bob's copy."""
    start = alice.latest(cid)
    assert start is not None
    returned: list[SignedState] = []

    async def pays() -> None:
        returned.append(await alice.pay(cid, ETH, 10))

    async with trio.open_nursery() as n:
        n.start_soon(pays)
        p = await _next_proposal(conn)
        kept = _bobs_copy(alice.params(cid), bob_key, p)
        await respond(p, kept, start)
    return returned, kept


async def test_a_revived_pay_over_an_older_one_in_flight_is_made_once(tmp_path: Path) -> None:
    """Window 2: pay X (1) in flight, pay A (10) built on it, pay Y (100) in line.  Bob
    countersigns A in private and refuses it as a conflict; Y takes A's slot and A's
    retry waits in line.  Bob's Sync brings A co-signed (it holds X and A).  Reporting X
    made pumps the line before A's own notice comes: A's retry must not be proposed on
    a state that holds A (1 + 10 + 100 moved 121 that way).  Bob countersigns whatever
    comes after his Sync."""
    async with alice_and_a_raw_bob(tmp_path, update_timeout=5, window=2) as (
        alice,
        conn,
        bob_key,
        cid,
    ):
        params = alice.params(cid)
        start = alice.latest(cid)
        assert start is not None
        results: dict[str, SignedState] = {}

        async def pay(name: str, amount: int) -> None:
            results[name] = await alice.pay(cid, ETH, amount)

        async def honest() -> None:
            while True:
                p = await _next_proposal(conn)
                sig = bob_key.sign(state_digest(params, p.state))
                accept = codec.Accept(channel_id=cid, version=p.state.version, signature=sig)
                await conn.send(codec.encode(accept))

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(pay, "X", 1)
                await _next_proposal(conn)
                n.start_soon(pay, "A", 10)
                pa = await _next_proposal(conn)
                n.start_soon(pay, "Y", 100)
                await trio.sleep(0.05)
                kept = _bobs_copy(params, bob_key, pa)
                await conn.send(_reject(params, pa, "ProposalConflict: mine won"))
                py = await _next_proposal(conn)
                await trio.sleep(0.1)
                sync = codec.Sync(latest=kept, max_signed=py.state.version, pending=())
                await conn.send(codec.encode(sync))
                n.start_soon(honest)
                while len(results) < 3:  # noqa: ASYNC110 - the pays' outcomes
                    await trio.sleep(0.01)
                await alice.drain()
                n.cancel_scope.cancel()
        latest = alice.latest(cid)
        assert latest is not None
        paid = start.state.allocations[0].balances[1] - latest.state.allocations[0].balances[1]
        assert paid == 111, f"pays of 1 + 10 + 100 moved {paid}"


async def test_without_a_policy_a_peer_may_pay_us_but_never_take_from_us(
    tmp_path: Path,
) -> None:
    """A client given no policy refuses a peer's proposal that lowers its balance (or
    moves a locked amount), with a reason, and countersigns one that pays it."""
    async with alice_and_a_raw_bob(tmp_path) as (alice, conn, bob_key, cid):
        params = alice.params(cid)
        latest = alice.latest(cid)
        assert latest is not None
        a0 = latest.state.allocations[0]
        v = max(latest.state.version, alice._channels[cid].machine.max_signed) + 1

        def proposal(balances: tuple[int, int], locked: int = 0) -> Propose:
            state = attrs.evolve(
                latest.state,
                version=v,
                allocations=(attrs.evolve(a0, balances=balances, locked=locked),),
            )
            sig = bob_key.sign(state_digest(params, state))
            return Propose(base_version=latest.state.version, state=state, signature=sig)

        takes = proposal((a0.balances[0] + 5, a0.balances[1] - 5))
        await conn.send(codec.encode(takes))
        refusal = await _refusal(conn)
        assert isinstance(refusal, Reject) and "takes 5" in refusal.reason
        locks = proposal((a0.balances[0] - 4, a0.balances[1]), locked=4)
        await conn.send(codec.encode(locks))
        refusal = await _refusal(conn)
        assert isinstance(refusal, Reject) and "locked" in refusal.reason
        assert alice.latest(cid) == latest
        pays = proposal((a0.balances[0] - 5, a0.balances[1] + 5))
        await conn.send(codec.encode(pays))
        with trio.fail_after(5):
            while True:
                msg = codec.decode(await conn.receive())
                if isinstance(msg, codec.Accept):
                    break
        assert msg.version == v
        await alice.drain()
        now = alice.latest(cid)
        assert now is not None and now.state == pays.state


async def test_a_late_accept_behind_a_stale_proposal_of_the_peer_keeps_the_pay(
    tmp_path: Path,
) -> None:
    """Bob refuses alice's pay of 10 for good, then in one write sends a proposal of his
    built on the state before it (paying alice 1, which her policy, judging it against
    that state, allows) and a late Accept for the refused pay.  ``pay`` returns the
    revived state, and bob's proposal is refused: countersigned on top, it made alice's
    latest lack the pay her caller was told is made."""
    async with alice_and_a_raw_bob(tmp_path, update_timeout=3) as (alice, conn, bob_key, cid):
        params = alice.params(cid)

        async def respond(p: Propose, kept: SignedState, start: SignedState) -> None:
            a0 = start.state.allocations[0]
            stale_state = attrs.evolve(
                start.state,
                version=p.state.version + 1,
                allocations=(attrs.evolve(a0, balances=(a0.balances[0] - 1, a0.balances[1] + 1)),),
            )
            stale = Propose(
                base_version=start.state.version,
                state=stale_state,
                signature=bob_key.sign(state_digest(params, stale_state)),
            )
            late = codec.Accept(
                channel_id=cid, version=p.state.version, signature=kept.signatures[0] or b""
            )
            await conn.send_many(
                [
                    _reject(params, p, "over the risk limit"),
                    codec.encode(stale),
                    codec.encode(late),
                ]
            )
            refusal = await _refusal(conn)
            assert isinstance(refusal, Reject) and refusal.version == stale_state.version

        returned, kept = await _a_pay_bob_answers(alice, conn, bob_key, cid, respond)
        assert returned == [kept]
        await alice.drain()
        assert alice.latest(cid) == kept


async def test_a_restart_on_a_revived_latest_state_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob refuses alice's pay for good (``UpdateRejected``) and later brings it back
    co-signed: alice warns at once, and again when she restarts while that state is
    still her latest (the store marks it), since what it held may never have been
    reported to a caller."""
    async with alice_and_a_raw_bob(tmp_path, update_timeout=3) as (alice, conn, bob_key, cid):
        params = alice.params(cid)
        signer = alice.signer

        async with trio.open_nursery() as n:

            async def refused_pay() -> None:
                with pytest.raises(UpdateRejected):
                    await alice.pay(cid, ETH, 10)

            n.start_soon(refused_pay)
            p = await _next_proposal(conn)
            await conn.send(_reject(params, p, "over the risk limit"))
        kept = _bobs_copy(params, bob_key, p)
        with caplog.at_level(logging.WARNING, logger="optichannel.client"):
            await conn.send(
                codec.encode(codec.Sync(latest=kept, max_signed=p.state.version, pending=()))
            )
            with trio.fail_after(5):
                while alice.latest(cid) != kept:  # noqa: ASYNC110 - the resync
                    await trio.sleep(0.01)
        assert any("made after all" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optichannel.client"):
        async with open_client(signer, tmp_path / "alice.sqlite", port=None) as again:
            assert again.latest(cid) == kept
    assert any("brought back co-signed" in r.getMessage() for r in caplog.records)
