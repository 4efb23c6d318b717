"""Chaos over real components: three clients (real TCP, real SQLite stores), four
channels (two between the same pair), pays in both directions from many tasks at once,
while links are dropped at random moments and clients are restarted from their stores
(their pays cancelled first, then ``open_client`` left and reopened with the same key,
store and port).

Each channel's maker (participant 0) pays only in ETH and its taker only in TOKEN, so
each asset's movement is one direction only.  For each channel and direction, with R the
sum of the pays that returned a co-signed state and U the sum of those whose outcome is
unknown (``PeerTimeout``, or cancelled while awaiting), the net transfer T must satisfy
``R <= T <= R + U`` once everything has reconnected and settled; pays that raised
``UpdateRejected`` or ``LocalProtocolError`` are not reflected.  Every co-signed state
either client ever reported is checked too: one state per version, the payer's balance
never rising with the version, and every returned pay reflected from its own version on.
A pay is ``Client.pay``'s update made through ``Client.update`` with the pay's id as app
data, so each co-signed state names the pay whose proposal it is: that pay must not have
failed, and no other co-signed state may name it (it would be paid twice).  At the end,
both sides of each channel hold the same state signed by both keys, with nothing in
flight, and so does each store file (read by a separate read-only connection).

Seeded: ``CHAOS_SEED=<n>`` replays a run's random choices (the scheduling of real
sockets and threads is not replayable, so a failure may need a few runs to recur); the
seed is printed, and attached to any failure.

The last test is what this one found, made deterministic.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import attrs
import trio
import trio.lowlevel
from test_client_many import _file_latest, _in_flight_rows

from channel.client import Client, Update, UpdateFn, open_client
from channel.eip712 import state_digest
from channel.errors import LocalProtocolError, PeerTimeout, UpdateRejected
from channel.keys import Signer, recover
from channel.state import ETH, Allocation, Params, SignedState, State
from channel.storeplan import COSIGNED

ADJ = b"\xad" * 20
TOKEN = b"\x70" * 20
EACH = 10**15  # opening balance of each side in each asset: pays never run out
MAX_AMOUNT = 1_000
#: Short, so that pays to a client that is down resolve (as PeerTimeout) quickly.
UPDATE_TIMEOUT = 2.0
#: How long the chaos runs while the pays go on.
CHAOS_SECONDS = 8.0
#: Paying tasks per channel and side.
PAYERS = 6
#: ``(maker, taker)`` party indices: A-B twice, A-C, B-C.
CHANNELS = [(0, 1), (0, 1), (0, 2), (1, 2)]
#: The asset each role pays in: the maker (participant 0) ETH, the taker TOKEN.
ROLE_ASSET = (ETH, TOKEN)

RETURNED, UNKNOWN, REFUSED = "returned", "unknown", "refused"


# -- the ledger: what every pay did, and every co-signed state anyone reported ---------


@attrs.define
class Ledger:
    #: (channel index, asset) -> sums and counts of amounts by outcome.
    sums: defaultdict[tuple[int, bytes], Counter[str]] = attrs.field(
        factory=lambda: defaultdict(Counter)
    )
    counts: Counter[str] = attrs.field(factory=Counter)
    #: Exception type and reason of the refused pays (reported, not asserted).
    refusals: Counter[str] = attrs.field(factory=Counter)
    #: (channel index, asset) -> (version of the returned state, amount) of each returned pay.
    returned: defaultdict[tuple[int, bytes], list[tuple[int, int]]] = attrs.field(
        factory=lambda: defaultdict(list)
    )
    #: channel id -> version -> the co-signed state reported at that version.
    states: defaultdict[bytes, dict[int, SignedState]] = attrs.field(
        factory=lambda: defaultdict(dict)
    )
    #: Problems seen while running (two different co-signed states at one version, ...).
    problems: list[str] = attrs.field(factory=list)
    #: Pay id -> (channel index, asset, amount); its outcome; why it was refused.
    pays: list[tuple[int, bytes, int]] = attrs.field(factory=list)
    outcomes: dict[int, str] = attrs.field(factory=dict)
    reasons: dict[int, str] = attrs.field(factory=dict)

    def new_pay(self, chan: int, asset: bytes, amount: int) -> int:
        self.pays.append((chan, asset, amount))
        return len(self.pays) - 1

    def note_state(self, who: str, signed: SignedState) -> None:
        cid, version = signed.state.channel_id, signed.state.version
        seen = self.states[cid].get(version)
        if seen is None:
            self.states[cid][version] = signed
        elif seen.state != signed.state:
            self.problems.append(
                f"{who}: channel {cid.hex()[:16]} has two different co-signed states at "
                f"v{version}: {seen.state} and {signed.state}"
            )

    def on_state(self, who: str, params: Params, signed: SignedState) -> None:
        """A client's state listener: every co-signed state it made durable."""
        self.note_state(who, signed)


