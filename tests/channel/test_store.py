"""The SQLite store on real files: durability settings, batches, rule S and ownership."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest

from channel.eip712 import state_digest
from channel.errors import StoreError
from channel.keys import Signer
from channel.machine import (
    ROW_NEW,
    ROW_OWN,
    ActionPropose,
    ChannelMachine,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    PersistRevived,
)
from channel.state import ETH, Allocation, Params, SignedState, State
from channel.store import (
    BURNED,
    COSIGNED,
    IN_FLIGHT,
    SCHEMA_VERSION,
    PersistChannel,
    Store,
    StoreLock,
    StoreOp,
)

ALICE = Signer.from_bytes(b"\x01" * 32)
BOB = Signer.from_bytes(b"\x02" * 32)


def make_params(salt: bytes = b"\x5a" * 32) -> Params:
    return Params.new(
        chain_id=31337,
        adjudicator=b"\xad" * 20,
        participants=(ALICE.address, BOB.address),
        challenge_duration=3600,
        salt=salt,
    )


def pay(base: State, version: int, amount: int = 1) -> State:
    eth = base.allocations[0]
    moved = attrs.evolve(eth, balances=(eth.balances[0] - amount, eth.balances[1] + amount))
    return attrs.evolve(base, version=version, allocations=(moved, *base.allocations[1:]))


def cosign(params: Params, state: State) -> SignedState:
    d = state_digest(params, state)
    return SignedState(state=state, signatures=(ALICE.sign(d), BOB.sign(d)))


def proposal(params: Params, base_version: int, state: State) -> PersistProposal:
    return PersistProposal(
        params=params,
        me=0,
        base_version=base_version,
        state=state,
        signature=ALICE.sign(state_digest(params, state)),
    )


@attrs.frozen
class Fixture:
    params: Params
    v0: State


def opened(store: Store, salt: bytes = b"\x5a" * 32) -> Fixture:
    """A channel (alice's view) with v0 co-signed."""
    params = make_params(salt)
    v0 = State.initial(params, [(ETH, 100, 100), (b"\x70" * 20, 5, 5)])
    store.apply(
        [
            PersistChannel(params=params, me=0, peer_node_id=BOB.node_id, peer_addr="127.0.0.1:9"),
            PersistLatest(params=params, signed=cosign(params, v0)),
        ]
    )
    return Fixture(params=params, v0=v0)


def contents(store: Store, params: Params) -> tuple[object, ...]:
    return (tuple(store.load()), tuple(store.signed_states(params.channel_id)))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "alice.sqlite"


def test_wal_and_synchronous_full(path: Path) -> None:
    """The store's connection runs in WAL mode with synchronous=FULL (2), temp tables in memory."""
    store = Store(path, owner=ALICE.address)
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    # WAL mode is persistent in the file itself
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_round_trip_rebuilds_channel(path: Path) -> None:
    """apply then load (after reopening) returns latest, max_signed and in-flight proposals."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    v2 = pay(v1, 2)
    v3 = pay(v2, 3)
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    store.apply([proposal(f.params, 1, v2), proposal(f.params, 2, v3)])
    store.close()

    store = Store(path, owner=ALICE.address)
    (rec,) = store.load()
    assert rec.params == f.params and rec.params.channel_id == f.params.channel_id
    assert rec.me == 0 and rec.peer_node_id == BOB.node_id and rec.peer_addr == "127.0.0.1:9"
    assert rec.latest == cosign(f.params, v1)
    assert rec.max_signed == 3
    assert [p.proposal.state for p in rec.in_flight] == [v2, v3]
    assert [p.proposal.base_version for p in rec.in_flight] == [1, 2]
    assert [p.digest for p in rec.in_flight] == [state_digest(f.params, s) for s in (v2, v3)]
    assert all(p.proposal.signature == ALICE.sign(p.digest) for p in rec.in_flight)
    statuses = [(v, s) for v, s, _ in store.signed_states(f.params.channel_id)]
    assert statuses == [(0, COSIGNED), (1, COSIGNED), (2, IN_FLIGHT), (3, IN_FLIGHT)]


def test_machine_outputs_persist_and_resume(path: Path) -> None:
    """A machine rebuilt from the store continues where the persisted one stopped."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    m = ChannelMachine(
        params=f.params, me=0, sign=ALICE.sign, latest=cosign(f.params, f.v0), max_signed=0
    )
    for uid in (1, 2):
        tip = m.tip()
        outs = m.handle(
            ActionPropose(
                update_id=uid, allocations=pay(tip, 0).allocations, base_version=tip.version
            )
        )
        store.apply([o for o in outs if isinstance(o, PersistProposal)])
    store.close()

    store = Store(path, owner=ALICE.address)
    (rec,) = store.load()
    m2 = ChannelMachine(
        params=rec.params,
        me=rec.me,
        sign=ALICE.sign,
        latest=rec.latest,
        max_signed=rec.max_signed,
        pending=list(rec.in_flight),
    )
    assert m2.latest == m.latest and m2.max_signed == m.max_signed == 2
    assert [p.proposal for p in m2.pending] == [p.proposal for p in m.pending]
    assert m2.sync_messages() == m.sync_messages()
    tip = m2.tip()
    outs = m2.handle(
        ActionPropose(update_id=3, allocations=pay(tip, 0).allocations, base_version=tip.version)
    )
    (pp,) = [o for o in outs if isinstance(o, PersistProposal)]
    assert pp.state.version == 3 and pp.base_version == 2
    store.apply([pp])


