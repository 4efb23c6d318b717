"""A store that stops committing (disk full, an I/O error at fsync) stops the client:
nothing whose commit failed leaves the process, and the store still holds every state
whose signature did leave, so a restart resyncs and loses nothing.

The fault is SQLite's own: every ``COMMIT`` of the failing store's connection raises
``sqlite3.OperationalError`` (what SQLite raises for ``SQLITE_FULL`` or
``SQLITE_IOERR``) from the K-th one on, after the transaction's statements ran, so
SQLite rolls it back.  The counterparty records every signature the failing party put
on the wire (``crash_checks.Recorder``), and ``crash_checks.check_store`` checks the failing
party's store against it, as after a SIGKILL.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from crash_checks import Recorder, check_store
from test_client import _open
from test_client_chaos import Ledger

from channel.client import Client, open_client
from channel.errors import ChannelError, PeerTimeout, StoreError
from channel.keys import Signer
from channel.state import ETH

ADJ = b"\xad" * 20
EACH = 10**12


class FailingCommits:
    """A store connection whose ``COMMIT`` fails from the ``fail_from``-th one on."""

    def __init__(self, db: sqlite3.Connection, fail_from: int) -> None:
        self._db = db
        self.commits = 0
        self.fail_from = fail_from
        self.failed = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.commits += 1
            if self.commits >= self.fail_from:
                self.failed += 1
                raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def _pays(client: Client, cid: bytes, tasks: int, sums: dict[str, int]) -> None:
    """``tasks`` tasks paying 1..9 at a time until cancelled; the amounts summed by
    outcome: returned, refused, unknown (the client stopped or timed out under it)."""
    rng = random.Random()

    async def payer() -> None:
        while True:
            amount = rng.randint(1, 9)
            sums["unknown"] += amount
            try:
                await client.pay(cid, ETH, amount)
            except PeerTimeout:
                continue
            except ChannelError:
                sums["unknown"] -= amount
                sums["refused"] += amount
                continue
            sums["unknown"] -= amount
            sums["returned"] += amount

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(payer)


@pytest.mark.parametrize(
    ("failing", "tasks"),
    [("payer", 1), ("payer", 16), ("payee", 1), ("payee", 16)],
    ids=["payer-lockstep", "payer-pipelined", "payee-lockstep", "payee-pipelined"],
)
async def test_a_store_that_stops_committing_stops_its_client_and_loses_nothing(
    tmp_path: Path, failing: str, tasks: int
) -> None:
    """The failing party is the payer (its proposals' commits fail) or the payee (its
    countersignatures' commits fail), paying one at a time or pipelined.  Its client
    ends with ``StoreError``; nothing it signed reached the peer without being in its
    store; after a restart both sides converge on one co-signed state, and the pays
    that returned are all in it (R <= T <= R + U)."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    fail_from = rng.randint(3, 60)
    key, peer_key = Signer.generate(), Signer.generate()  # test-only keys
    path = tmp_path / "failing.sqlite"
    sums = {"returned": 0, "unknown": 0, "refused": 0}
    async with open_client(peer_key, tmp_path / "peer.sqlite", update_timeout=2) as peer:
        ledger = Ledger()  # the co-signed states the peer made durable, by version
        rec = Recorder(peer, key.address, ledger)
        fault: FailingCommits | None = None
        with pytest.raises(StoreError, match="disk is full"):  # as itself, not in a group
            async with open_client(key, path, update_timeout=2) as client:
                cid = await client.open_channel(
                    peer.peer_address(),
                    chain_id=31337,
                    adjudicator=ADJ,
                    challenge_duration=60,
                    balances=[(ETH, EACH, EACH)],
                )
                fault = FailingCommits(client.store._db, fail_from)
                client.store._db = fault  # type: ignore[assignment]
                payer = client if failing == "payer" else peer
                with trio.fail_after(30):
                    await _pays(payer, cid, tasks, sums)  # until the failed commit ends it
        assert fault is not None and fault.failed >= 1, f"seed {seed}"
        # Every signature the failing party sent is in its store, as after a SIGKILL.
        stats = check_store(path, key, rec)
        assert stats["checked"] >= 1, (seed, stats)
        async with open_client(key, path, update_timeout=2) as client:
            with trio.fail_after(10):
                await client.wait_connected(peer_key.node_id)
                while True:
                    a, b = client.latest(cid), peer.latest(cid)
                    infos = [
                        c for c in (*client.channels(), *peer.channels()) if c.channel_id == cid
                    ]
                    if a is not None and a == b and all(i.in_flight == 0 for i in infos):
                        break
                    await trio.sleep(0.01)
            await client.pay(cid, ETH, 1)  # the channel keeps working
            latest = client.latest(cid)
    assert latest is not None
    payer_index = 0 if failing == "payer" else 1
    moved = (
        EACH - latest.state.allocations[0].balances[payer_index] - (1 if failing == "payer" else -1)
    )
    r, u = sums["returned"], sums["unknown"]
    print(f"seed {seed}: COMMIT {fail_from} failed; store check {stats}; {sums}; moved {moved}")
    assert not ledger.problems and not rec.problems, (ledger.problems, rec.problems)
    assert r > 0  # commits before the K-th succeeded: some pays returned
    assert r <= moved <= r + u, (seed, fail_from, sums, moved)


async def test_an_interrupt_right_after_an_inline_commit_comes_out_as_itself(
    tmp_path: Path,
) -> None:
    """A KeyboardInterrupt lands the instant a lock-step commit on the Trio thread
    returned: the client ends with that interrupt, not a ``StoreError`` (the flusher
    committed the same batch again: "already signed (rule S)"), and what was committed
    is there after a restart."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    caught: list[BaseException] = []
    async with open_client(bob_key, tmp_path / "bob.sqlite") as bob:
        try:
            async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
                cid = await _open(alice, bob, 10**6)
                for _ in range(3):
                    await alice.pay(cid, ETH, 1)
                real = alice.store.commit
                interrupted: list[int] = []

                def commit(plan: Any) -> None:
                    real(plan)
                    if not interrupted and alice.outbox.ops:  # inline: still queued
                        interrupted.append(1)
                        raise KeyboardInterrupt

                alice.store.commit = commit  # type: ignore[method-assign]
                await alice.pay(cid, ETH, 1)
                await alice.pay(cid, ETH, 1)
        except BaseException as exc:  # what ends the client is the subject
            caught.append(exc)
        assert interrupted, "no inline commit ran"
    assert len(caught) == 1 and type(caught[0]) is KeyboardInterrupt, caught
    async with open_client(alice_key, tmp_path / "alice.sqlite", port=None) as again:
        latest = again.latest(cid)
        assert latest is not None and latest.state.version >= 3