@attrs.define(eq=False)
class Chan:
    index: int
    maker: int
    taker: int
    cid: bytes = b""


# -- one party: a client that can be restarted from its store -------------------------


@attrs.define(eq=False)
class Party:
    name: str
    key: Signer
    path: Path
    ledger: Ledger
    seed: int
    port: int = 0
    client: Client | None = None
    #: (channel, our role) of each channel we pay on, set once the channels are open.
    pays_on: list[tuple[Chan, int]] = attrs.field(factory=list)
    paying: bool = False
    done: bool = False
    lives: int = 0
    up: trio.Event = attrs.field(factory=trio.Event)
    down: trio.Event = attrs.field(factory=trio.Event)
    leave: trio.Event = attrs.field(factory=trio.Event)
    back: trio.Event = attrs.field(factory=trio.Event)
    pay_scope: trio.CancelScope | None = None
    payers_done: trio.Event = attrs.field(factory=trio.Event)
    _life: trio.Nursery | None = None  # the running client's nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the client; on ``leave`` cancel its pays, leave ``open_client`` cleanly,
        then (unless ``done``) wait for ``back`` and reopen it from the same store, with
        the same key and port (the peers that dialled it redial that address)."""
        first = True
        while True:
            leave = self.leave
            async with open_client(
                self.key, self.path, port=self.port, update_timeout=UPDATE_TIMEOUT
            ) as client:
                self.port = client.peer_address().port
                client.add_state_listener(partial(self.ledger.on_state, self.name))
                self.client = client
                self.lives += 1
                async with trio.open_nursery() as n:
                    self._life = n
                    if self.paying:
                        await n.start(self._payers, client)
                    self.up.set()
                    if first:
                        first = False
                        task_status.started()
                    await leave.wait()
                    # The pays go first (each one cancelled while awaiting is unknown);
                    # then the client is left with whatever they had in flight.
                    await self.stop_paying()
                    n.cancel_scope.cancel()
                self._life = None
                self.client = None
            self.down.set()
            if self.done:
                return
            await self.back.wait()

    async def start_paying(self) -> None:
        """Start paying now, and again after every restart."""
        assert self._life is not None and self.client is not None
        self.paying = True
        await self._life.start(self._payers, self.client)

    async def _payers(
        self, client: Client, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The paying tasks of one life of the client.  Started with ``nursery.start``:
        once it returns, ``stop_paying`` reaches every one of them."""
        done = self.payers_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self.pay_scope = scope
                async with trio.open_nursery() as n:
                    for chan, role in self.pays_on:
                        for k in range(PAYERS):
                            rng = random.Random(
                                f"{self.seed}/{self.name}/{self.lives}/{chan.index}/{k}"
                            )
                            n.start_soon(
                                pay_forever, client, chan, ROLE_ASSET[role], rng, self.ledger
                            )
                    task_status.started()
        finally:
            self.pay_scope = None
            done.set()

    async def stop_paying(self) -> None:
        """Cancel this client's pays and wait until each has recorded its outcome."""
        if self.pay_scope is not None:
            self.pay_scope.cancel()
            await self.payers_done.wait()

    async def restart(self, downtime: float) -> None:
        """Leave ``open_client`` (pays cancelled first), stay down ``downtime`` seconds,
        and come back from the store; returns once the client is up again."""
        self.up, self.down, self.back = trio.Event(), trio.Event(), trio.Event()
        leave, self.leave = self.leave, trio.Event()
        leave.set()
        await self.down.wait()
        await trio.sleep(downtime)
        self.back.set()
        await self.up.wait()

    async def stop(self) -> None:
        self.done = True
        self.down = trio.Event()
        self.leave.set()
        await self.down.wait()