def test_latest_burns_older_in_flight_and_drop_burns_rest(path: Path) -> None:
    """A new latest burns in-flight proposals below it; a drop burns those from a version on."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1, v2, v3 = pay(f.v0, 1), pay(f.v0, 2, 2), pay(f.v0, 3, 3)
    store.apply([proposal(f.params, 0, v1), proposal(f.params, 1, v2), proposal(f.params, 2, v3)])
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v2))])
    store.apply([PersistDropProposals(params=f.params, from_version=3)])
    (rec,) = store.load()
    assert rec.latest is not None and rec.latest.state == v2
    assert rec.in_flight == () and rec.max_signed == 3
    statuses = [(v, s) for v, s, _ in store.signed_states(f.params.channel_id)]
    assert statuses == [(0, COSIGNED), (1, BURNED), (2, COSIGNED), (3, BURNED)]


def test_failing_op_rolls_back_whole_batch(path: Path) -> None:
    """If any op in a batch fails, none of the batch is applied (all or nothing)."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([proposal(f.params, 0, v1)])
    before = contents(store, f.params)
    other = make_params(b"\x01" * 32)
    batch = [
        PersistChannel(params=other, me=0, peer_node_id=BOB.node_id),
        PersistLatest(params=f.params, signed=cosign(f.params, v1)),
        proposal(f.params, 1, pay(v1, 2)),
        proposal(f.params, 0, v1),  # v1 signed again: rule S violation, fails the batch
    ]
    with pytest.raises(StoreError):
        store.apply(batch)
    assert contents(store, f.params) == before
    store.close()
    store = Store(path, owner=ALICE.address)
    assert contents(store, f.params) == before
    # the store still works afterwards
    store.apply(batch[:3])
    (rec, _) = sorted(store.load(), key=lambda r: r.params != f.params)
    assert rec.latest is not None and rec.latest.state == v1 and rec.max_signed == 2