def tagged_pay(me: int, asset: bytes, amount: int, tag: bytes) -> UpdateFn:
    """``Client.pay``'s update (move ``amount`` of ``asset`` from participant ``me`` to
    the other), which also writes ``tag`` as the state's app data: each co-signed state
    then names the pay whose proposal it is."""

    def fn(tip: State) -> Update:
        allocs = []
        for a in tip.allocations:
            if a.asset == asset:
                b = list(a.balances)
                if b[me] < amount:
                    raise LocalProtocolError(f"cannot pay {amount}, balance {b[me]}")
                b[me] -= amount
                b[1 - me] += amount
                a = Allocation(asset=a.asset, balances=(b[0], b[1]), locked=a.locked)
            allocs.append(a)
        return Update(allocations=tuple(allocs), app_data=tag)

    return fn


async def pay_forever(
    client: Client, chan: Chan, asset: bytes, rng: random.Random, ledger: Ledger
) -> None:
    """Pay random amounts on ``chan`` in ``asset`` until cancelled, recording each pay's
    outcome: returned (co-signed), unknown (PeerTimeout, or cancelled while awaiting),
    refused (UpdateRejected, LocalProtocolError).  Anything else fails the test."""
    key = (chan.index, asset)
    me = client.me(chan.cid)
    while True:
        amount = rng.randint(1, MAX_AMOUNT)
        pay_id = ledger.new_pay(chan.index, asset, amount)
        outcome = UNKNOWN
        signed: SignedState | None = None
        try:
            signed = await client.update(
                chan.cid, tagged_pay(me, asset, amount, pay_id.to_bytes(8, "big"))
            )
            outcome = RETURNED
        except PeerTimeout:
            pass
        except (UpdateRejected, LocalProtocolError) as exc:
            outcome = REFUSED
            reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
            ledger.reasons[pay_id] = f"{type(exc).__name__}({reason!r})"
            ledger.refusals[
                f"{type(exc).__name__}: {re.sub(r'[0-9a-f]{16}|[0-9]+', '#', reason)}"
            ] += 1
        finally:
            # Recorded however the pay ended (a cancellation included: then unknown).
            ledger.outcomes[pay_id] = outcome
            ledger.sums[key][outcome] += amount
            ledger.counts[outcome] += 1
            if signed is not None:
                ledger.returned[key].append((signed.state.version, amount))
                ledger.note_state("pay", signed)
                if not signed.fully_signed or signed.state.channel_id != chan.cid:
                    ledger.problems.append(f"pay on {chan.index} returned {signed}")
        if rng.random() < 0.3:
            await trio.sleep(rng.random() * 0.003)
        else:
            await trio.lowlevel.checkpoint()


# -- waiting for the dust to settle ---------------------------------------------------


def _unsettled(parties: list[Party], chans: list[Chan]) -> list[str]:
    """What still differs between the two sides of each channel (empty: all settled)."""
    out = []
    for ch in chans:
        a, b = parties[ch.maker].client, parties[ch.taker].client
        assert a is not None and b is not None
        infos = [i for c in (a, b) for i in c.channels() if i.channel_id == ch.cid]
        la, lb = a.latest(ch.cid), b.latest(ch.cid)
        if la is None or la != lb or any(i.in_flight for i in infos):
            out.append(
                f"channel {ch.index}: maker v{la and la.state.version} taker "
                f"v{lb and lb.state.version}, in flight "
                f"{[i.in_flight for i in infos]}, connected {[i.connected for i in infos]}"
            )
    return out


async def _wait_until(what: str, cond: Callable[[], list[str]], seconds: float) -> None:
    """Poll ``cond`` (what is still wrong) until it is empty; fail after ``seconds``."""
    with trio.move_on_after(seconds):
        while cond():  # noqa: ASYNC110 - polling several clients' views
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not {what} after {seconds}s: {cond()}")


def _disconnected(parties: list[Party], chans: list[Chan]) -> list[str]:
    out = []
    for ch in chans:
        a, b = parties[ch.maker].client, parties[ch.taker].client
        assert a is not None and b is not None
        if not (a.links.is_connected(b.node_id) and b.links.is_connected(a.node_id)):
            out.append(f"{parties[ch.maker].name}-{parties[ch.taker].name}")
    return sorted(set(out))


# -- the chaos ------------------------------------------------------------------------


@attrs.define
class ChaosStats:
    drops: int = 0
    restarts: list[str] = attrs.field(factory=list)


async def chaos(
    parties: list[Party], chans: list[Chan], rng: random.Random, stats: ChaosStats
) -> None:
    """Drop links at random moments, and restart a client now and then (at least twice;
    once in a while for longer than the update timeout, so pays to it time out)."""
    pairs = sorted({(ch.maker, ch.taker) for ch in chans})
    start = trio.current_time()
    n_restarts = rng.choice((2, 3))
    restart_at = sorted(
        start + CHAOS_SECONDS * (k + 0.5 + rng.uniform(-0.2, 0.2)) / (n_restarts + 0.5)
        for k in range(n_restarts)
    )
    while trio.current_time() < start + CHAOS_SECONDS or restart_at:
        await trio.sleep(rng.uniform(0.01, 0.3))
        if restart_at and trio.current_time() >= restart_at[0]:
            restart_at.pop(0)
            victim = rng.choice(parties)
            downtime = (
                rng.uniform(UPDATE_TIMEOUT, UPDATE_TIMEOUT + 0.5)
                if rng.random() < 0.3
                else rng.uniform(0.0, 0.5)
            )
            await victim.restart(downtime)
            stats.restarts.append(f"{victim.name} down {downtime:.2f}s")
            continue
        i, j = rng.choice(pairs)
        if rng.random() < 0.5:
            i, j = j, i
        a, b = parties[i].client, parties[j].client
        if a is None or b is None or not a.links.is_connected(b.node_id):
            continue
        # A random moment within a burst: a few scheduler passes more or less.
        for _ in range(rng.randrange(20)):
            await trio.lowlevel.checkpoint()
        await a.links.drop(b.node_id)
        stats.drops += 1


# -- the test -------------------------------------------------------------------------


async def test_pays_both_ways_under_dropped_links_and_restarts(tmp_path: Path) -> None:
    """See the module docstring."""
    seed = int(os.environ.get("CHAOS_SEED", str(random.randrange(2**32))))
    print(f"CHAOS_SEED={seed}")
    try:
        await _chaos_run(tmp_path, seed)
    except BaseException as exc:
        exc.add_note(f"replay with CHAOS_SEED={seed}")
        raise


async def _chaos_run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ledger = Ledger()
    parties = [
        Party(
            name=name,
            key=Signer.generate(),
            path=tmp_path / f"{name}.sqlite",
            ledger=ledger,
            seed=seed,
        )
        for name in ("A", "B", "C")
    ]  # test-only keys
    chans = [Chan(index=i, maker=m, taker=t) for i, (m, t) in enumerate(CHANNELS)]
    stats = ChaosStats()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for p in parties:
                await nursery.start(p.run)

            # Open the channels: the maker's ETH and TOKEN on one side, the taker's on
            # the other.
            async def open_one(ch: Chan) -> None:
                maker, taker = parties[ch.maker].client, parties[ch.taker].client
                assert maker is not None and taker is not None
                ch.cid = await maker.open_channel(
                    taker.peer_address(),
                    chain_id=31337,
                    adjudicator=ADJ,
                    challenge_duration=60,
                    balances=[(ETH, EACH, EACH), (TOKEN, EACH, EACH)],
                )

            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    for ch in chans:
                        n.start_soon(open_one, ch)
            assert len({ch.cid for ch in chans}) == len(chans)
            for ch in chans:
                parties[ch.maker].pays_on.append((ch, 0))
                parties[ch.taker].pays_on.append((ch, 1))

            # Pay from every side of every channel, under chaos.
            for p in parties:
                await p.start_paying()
            await chaos(parties, chans, rng, stats)

            # Stop the chaos and the pays; let everything reconnect and settle.
            for p in parties:
                p.paying = False
                await p.stop_paying()
                assert p.pay_scope is None, p.name
            # A dial loop may be backing off (up to seconds) after a restart.
            await _wait_until("reconnected", lambda: _disconnected(parties, chans), 10)
            await _wait_until("settled", lambda: _unsettled(parties, chans), 10)

            summary = (
                f"pays {dict(ledger.counts)}, drops {stats.drops}, restarts {stats.restarts}, "
                f"refusals {dict(ledger.refusals)}"
            )
            print(summary)
            _check(parties, chans, ledger)
            # The store files hold the same, durable.
            for p in parties:
                assert p.client is not None
                await p.client.drain()
                rows, in_flight = _file_latest(p.path), _in_flight_rows(p.path)
                assert in_flight == 0, f"{p.name}: {in_flight} in-flight rows in the file"
                mine = [
                    ch for ch in chans if p.name in (parties[ch.maker].name, parties[ch.taker].name)
                ]
                assert set(rows) == {ch.cid for ch in mine}, p.name
                for ch in mine:
                    row = rows[ch.cid]
                    assert row.status == COSIGNED, (p.name, ch.index)
                    assert row.signed is not None, (p.name, ch.index)
                    assert row.latest_version == row.signed.state.version, (p.name, ch.index)
                    assert row.signed == p.client.latest(ch.cid), (p.name, ch.index)

            # Enough happened for this to mean something.
            assert ledger.counts[RETURNED] >= 300, summary
            assert stats.drops >= 5, summary
            assert len(stats.restarts) >= 2, summary

            for p in parties:
                await p.stop()