@pytest.mark.parametrize("back_to", [0, 1, 2])
def test_latest_never_rolls_back(path: Path, back_to: int) -> None:
    """Persisting a latest at or below the current latest raises StoreError; nothing changes."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    states = [f.v0]
    for v in (1, 2):
        states.append(pay(states[-1], v))
        store.apply([PersistLatest(params=f.params, signed=cosign(f.params, states[-1]))])
    before = contents(store, f.params)
    other = pay(f.v0, back_to, 50)  # a different state at the old version
    for signed in (cosign(f.params, states[back_to]), cosign(f.params, other)):
        with pytest.raises(StoreError):
            store.apply([PersistLatest(params=f.params, signed=signed)])
        assert contents(store, f.params) == before


@pytest.mark.parametrize("existing", ["in-flight", "cosigned", "burned"])
def test_resigning_a_version_refused(path: Path, existing: str) -> None:
    """A proposal at a version we already signed (in flight, co-signed or burned) raises
    StoreError and leaves the store unchanged (rule S)."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([proposal(f.params, 0, v1)])
    if existing == "cosigned":
        store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    elif existing == "burned":
        store.apply([PersistDropProposals(params=f.params, from_version=1)])
    before = contents(store, f.params)
    for again in (v1, pay(f.v0, 1, 7)):
        with pytest.raises(StoreError):
            store.apply([proposal(f.params, 0, again)])
        assert contents(store, f.params) == before


@pytest.mark.parametrize("existing", ["in-flight", "burned"])
def test_latest_differing_from_our_signed_state_refused(path: Path, existing: str) -> None:
    """A co-signed latest that differs from the state we signed at that version is refused."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([proposal(f.params, 0, v1)])
    if existing == "burned":
        store.apply([PersistDropProposals(params=f.params, from_version=1)])
    before = contents(store, f.params)
    with pytest.raises(StoreError):
        store.apply([PersistLatest(params=f.params, signed=cosign(f.params, pay(f.v0, 1, 9)))])
    assert contents(store, f.params) == before


def test_latest_completing_our_proposal_is_allowed(path: Path) -> None:
    """Our own in-flight proposal, once co-signed, becomes the latest at the same version."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([proposal(f.params, 0, v1)])
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, v1) and rec.in_flight == ()


def test_newer_schema_refused(path: Path) -> None:
    """A store written by a newer release (higher schema version) is refused with StoreError."""
    store = Store(path, owner=ALICE.address)
    opened(store)
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="schema"):
        Store(path, owner=ALICE.address)
    # and the refusal did not touch it
    raw = sqlite3.connect(path)
    (v,) = raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    raw.close()
    assert int(v) == SCHEMA_VERSION + 1


def test_other_owner_refused(path: Path) -> None:
    """A store that belongs to another key is refused with StoreError; its owner reopens it."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    store.close()
    with pytest.raises(StoreError):
        Store(path, owner=BOB.address)
    store = Store(path, owner=ALICE.address)
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, f.v0)


def test_corrupt_file_refused(tmp_path: Path) -> None:
    """A file that is not an SQLite database raises StoreError, not sqlite3's error."""
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Store(bad, owner=ALICE.address)


def test_many_channels_all_load(path: Path) -> None:
    """Several channels in one store all come back from load, each with its own state."""
    store = Store(path, owner=ALICE.address)
    fixtures = [opened(store, salt=bytes([i]) * 32) for i in range(1, 6)]
    store.close()
    store = Store(path, owner=ALICE.address)
    recs = {r.params.channel_id: r for r in store.load()}
    assert set(recs) == {f.params.channel_id for f in fixtures}
    for f in fixtures:
        assert recs[f.params.channel_id].params == f.params
        assert recs[f.params.channel_id].latest == cosign(f.params, f.v0)


def test_allocation_with_locked_amounts_round_trips(path: Path) -> None:
    """A state with locked amounts and app data survives the store byte for byte."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    eth = f.v0.allocations[0]
    v1 = attrs.evolve(
        f.v0,
        version=1,
        allocations=(
            Allocation(asset=eth.asset, balances=(90, 95), locked=15),
            *f.v0.allocations[1:],
        ),
        app_data=b"\x00\x01option",
    )
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    (rec,) = store.load()
    assert rec.latest is not None and rec.latest.state == v1


def _own(params: Params, state: State) -> PersistLatest:
    return PersistLatest(params=params, signed=cosign(params, state), row=ROW_OWN)


def test_many_proposals_and_their_completions_in_one_batch_each(path: Path) -> None:
    """600 proposals in one commit, then their 600 countersignatures in the next (more
    rows than one multi-row statement holds): every row ends co-signed, none in flight."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    states = [f.v0]
    for v in range(1, 601):
        states.append(pay(states[-1], v, 0))  # nothing moves: only the version differs
    store.apply([proposal(f.params, v - 1, states[v]) for v in range(1, 601)])
    store.apply([_own(f.params, states[v]) for v in range(1, 601)])
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, states[600]) and rec.in_flight == ()
    assert rec.max_signed == 600
    trail = store.signed_states(f.params.channel_id)
    assert [(v, status) for v, status, _ in trail] == [(v, COSIGNED) for v in range(601)]
    assert all(s == cosign(f.params, states[v]) for v, _, s in trail)


@pytest.mark.parametrize("existing", ["missing", "burned", "cosigned"])
def test_completing_a_row_that_is_not_our_proposal_in_flight_is_refused(
    path: Path, existing: str
) -> None:
    """A countersignature for our 'own' proposal that is not in flight (never written,
    burned, or already co-signed) raises StoreError and changes nothing."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1, v2 = pay(f.v0, 1), pay(pay(f.v0, 1), 2)
    store.apply([proposal(f.params, 0, v1)])
    if existing == "burned":
        store.apply([PersistDropProposals(params=f.params, from_version=1)])
    elif existing == "cosigned":
        store.apply([_own(f.params, v1)])
    target = v2 if existing == "missing" else v1
    before = contents(store, f.params)
    with pytest.raises(StoreError):
        store.apply([_own(f.params, target)])
    assert contents(store, f.params) == before


def test_fresh_countersignature_at_a_signed_version_is_refused(path: Path) -> None:
    """A 'new' co-signed state at a version we already signed raises StoreError (rule S),
    even inside a run of otherwise fine rows; the whole batch is rolled back."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([proposal(f.params, 0, v1)])
    before = contents(store, f.params)
    other_v1 = pay(f.v0, 1, 5)
    batch = [
        PersistLatest(params=f.params, signed=cosign(f.params, other_v1), row=ROW_NEW),
        PersistLatest(params=f.params, signed=cosign(f.params, pay(other_v1, 2)), row=ROW_NEW),
    ]
    with pytest.raises(StoreError):
        store.apply(batch)
    assert contents(store, f.params) == before


def _commit_pays(store: Store, f: Fixture, states: list[State], n: int, *, complete: bool) -> None:
    """Commit ``n`` more pays on top of ``states`` (appended), as a lock-step proposer
    does: its proposal, then (``complete``) its countersigned completion."""
    for _ in range(n):
        v = len(states)
        states.append(pay(states[-1], v, 0))
        store.apply([proposal(f.params, v - 1, states[v])])
        if complete:
            store.apply([_own(f.params, states[v])])


def test_background_checkpoint_copies_the_wal_and_commits_never_do(path: Path) -> None:
    """With checkpoint_in_background, commits leave every page in the WAL (no commit
    pays for a checkpoint); checkpoint() from another thread backfills them all, and a
    reopened store holds everything."""
    store = Store(path, owner=ALICE.address)
    store.checkpoint_in_background()
    f = opened(store)
    states = [f.v0]
    _commit_pays(store, f, states, 400, complete=True)
    wal = path.with_name(path.name + "-wal")
    db_size = path.stat().st_size
    assert wal.stat().st_size > 1000 * 4096  # past the automatic 1000-page mark
    worker = threading.Thread(target=store.checkpoint)
    worker.start()
    worker.join()
    assert path.stat().st_size > db_size + 400 * 300  # the states reached the database
    store.close()
    (rec,) = Store(path, owner=ALICE.address).load()
    assert rec.latest == cosign(f.params, states[400])