def _check(parties: list[Party], chans: list[Chan], ledger: Ledger) -> None:
    assert not ledger.problems, ledger.problems
    for ch in chans:
        maker, taker = parties[ch.maker].client, parties[ch.taker].client
        assert maker is not None and taker is not None
        final = maker.latest(ch.cid)
        assert final is not None and final == taker.latest(ch.cid)
        # Signed by both keys.
        params = maker.params(ch.cid)
        digest = state_digest(params, final.state)
        assert [recover(digest, s) for s in final.signatures if s] == list(params.participants)
        # Conservation per asset.
        assert [a.asset for a in final.state.allocations] == [ETH, TOKEN]
        for a in final.state.allocations:
            assert a.locked == 0 and sum(a.balances) == 2 * EACH, (ch.index, a)
        ledger.note_state("final", final)
        history = sorted(ledger.states[ch.cid].items())
        versions = [v for v, _ in history]
        # Each co-signed state (but the opening one) is one pay's proposal: that pay did
        # not fail, and no other co-signed state is a proposal of the same pay (a pay
        # retried after its first proposal had been co-signed after all is paid twice).
        own: dict[int, int] = {}
        for v, s in history:
            if v == 0:
                continue
            pay_id = int.from_bytes(s.state.app_data, "big")
            chan, asset, amount = ledger.pays[pay_id]
            what = (
                f"channel {ch.index}: pay #{pay_id} ({amount} {'ETH' if asset == ETH else 'TOKEN'})"
            )
            assert chan == ch.index, f"{what} was made on channel {chan}"
            assert ledger.outcomes[pay_id] != REFUSED, (
                f"{what} raised {ledger.reasons[pay_id]}, yet its own proposal was co-signed "
                f"as v{v}: the pay is made although its caller was told it failed"
            )
            assert pay_id not in own, (
                f"{what} is in two co-signed states, v{own[pay_id]} and v{v}: paid twice "
                f"(retried after its first proposal had been co-signed after all)"
            )
            own[pay_id] = v
        for role, asset in enumerate(ROLE_ASSET):
            # What the payer (participant ``role``) has paid by each co-signed version.
            moved = [EACH - s.state.allocation(asset).balances[role] for _, s in history]
            key = (ch.index, asset)
            sums = ledger.sums[key]
            r, u = sums[RETURNED], sums[UNKNOWN]
            where = (
                f"channel {ch.index} ({parties[ch.maker].name}->{parties[ch.taker].name}), "
                f"{'maker' if role == 0 else 'taker'} pays {'ETH' if role == 0 else 'TOKEN'}: "
                f"R={r} U={u} refused={sums[REFUSED]}"
            )
            t = moved[-1]
            assert r <= t <= r + u, f"{where}: net transfer T={t} outside [R, R+U]"
            # Only this side pays in this asset: what it paid never goes down.
            for k in range(1, len(moved)):
                assert moved[k] >= moved[k - 1], (
                    f"{where}: paid {moved[k - 1]} by v{versions[k - 1]} but only {moved[k]} "
                    f"by v{versions[k]}: a co-signed pay was undone"
                )
            # Every returned pay is in the state it returned, and in every later one.
            # (Pays returned at one version share that state: summed before comparing.)
            acc: dict[int, int] = defaultdict(int)
            for v, amount in ledger.returned[key]:
                acc[v] += amount
            assert set(acc) <= set(versions)
            running = 0
            for k, v in enumerate(versions):
                running += acc.get(v, 0)
                assert moved[k] >= running, (
                    f"{where}: pays returned at or below v{v} sum to {running}, but "
                    f"v{v} reflects only {moved[k]}"
                )


# -- what the chaos test found, made deterministic ------------------------------------