def test_a_complete_checkpoint_lets_the_wal_start_over(path: Path) -> None:
    """checkpoint() reports whether it copied the whole WAL.  A snapshot held by a reader
    keeps it from doing so (False); once the reader is gone it does (True), and the
    commits after it write the WAL over from its start instead of growing it."""
    store = Store(path, owner=ALICE.address)
    store.checkpoint_in_background()
    f = opened(store)
    wal = path.with_name(path.name + "-wal")
    states = [f.v0]

    def commit_pays(n: int) -> None:
        _commit_pays(store, f, states, n, complete=False)

    commit_pays(50)
    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM states").fetchall()  # a snapshot at 50 pays
    commit_pays(50)
    assert store.checkpoint() is False  # the pages after the reader's snapshot stay
    reader.execute("COMMIT")
    reader.close()
    assert store.checkpoint() is True
    size = wal.stat().st_size
    for _ in range(3):
        commit_pays(50)
        assert store.checkpoint() is True
        assert wal.stat().st_size <= size  # written over, not appended to
    store.close()
    (rec,) = Store(path, owner=ALICE.address).load()
    assert [p.proposal.state.version for p in rec.in_flight] == list(range(1, 251))


def test_warm_wal_gives_a_fresh_wal_its_blocks_once_and_commits_write_over_them(
    path: Path,
) -> None:
    """warm_wal grows a fresh WAL to the size asked for and checkpoints it, so the
    commits after it write the file over from its start: it does not grow while they
    fit.  On a WAL that is large enough already it does nothing.  The padding leaves no
    table behind and does not grow the database file, and the store holds exactly what
    was committed.  It works whether the store's automatic checkpoint is on or not."""
    store = Store(path, owner=ALICE.address)  # automatic checkpoints on, as when opened
    wal = path.with_name(path.name + "-wal")
    nbytes = 2 * 1024 * 1024
    assert store.warm_wal(nbytes) is True
    size = wal.stat().st_size
    assert size >= nbytes
    assert path.stat().st_size < 64 * 1024  # the schema's pages: none of the padding
    store.checkpoint_in_background()
    assert store.warm_wal(nbytes) is False
    assert store.warm_wal(size) is False
    f = opened(store)
    states = [f.v0]
    for v in range(1, 61):  # ~3.3 pages a commit: ~1.6 MB of WAL
        _commit_pays(store, f, states, 1, complete=True)
        assert wal.stat().st_size == size, f"the WAL grew at v{v}"
    tables = {r[0] for r in sqlite3.connect(str(path)).execute("SELECT name FROM sqlite_master")}
    assert "wal_pad" not in tables
    store.close()
    (rec,) = Store(path, owner=ALICE.address).load()
    assert rec.latest == cosign(f.params, states[60])
    assert rec.in_flight == ()


def test_warm_wal_after_a_crash_keeps_the_committed_wal(path: Path) -> None:
    """A store reopened over a WAL that a killed process left (not checkpointed) gets its
    padding after those frames, never over them: everything committed is still there."""
    store = Store(path, owner=ALICE.address)
    store.checkpoint_in_background()
    f = opened(store)
    _commit_pays(store, f, [f.v0], 30, complete=False)
    wal = path.with_name(path.name + "-wal")
    # What a SIGKILL leaves: the WAL and its frames (a clean close would delete it).
    left = {p: p.read_bytes() for p in (path, wal)}
    store.close()
    for p, data in left.items():
        p.write_bytes(data)
    reopened = Store(path, owner=ALICE.address)
    assert reopened.warm_wal(2 * 1024 * 1024) is True
    (rec,) = reopened.load()
    assert [p.proposal.state.version for p in rec.in_flight] == list(range(1, 31))
    reopened.close()