async def test_a_proposal_flushed_across_a_reconnect_is_not_refused_and_then_countersigned(
    tmp_path: Path,
) -> None:
    """The failure the chaos test found (fixed: ``Links.queue`` now refuses a frame made
    for an earlier link), step by step.  Alice pays 1 (v1) and 2 (v2,
    pipelined on v1); bob has read v1 but not yet countersigned it (his reader is
    mid-burst); alice's v2 waits for its commit (her store is held, as by a WAL
    checkpoint) while the link drops and comes back.  When the commit returns, the
    flusher handed v2's frame to the link that is up now, the new one, ahead of the
    ``Sync`` and the re-sent v1, v2 that alice queued on reconnecting.  Bob, who forgot
    v1 on the reconnect, refuses that v2 (``StaleVersion``: built on v1); alice drops v2
    and raises ``UpdateRejected`` to its caller; then bob reads the re-sent v1, v2 and
    countersigns v2, and alice ignores that ``Accept`` (v2 is no longer in flight).  The
    two sides now disagree on their latest state until the next reconnect, where alice
    adopts bob's v2 and, as it is none of her proposals in flight, reports v1
    "superseded": pay(1) is retried and paid again.  Alice pays 1 + 2 + 1, her callers saw
    one pay of 1 succeed and the pay of 2 fail.

    It must hold: a pay that raised ``UpdateRejected`` is not made, and a pay is made at
    most once (R <= T <= R + U, as in the chaos test)."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with (
        open_client(bob_key, tmp_path / "bob.sqlite", update_timeout=3) as bob,
        open_client(alice_key, tmp_path / "alice.sqlite", update_timeout=3) as alice,
    ):
        cid = await alice.open_channel(
            bob.peer_address(),
            chain_id=31337,
            adjudicator=ADJ,
            challenge_duration=60,
            balances=[(ETH, EACH, EACH)],
        )
        alice_m, bob_m = alice._channels[cid].machine, bob._channels[cid].machine
        committer = alice.outbox._committer
        assert committer is not None
        outcomes: dict[int, str] = {}

        async def pay(amount: int) -> None:
            try:
                await alice.pay(cid, ETH, amount)
                outcomes[amount] = RETURNED
            except PeerTimeout:
                outcomes[amount] = UNKNOWN
            except UpdateRejected as exc:
                outcomes[amount] = f"{REFUSED}: {exc.reason}"

        async def until(cond: Callable[[], bool]) -> None:
            with trio.fail_after(5):
                while not cond():  # noqa: ASYNC110 - polling the clients' state
                    await trio.sleep(0.001)

        async with trio.open_nursery() as n:
            # Bob's reader is mid-burst: v1 is checked, not countersigned.
            on_idle = bob.inbound.on_idle
            bob.inbound.on_idle = lambda node_id: None  # type: ignore[method-assign]
            n.start_soon(pay, 1)
            await until(lambda: bool(bob_m.deferred))
            # Alice's store is held (a checkpoint does that): v2's batch waits for it.
            assert committer._lock.acquire(blocking=False)
            try:
                n.start_soon(pay, 2)
                await until(lambda: alice_m.max_signed == 2 and alice.outbox._flushing)
                # The link drops and comes back meanwhile.
                old = alice.links.peers[bob.node_id]
                await alice.links.drop(bob.node_id)
                await until(
                    lambda: (
                        alice.links.peers.get(bob.node_id) not in (None, old)
                        and bob.links.is_connected(alice.node_id)
                    )
                )
            finally:
                bob.inbound.on_idle = on_idle  # type: ignore[method-assign]
                committer._lock.release()
            await until(lambda: 2 in outcomes)
            # A later reconnect (any: a timeout forces one) resyncs the two sides.
            await alice.links.drop(bob.node_id)
        await _wait_until("settled", lambda: _pair_unsettled(alice, bob, cid), 5)
        final = alice.latest(cid)
        assert final is not None
        paid = EACH - final.state.allocation(ETH).balances[0]
        r = sum(a for a, o in outcomes.items() if o == RETURNED)
        u = sum(a for a, o in outcomes.items() if o == UNKNOWN)
        assert r <= paid <= r + u, (
            f"alice paid {paid} in all, but her pays' outcomes are {outcomes}: a refused pay "
            f"was made, or a pay was made twice"
        )


def _pair_unsettled(a: Client, b: Client, cid: bytes) -> list[str]:
    la, lb = a.latest(cid), b.latest(cid)
    infos = [i for c in (a, b) for i in c.channels() if i.channel_id == cid]
    if la is None or la != lb or any(i.in_flight for i in infos):
        return [f"v{la and la.state.version} / v{lb and lb.state.version}, {infos}"]
    return []