def test_completing_a_proposal_settles_our_proposals_below_it(path: Path) -> None:
    """One Accept covers every proposal up to its version: completing v3 (which the
    machine marks ``retires_below``) leaves none of v1..v3 in flight (a restart must not
    re-send v1 and v2), while v4 above it stays."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    states = [f.v0]
    for v in range(1, 5):
        states.append(pay(states[-1], v, 0))
        store.apply([proposal(f.params, v - 1, states[v])])
    store.apply([attrs.evolve(_own(f.params, states[3]), retires_below=True)])
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, states[3])
    assert [p.proposal.state.version for p in rec.in_flight] == [4]
    assert rec.max_signed == 4


def test_interleaved_channels_in_one_batch_keep_each_channels_order(path: Path) -> None:
    """A batch interleaving two channels, each with a completion of our proposal followed
    by a fresh co-signed state from the peer, lands whole: rows of a run are written
    together, but each channel's latest follows its own order (and may not go back)."""
    store = Store(path, owner=ALICE.address)
    fa, fb = opened(store, salt=b"\x01" * 32), opened(store, salt=b"\x02" * 32)
    a1, b1 = pay(fa.v0, 1), pay(fb.v0, 1)
    store.apply([proposal(fa.params, 0, a1), proposal(fb.params, 0, b1)])
    a2, b2 = pay(a1, 2), pay(b1, 2)
    fresh = [
        PersistLatest(params=f.params, signed=cosign(f.params, s), row=ROW_NEW)
        for f, s in ((fa, a2), (fb, b2))
    ]
    store.apply([_own(fa.params, a1), _own(fb.params, b1), fresh[0], fresh[1]])
    recs = {r.params.channel_id: r for r in store.load()}
    assert recs[fa.params.channel_id].latest == cosign(fa.params, a2)
    assert recs[fb.params.channel_id].latest == cosign(fb.params, b2)
    assert all(r.in_flight == () for r in recs.values())
    # ... and within one batch a channel's latest still may not go back
    a3, a4 = pay(a2, 3), pay(a2, 4)
    new = [
        PersistLatest(params=fa.params, signed=cosign(fa.params, s), row=ROW_NEW) for s in (a4, a3)
    ]
    with pytest.raises(StoreError, match="roll latest back"):
        store.apply(new)
    recs = {r.params.channel_id: r for r in store.load()}
    assert recs[fa.params.channel_id].latest == cosign(fa.params, a2)


@pytest.mark.parametrize("channels", [2, 7])
def test_a_batch_over_several_channels_names_the_one_that_would_roll_back(
    path: Path, channels: int
) -> None:
    """The per-channel latest moves in keyed statements for a few channels and in one
    statement for many; either way, when one channel's latest would go back, the whole
    batch is refused, and the error names that channel."""
    store = Store(path, owner=ALICE.address)
    fs = [opened(store, salt=bytes([i + 1]) * 32) for i in range(channels)]
    v2 = [pay(pay(f.v0, 1), 2) for f in fs]
    store.apply(
        [
            PersistLatest(params=f.params, signed=cosign(f.params, s))
            for f, s in zip(fs, v2, strict=True)
        ]
    )
    before = [contents(store, f.params) for f in fs]
    bad = channels // 2
    batch = [
        PersistLatest(
            params=f.params,
            signed=cosign(f.params, s if i == bad else pay(s, 3)),  # bad: already the latest
        )
        for i, (f, s) in enumerate(zip(fs, v2, strict=True))
    ]
    with pytest.raises(StoreError, match=fs[bad].params.channel_id.hex()[:16]):
        store.apply(batch)
    assert [contents(store, f.params) for f in fs] == before


@pytest.mark.parametrize("channels", [1, 3, 7])
def test_proposals_and_completions_over_several_channels(path: Path, channels: int) -> None:
    """A batch of proposals on a few channels (keyed statements) or many (one statement
    per run), then a batch of their countersignatures: each channel ends with its own
    latest and max_signed, nothing in flight; completing them again is refused whole."""
    store = Store(path, owner=ALICE.address)
    fs = [opened(store, salt=bytes([i + 1]) * 32) for i in range(channels)]
    ones = [pay(f.v0, 1, i) for i, f in enumerate(fs)]
    store.apply([proposal(f.params, 0, s) for f, s in zip(fs, ones, strict=True)])
    assert all(r.max_signed == 1 and r.latest is not None for r in store.load())
    store.apply([_own(f.params, s) for f, s in zip(fs, ones, strict=True)])
    recs = {r.params.channel_id: r for r in store.load()}
    for f, s in zip(fs, ones, strict=True):
        rec = recs[f.params.channel_id]
        assert rec.latest == cosign(f.params, s) and rec.in_flight == () and rec.max_signed == 1
    before = [contents(store, f.params) for f in fs]
    with pytest.raises(StoreError, match="not all our in-flight proposals"):
        store.apply([_own(f.params, s) for f, s in zip(fs, ones, strict=True)])
    assert [contents(store, f.params) for f in fs] == before


def _history(store: Store, params: Params, upto: int) -> list[State]:
    """v1..v``upto`` proposed and countersigned one by one (v0 is there already)."""
    (rec,) = [r for r in store.load() if r.params == params]
    assert rec.latest is not None
    states = [rec.latest.state]
    for v in range(1, upto + 1):
        states.append(pay(states[-1], v, 0))
        store.apply([proposal(params, v - 1, states[v])])
        store.apply([_own(params, states[v])])
    return states


def test_prune_history_keeps_what_a_dispute_needs(path: Path) -> None:
    """Pruning deletes, oldest first and at most ``limit`` a call, the states below the
    latest co-signed one, and nothing else: the latest, our proposals in flight above it,
    and max_signed stay, and the channel reloads as before."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    states = _history(store, f.params, 10)
    states.append(pay(states[10], 11, 0))
    states.append(pay(states[11], 12, 0))
    store.apply([proposal(f.params, 10, states[11]), proposal(f.params, 11, states[12])])
    (before,) = store.load()
    assert store.prune_history(f.params.channel_id, limit=3) == 3
    assert [v for v, _, _ in store.signed_states(f.params.channel_id)][:2] == [3, 4]
    assert store.prune_history(f.params.channel_id, limit=100) == 7
    assert store.prune_history(f.params.channel_id, limit=100) == 0
    trail = store.signed_states(f.params.channel_id)
    assert [(v, s) for v, s, _ in trail] == [(10, COSIGNED), (11, IN_FLIGHT), (12, IN_FLIGHT)]
    assert store.load() == [before]  # latest, in flight, max_signed: all as they were


@pytest.mark.parametrize("channels", [1, 7])
@pytest.mark.parametrize("with_latest", [False, True])
def test_a_proposal_not_above_the_latest_is_refused_after_pruning(
    path: Path, channels: int, with_latest: bool
) -> None:
    """Once the rows below the latest are gone, no primary key catches a second state at
    a pruned version: the store refuses a proposal that is not above the latest co-signed
    version itself (alone, or beside a latest that moves in the same batch; with a few
    channels or many), names the channel, and changes nothing."""
    store = Store(path, owner=ALICE.address)
    fs = [opened(store, salt=bytes([i + 1]) * 32) for i in range(channels)]
    tips = [_history(store, f.params, 3)[-1] for f in fs]
    for f in fs:
        assert store.prune_history(f.params.channel_id, limit=100) == 3
    before = [contents(store, f.params) for f in fs]
    bad = channels // 2
    batch: list[StoreOp] = []
    for i, (f, tip) in enumerate(zip(fs, tips, strict=True)):
        if with_latest:  # the peer's v4 countersigned, and our v5 on top of it
            v4 = pay(tip, 4, 0)
            batch.append(PersistLatest(params=f.params, signed=cosign(f.params, v4), row=ROW_NEW))
            tip = v4
        again = pay(f.v0, 2, 7)  # a second state at pruned v2
        batch.append(
            proposal(f.params, 1, again) if i == bad else proposal(f.params, 4, pay(tip, 5))
        )
    with pytest.raises(StoreError, match=f"{fs[bad].params.channel_id.hex()[:16]}.*rule S"):
        store.apply(batch)
    assert [contents(store, f.params) for f in fs] == before


def test_a_proposal_below_a_latest_set_earlier_in_the_same_batch_is_refused(path: Path) -> None:
    """Rule S holds within one batch too: a proposal at or below a co-signed latest that
    the same batch sets is refused before anything is written."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    before = contents(store, f.params)
    v10 = pay(f.v0, 10)
    for below in (10, 8):
        batch: list[StoreOp] = [
            PersistLatest(params=f.params, signed=cosign(f.params, v10), row=ROW_NEW),
            proposal(f.params, 9, pay(f.v0, below, 3)),
        ]
        with pytest.raises(StoreError, match=f"proposal at v{below} is not above .*v10.*rule S"):
            store.apply(batch)
        assert contents(store, f.params) == before
    # In the other order (the proposal first, then a latest above it) it is the machine's
    # normal batch, and it commits.
    store.apply(
        [
            proposal(f.params, 0, pay(f.v0, 1)),
            PersistLatest(params=f.params, signed=cosign(f.params, v10), row=ROW_NEW),
        ]
    )
    (rec,) = store.load()
    assert rec.latest is not None and rec.latest.state.version == 10


# -- the lock of a running client ----------------------------------------------

_HOLD_LOCK = """
import sys, time
from channel.store import StoreLock
StoreLock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_store_locked_by_another_process_is_refused_until_that_process_dies(
    tmp_path: Path,
) -> None:
    """The lock names the holder's pid, and a SIGKILLed holder leaves no stale lock
    (the kernel drops a flock with its last descriptor): a crashed client restarts."""
    path = tmp_path / "alice.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        held = rf"in use by another running client \(pid {holder.pid}\)"
        with pytest.raises(StoreError, match=held):
            StoreLock(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = StoreLock(path)
    with pytest.raises(StoreError, match="in use by another running client"):
        StoreLock(path)  # a second lock in one process is refused too
    lock.release()
    StoreLock(path).release()


class _InterruptedAfterCommit:
    """The store's connection, but a ``KeyboardInterrupt`` arrives the instant a COMMIT
    has returned (a signal lands there as anywhere)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = self._db.execute(sql, *args)
        if sql == "COMMIT":
            raise KeyboardInterrupt
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_an_interrupt_right_after_a_commit_comes_out_as_itself_and_the_commit_stands(
    path: Path,
) -> None:
    """The interrupt, not a ``StoreError`` ("cannot rollback - no transaction is
    active", from the rollback of a transaction that had committed), and what was
    committed is there after a restart."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    real = store._db
    store._db = _InterruptedAfterCommit(real)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    store._db = real
    store.close()
    store = Store(path, owner=ALICE.address)
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, v1)
    store.close()


def test_the_audit_trail_shows_only_what_is_committed(path: Path) -> None:
    """``signed_states`` (documented for use while the client runs) while a group commit
    is half done on the committer's connection: it shows the states as last committed,
    not the rows of the open transaction, which may yet roll back."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    before = store.signed_states(f.params.channel_id)
    plan = store.prepare([proposal(f.params, 0, v1)])
    store._db.execute("BEGIN IMMEDIATE")
    for step in plan.steps:
        step(store._db)
    assert store.signed_states(f.params.channel_id) == before
    store._db.execute("ROLLBACK")
    store.apply([proposal(f.params, 0, v1)])
    assert [v for v, _, _ in store.signed_states(f.params.channel_id)] == [0, 1]
    store.close()


def test_a_store_of_schema_1_is_migrated_and_keeps_its_channels(path: Path) -> None:
    """A file written by the first release (schema 1: no ``revived_version``) opens as
    schema 2 with its channel and latest state as they were, not marked revived; a
    ``PersistRevived`` then marks the latest, and only while it is the latest."""
    store = Store(path, owner=ALICE.address)
    f = opened(store)
    v1 = pay(f.v0, 1)
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, v1))])
    store.close()
    raw = sqlite3.connect(path)  # back to what the first release wrote
    raw.execute("ALTER TABLE channels DROP COLUMN revived_version")
    raw.execute("UPDATE meta SET value=1 WHERE key='schema_version'")
    raw.commit()
    raw.close()
    store = Store(path, owner=ALICE.address)
    assert store.schema_version() == SCHEMA_VERSION == 2
    (rec,) = store.load()
    assert rec.latest == cosign(f.params, v1) and not rec.revived
    store.apply([PersistRevived(params=f.params, version=1)])
    (rec,) = store.load()
    assert rec.revived
    store.apply([PersistLatest(params=f.params, signed=cosign(f.params, pay(v1, 2)))])
    (rec,) = store.load()
    assert not rec.revived
    store.close()
