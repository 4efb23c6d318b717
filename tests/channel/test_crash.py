"""Crash safety: SIGKILL one party of a real two-process channel, many times.

The *survivor* runs in this test process and is never killed; the *victim* is
``tests/channel/crash_party.py`` in its own OS process, restarted from the same
store (same key, same file, new process) after every SIGKILL.  Both stream
pipelined pays at each other while the victim is killed at random moments:
during the channel open, during reconnect and resync, and mid-stream.

The survivor records every signature it *receives* from the victim, at the
connection level (``Open``, ``Propose``, ``Accept``, ``Sync``), before its own
machine looks at it.  What the victim put on the wire is therefore known without
trusting the victim's own account of it.

The pays are counted too, per direction: the survivor pays only ETH, the victim only
TOKEN.  The victim writes each pay on stdout before it starts and its outcome when it
ends, so a pay still awaiting when the victim is killed is known to be of unknown
outcome.  As in ``test_client_chaos``: with R the pays that returned and U those whose
outcome is unknown, the amount T that moved must satisfy ``R <= T <= R + U``.

That leaves the unknown pays as slack (tens of thousands), where one pay made twice
would hide; so the pays are also checked one by one.  Each pay writes its id as the
app data of the states it proposes (``test_client_chaos.tagged_pay``), the survivor
records every proposal it sees (either party's, with the version it was built on) and
every co-signed state it makes durable, and the final state's chain is walked back,
proposal by proposal: each names one pay and moves exactly that pay's amount.  Every
returned pay must be on it, no refused pay, no pay twice (check (5)).

Set ``CRASH_SEED`` to replay the same kill plan (phases and delays); the seed is
printed on failure.  Run with ``-s`` to see one line per kill.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

HERE = Path(__file__).resolve().parent
PARTY = HERE / "crash_party.py"
ROOT = HERE.parents[1]
# Importable both from an installed checkout and from a bare `.venv/bin/pytest` run.
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import crash_party  # noqa: E402
from crash_checks import (  # noqa: E402
    OUTCOMES,
    PayBook,
    Recorder,
    check_chain,
    check_pays,
    check_store,
    moved,
)
from test_client_chaos import RETURNED, UNKNOWN, Ledger  # noqa: E402

from channel import codec  # noqa: E402
from channel.client import Client, open_client  # noqa: E402
from channel.codec import Accept, Open, Propose, Sync  # noqa: E402
from channel.eip712 import state_digest  # noqa: E402
from channel.errors import ChannelError, PeerTimeout  # noqa: E402
from channel.keys import Signer, recover  # noqa: E402
from channel.state import ETH  # noqa: E402
from channel.store import BURNED, COSIGNED, IN_FLIGHT  # noqa: E402
from channel.transport import PeerAddress  # noqa: E402

pytestmark = pytest.mark.slow

# TEST-ONLY keys: fixed so a failing seed replays exactly.  Never fund these anywhere.
VICTIM_SECRET = bytes.fromhex("11" * 31 + "01")
SURVIVOR_SECRET = bytes.fromhex("22" * 31 + "02")

#: Kills that must land while pipelined updates flow, in each pipelined case.
MIN_MID_STREAM_KILLS = 20

#: Kills that every plan places 100-300 ms into a stream of pays, so that enough updates
#: flow between the kills whatever else the random plan holds.  A lock-step plan may
#: otherwise draw only short streams: about one seed in 30 let fewer than 50 updates through
#: (one lock-step update takes ~3 ms under the test).
MIN_LONG_STREAMS = 3

STATUS_NAMES = {IN_FLIGHT: "in_flight", COSIGNED: "cosigned", BURNED: "burned"}


# ---------------------------------------------------------------------------
# the victim process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open_log(path: Path) -> Any:
    return path.open("ab")


#: The lines the victim writes about its pays (the others answer the parent).
PAY_LINES = frozenset(("pay", *OUTCOMES))


class Victim:
    """One life of the victim process, driven over its stdin/stdout.  One task reads its
    stdout from start to end of life, so the child never blocks on a full pipe while it
    pays: pay lines go to ``pays``, the others to ``expect``."""

    #: Every life started, so a failing test leaves no orphan behind.
    started: ClassVar[list[trio.Process]] = []

    def __init__(self, proc: trio.Process, log: Any, pays: PayBook) -> None:
        self.proc = proc
        self.log = log
        self.pays = pays
        self._lines, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        #: Set once stdout reached its end and this life's pays are all in ``pays``.
        self.ended = trio.Event()
        Victim.started.append(proc)

    @classmethod
    def kill_all(cls) -> None:
        for proc in cls.started:
            if proc.returncode is None:
                proc.kill()
        cls.started.clear()

    @classmethod
    async def start(
        cls,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        nursery: trio.Nursery,
        pays: PayBook,
    ) -> Victim:
        """Start a life; its stdout is read by a task in ``nursery``."""
        log = _open_log(log_path)
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(PARTY), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=str(ROOT),
        )
        victim = cls(proc, log, pays)
        nursery.start_soon(victim._read)
        return victim

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        pending: set[str] = set()  # this life's pays awaiting their outcome line
        async with self._lines:
            while chunk := await self.proc.stdout.receive_some(65536):
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    msg: dict[str, Any] = json.loads(line)
                    if msg["ev"] in PAY_LINES:
                        self.pays.on_line(msg, pending)
                    else:
                        self._lines.send_nowait(msg)
        # A SIGKILL cannot cut a line short: each is one write() of at most PIPE_BUF bytes.
        assert not buf, f"victim: a partial last line {buf!r}"
        self.pays.died(pending)
        self.ended.set()

    async def expect(self, ev: str, limit: float = 20.0) -> dict[str, Any]:
        with trio.fail_after(limit):
            async for msg in self._events:
                if msg["ev"] == ev:
                    return msg
        raise AssertionError(f"victim exited (rc={self.proc.poll()}) awaiting {ev!r}")

    async def ask(self, cmd: str, ev: str, limit: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(cmd.encode() + b"\n")
        return await self.expect(ev, limit)

    async def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        rc = await self.proc.wait()
        assert rc == -9, f"victim was not SIGKILLed (rc={rc})"
        self.log.close()
        await self._wait_ended()

    async def _wait_ended(self) -> None:
        with trio.fail_after(10):
            await self.ended.wait()

    async def exit(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(b"exit\n")
        with trio.fail_after(20):
            rc = await self.proc.wait()
        assert rc == 0, f"victim exited with {rc}"
        self.log.close()
        await self._wait_ended()


# ---------------------------------------------------------------------------
# the survivor's own pay loops


class SurvivorPayer:
    """The survivor's ``n`` pay loops, in ETH only (the victim pays TOKEN); each pay and
    its outcome is counted in ``book``."""

    def __init__(
        self, client: Client, cid: bytes, nursery: trio.Nursery, n: int, book: PayBook
    ) -> None:
        self.client, self.cid, self.nursery, self.n = client, cid, nursery, n
        self.book = book
        self.running = False
        self.done: trio.Event = trio.Event()
        self.done.set()
        self.loops = 0

    def go(self) -> None:
        if self.running or self.n == 0:
            return
        self.running = True
        self.done = trio.Event()
        self.loops = self.n
        for _ in range(self.n):
            self.nursery.start_soon(self._loop)

    async def stop(self) -> None:
        self.running = False
        with trio.fail_after(3 * crash_party.UPDATE_TIMEOUT):
            await self.done.wait()

    async def _loop(self) -> None:
        rng = random.Random()
        try:
            while self.running:
                amount = rng.randint(1, crash_party.MAX_AMOUNT)
                pay_id, tag = self.book.survivor_pay(amount)
                report = partial(self.book.settle, pay_id)
                outcome = await crash_party.pay(self.client, self.cid, ETH, amount, tag, report)
                if outcome != crash_party.PAID:
                    await trio.sleep(0.002)
        finally:
            self.loops -= 1
            if self.loops == 0:
                self.done.set()


def _survivor_view(client: Client, cid: bytes) -> tuple[int | None, str | None, int]:
    info = next(c for c in client.channels() if c.channel_id == cid)
    if info.latest is None:
        return None, None, info.in_flight
    return (
        info.latest.state.version,
        state_digest(client.params(cid), info.latest.state).hex(),
        info.in_flight,
    )


async def check_converged(victim: Victim, surv: Client, cid: bytes) -> int:
    """Check (2): with both sides quiet, both hold the same latest co-signed state and
    nothing is in flight, within 10 s (polled)."""
    with trio.move_on_after(10):
        while True:
            v = await victim.ask("latest", "latest")
            s_version, s_digest, s_in_flight = _survivor_view(surv, cid)
            if (
                v["version"] == s_version
                and v["digest"] == s_digest
                and v["in_flight"] == 0
                and s_in_flight == 0
            ):
                assert s_version is not None
                return s_version
            await trio.sleep(0.02)
    raise AssertionError(
        f"no convergence within 10 s: victim {v}, survivor v{s_version} "
        f"digest {s_digest} in flight {s_in_flight}"
    )


# ---------------------------------------------------------------------------
# the test


def _plan(rng: random.Random, kills: int, mid_stream: int) -> list[tuple[str, float]]:
    """(phase, delay in s).  'open': after the victim's first channel-open message
    reaches the survivor; 'sync': after the victim's first Sync of a new life reaches
    the survivor (right after reconnect); 'up': after the victim process reports that
    its client runs (dialling, handshake, resync); 'stream': after both sides start
    paying.  At least ``mid_stream`` of the kills are 'stream' kills late enough (20 ms
    or more) for the updates to be flowing, and then two are 'sync' kills; when
    ``mid_stream`` is below ``MIN_LONG_STREAMS``, 'stream' kills 100 ms or more into the
    stream make up the difference; the others fall where they may."""
    plan = [("open", rng.uniform(0, 0.002)), ("up", rng.uniform(0, 0.004))]
    late = [("stream", rng.uniform(0.02, 0.3)) for _ in range(mid_stream)]
    late += [("stream", rng.uniform(0.1, 0.3)) for _ in range(MIN_LONG_STREAMS - mid_stream)]
    if mid_stream:  # and a few kills during resync, which the late ones crowd out
        late += [("sync", rng.uniform(0, 0.005)) for _ in range(2)]
    rest: list[tuple[str, float]] = []
    while len(plan) + len(late) + len(rest) < kills:
        r = rng.random()
        if r < 0.2:
            rest.append(("up", rng.uniform(0, 0.05)))
        elif r < 0.4:
            rest.append(("sync", rng.uniform(0, 0.005)))
        elif r < 0.55:
            rest.append(("stream", rng.uniform(0, 0.02)))
        else:
            rest.append(("stream", rng.uniform(0.02, 0.3)))
    tail = late + rest
    rng.shuffle(tail)
    return plan + tail


@pytest.mark.parametrize(("kills", "mid_stream"), [(30, 23), (28, 23), (20, 0), (10, 0)])
def test_every_kill_plan_lets_updates_flow(kills: int, mid_stream: int) -> None:
    """Whatever the seed, a plan has its number of kills, starts with the 'open' and 'up'
    kills, and holds at least MIN_LONG_STREAMS kills 100 ms or more into a stream of pays
    (or ``mid_stream`` late ones), so the test's bar on updates is never up to luck."""
    for seed in range(2000):
        plan = _plan(random.Random(seed), kills, mid_stream)
        assert len(plan) == kills
        assert [p for p, _ in plan[:2]] == ["open", "up"]
        late = [d for p, d in plan if p == "stream" and d >= (0.02 if mid_stream else 0.1)]
        assert len(late) >= max(mid_stream, MIN_LONG_STREAMS)


def _opens(role: str) -> Callable[[codec.Message], bool]:
    """The victim's message that shows the channel open is under way."""
    if role == "opener":
        return lambda m: isinstance(m, Open)
    return lambda m: isinstance(m, Accept) and m.version == 0


def _is_sync(m: codec.Message) -> bool:
    """The victim's first word after a reconnect: ``Sync``, or ``Open`` again while the
    channel it opens is not yet co-signed in its store."""
    return isinstance(m, Sync | Open)


def _victim_env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, crash_party.SECRET_ENV: VICTIM_SECRET.hex()}
    env.pop("PYTHONPATH", None)
    env.pop(crash_party.FAULT_ENV, None)
    if fault is not None:
        env[crash_party.FAULT_ENV] = fault
    return env


def _opener_argv(store_path: Path, surv: Client) -> list[str]:
    return ["--role", "opener", "--store", str(store_path), "--peer", str(surv.peer_address())]


@pytest.mark.parametrize(
    ("victim_role", "kills", "mid_stream", "victim_loops", "survivor_loops"),
    [
        ("opener", 30, 23, 6, 3),
        ("responder", 28, 23, 6, 3),
        ("opener", 20, 0, 1, 0),
        ("responder", 10, 0, 0, 1),
    ],
    ids=["opener-pipelined", "responder-pipelined", "opener-lockstep", "responder-lockstep"],
)
async def test_sigkill_victim_keeps_every_signed_state(
    tmp_path: Path,
    victim_role: str,
    kills: int,
    mid_stream: int,
    victim_loops: int,
    survivor_loops: int,
) -> None:
    """A party SIGKILLed at any point during a stream of pipelined updates (while opening
    the channel, while resyncing after a restart, mid-stream) restarts from its store
    holding every state whose signature it had sent, never signs a version twice with
    different content, and resyncs with its peer to the same latest co-signed version;
    the final balances conserve the totals; and in each direction, what moved is every
    pay reported made plus some of those of unknown outcome (none refused, none twice):
    in sum (``R <= T <= R + U``), and pay by pay (each state on the final state's chain
    names one pay and moves exactly its amount).
    The lock-step cases (one party paying one at a time, the other only answering) run
    the client's lock-step shortcut on the victim's side, as proposer and as responder:
    each commit made by the task that emitted it, each frame written straight to the
    socket."""
    seed = int(os.environ.get("CRASH_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    print(f"CRASH_SEED={seed}")
    victim_key = Signer.from_bytes(VICTIM_SECRET)
    surv_key = Signer.from_bytes(SURVIVOR_SECRET)
    store_path = tmp_path / "victim.sqlite"
    log_path = tmp_path / "victim.log"
    env = _victim_env()
    t0 = time.monotonic()
    totals = {"in_flight_at_kill": 0}
    phases = {"open": 0, "up": 0, "sync": 0, "stream": 0}
    flowing = 0  # 'stream' kills that landed while the victim's signatures kept coming
    resync_versions: list[int] = []
    ledger = Ledger()
    pays = PayBook(ledger)

    async with (
        open_client(
            surv_key, tmp_path / "survivor.sqlite", update_timeout=crash_party.UPDATE_TIMEOUT
        ) as surv,
        trio.open_nursery() as nursery,
    ):
        rec = Recorder(surv, victim_key.address, ledger)
        if victim_role == "opener":
            argv = _opener_argv(store_path, surv)
        else:
            port = _free_port()
            argv = ["--role", "responder", "--store", str(store_path), "--listen", str(port)]
        cid: bytes | None = None
        payer: SurvivorPayer | None = None

        async def survivor_opens(port: int) -> None:
            addr = PeerAddress(node_id=victim_key.node_id, host="127.0.0.1", port=port)
            with contextlib.suppress(PeerTimeout):
                await surv.connect(addr)  # starts the one dial loop; it keeps redialling
            while not surv.channels():
                await surv.wait_connected(victim_key.node_id)
                # By node id: a second connect() to a peer being redialled would start a
                # second dial loop.  PeerTimeout after the Open is fine: it is resent on
                # reconnect.
                with contextlib.suppress(ChannelError):
                    await surv.open_channel(
                        victim_key.node_id,
                        chain_id=crash_party.CHAIN_ID,
                        adjudicator=crash_party.ADJUDICATOR,
                        challenge_duration=3600,
                        balances=[(a, theirs, ours) for a, ours, theirs in crash_party.BALANCES],
                    )

        try:
            for i, (phase, delay) in enumerate(_plan(rng, kills, mid_stream)):
                trigger = None
                if phase in ("open", "sync"):
                    trigger = rec.arm(_opens(victim_role) if phase == "open" else _is_sync)
                victim = await Victim.start(argv, env, log_path, nursery, pays)
                up = await victim.expect("up")
                if victim_role == "responder" and i == 0:
                    nursery.start_soon(survivor_opens, up["port"])
                if trigger is not None:
                    with trio.fail_after(20):
                        await trigger.wait()
                if phase == "stream":
                    ready = await victim.expect("ready")
                    cid = bytes.fromhex(ready["cid"])
                    if payer is None:
                        payer = SurvivorPayer(surv, cid, nursery, survivor_loops, pays)
                    await payer.stop()
                    resync_versions.append(await check_converged(victim, surv, cid))
                    payer.go()
                    assert victim.proc.stdin is not None
                    await victim.proc.stdin.send_all(f"go {victim_loops}\n".encode())
                seen = rec.versions()
                await trio.sleep(delay)
                await victim.kill()
                phases[phase] += 1
                if phase == "stream" and rec.versions() > seen:
                    flowing += 1
                stats = check_store(store_path, victim_key, rec)
                totals["in_flight_at_kill"] += stats["in_flight"]
                print(
                    f"kill {i:2}: {phase:6} +{delay * 1000:3.0f} ms; "
                    f"victim-signed versions seen {rec.versions()}; store check {stats}"
                )
            # The last life: restart, resync, then everybody stops and must agree.
            victim = await Victim.start(argv, env, log_path, nursery, pays)
            ready = await victim.expect("ready")
            cid = bytes.fromhex(ready["cid"])
            if payer is not None:
                await payer.stop()
            final_v = await check_converged(victim, surv, cid)
            await victim.exit()
            stats = check_store(store_path, victim_key, rec)
        except BaseException:
            print(f"CRASH_SEED={seed}; victim log: {log_path}")
            Victim.kill_all()
            raise
        nursery.cancel_scope.cancel()

    latest = surv.latest(cid)
    assert latest is not None and latest.state.version == final_v
    expected = [(a, x + y) for a, x, y in crash_party.BALANCES]
    assert [(a.asset, a.total) for a in latest.state.allocations] == expected
    assert all(a.locked == 0 for a in latest.state.allocations)
    params = surv.params(cid)
    digest = state_digest(params, latest.state)
    assert [recover(digest, s) for s in latest.signatures if s is not None] == list(
        params.participants
    )
    try:
        accounts = check_pays(ledger, latest.state, surv.me(cid))
        chain = check_chain(pays, rec, latest.state, surv.me(cid))
    except AssertionError:
        print(f"CRASH_SEED={seed}; victim log: {log_path}")
        raise
    assert not rec.problems, rec.problems[:10]
    assert sum(phases.values()) == kills
    if mid_stream:
        # The bar: at least 20 kills at random points of a stream of pipelined updates
        # (the plan has a few more late 'stream' kills, in case one finds the stream still).
        assert flowing >= MIN_MID_STREAM_KILLS, f"only {flowing} kills mid-stream {phases}"
    assert stats["checked"] >= 50, f"too few updates flowed: {stats}"
    if victim_loops > 1:
        assert rec.max_depth >= 2, "the victim's updates were never pipelined"
    print(
        f"{victim_role}: {kills} SIGKILLs {phases}, {flowing} while updates flowed, "
        f"final v{final_v}, "
        f"{stats['checked']} victim-signed versions checked {stats} {totals}, "
        f"max pipeline depth {rec.max_depth}, converged after restarts at "
        f"{resync_versions}; pays {accounts}; {chain}; refusals {dict(ledger.refusals)}; "
        f"{time.monotonic() - t0:.1f}s"
    )


@contextlib.asynccontextmanager
async def _survivor(tmp_path: Path) -> AsyncIterator[tuple[Client, trio.Nursery]]:
    """The survivor's client, and a nursery for the victims' reader tasks."""
    async with (
        open_client(
            Signer.from_bytes(SURVIVOR_SECRET),
            tmp_path / "survivor.sqlite",
            update_timeout=crash_party.UPDATE_TIMEOUT,
        ) as surv,
        trio.open_nursery() as nursery,
    ):
        yield surv, nursery


async def test_the_checks_catch_a_party_that_sends_before_persisting(tmp_path: Path) -> None:
    """The store check is not vacuous: a victim that sends signatures before its store
    has them (persist-then-send broken on purpose, TEST-ONLY fault in crash_party) is
    caught within a few SIGKILLs."""
    victim_key = Signer.from_bytes(VICTIM_SECRET)
    store_path = tmp_path / "victim.sqlite"
    caught = None
    async with _survivor(tmp_path) as (surv, nursery):
        rec = Recorder(surv, victim_key.address, Ledger())
        argv = _opener_argv(store_path, surv)
        try:
            for _ in range(3):
                victim = await Victim.start(
                    argv,
                    _victim_env("send-before-persist"),
                    tmp_path / "victim.log",
                    nursery,
                    PayBook(Ledger()),
                )
                await victim.expect("ready")
                proposed = rec.arm(lambda m: isinstance(m, Propose))
                assert victim.proc.stdin is not None
                await victim.proc.stdin.send_all(b"go 6\n")
                with trio.fail_after(20):
                    await proposed.wait()
                await victim.kill()  # its flusher is still in the 20 ms before the fsync
                try:
                    check_store(store_path, victim_key, rec)
                except AssertionError as exc:
                    caught = str(exc)
                    break
        finally:
            Victim.kill_all()
        nursery.cancel_scope.cancel()
    assert caught is not None, "a party that sends before persisting went unnoticed"
    print(f"caught: {caught.splitlines()[0]}")
    assert "not in the store" in caught or "different" in caught, caught


@pytest.mark.parametrize(
    ("fault", "verdict", "exact_verdict"),
    [
        ("pay-twice", "made twice", "is made twice"),
        ("pay-unmade", "reported made are not", "reported made, never made"),
    ],
)
async def test_the_checks_catch_pays_misreported_to_their_callers(
    tmp_path: Path, fault: str, verdict: str, exact_verdict: str
) -> None:
    """The accounting of the pays is not vacuous: a victim whose pays are made twice and
    reported once, or reported made though never proposed (TEST-ONLY faults in
    crash_party), fails ``R <= T <= R + U`` and the exact check, across a SIGKILL
    mid-stream and a restart."""
    ledger = Ledger()
    pays = PayBook(ledger)
    async with _survivor(tmp_path) as (surv, nursery):
        rec = Recorder(surv, Signer.from_bytes(VICTIM_SECRET).address, ledger)
        argv = _opener_argv(tmp_path / "victim.sqlite", surv)
        try:
            for life in range(2):
                victim = await Victim.start(
                    argv, _victim_env(fault), tmp_path / "victim.log", nursery, pays
                )
                cid = bytes.fromhex((await victim.expect("ready"))["cid"])
                assert victim.proc.stdin is not None
                await victim.proc.stdin.send_all(b"go 6\n")
                await trio.sleep(0.2)
                if life == 0:
                    await victim.kill()
            await victim.ask("stop", "stopped")
            final_v = await check_converged(victim, surv, cid)
            await victim.exit()
        finally:
            Victim.kill_all()
        nursery.cancel_scope.cancel()
    latest = surv.latest(cid)
    assert latest is not None and latest.state.version == final_v
    with pytest.raises(AssertionError) as caught:
        check_pays(ledger, latest.state, surv.me(cid))
    print(f"caught: {caught.value}")
    assert verdict in str(caught.value), caught.value
    with pytest.raises(AssertionError) as exact:
        check_chain(pays, rec, latest.state, surv.me(cid))
    print(f"caught exactly: {str(exact.value).splitlines()[0]}")
    assert exact_verdict in str(exact.value), exact.value


#: Lives of the victim, at most, until R + U has room for one pay made twice.
ONE_PAY_LIVES = 12


async def test_the_exact_check_catches_one_pay_made_twice(tmp_path: Path) -> None:
    """One pay made twice and reported once among hundreds of honest ones (TEST-ONLY
    fault ``one-pay-twice`` in crash_party, in the victim's first life) hides in the slack
    of ``R <= T <= R + U`` (the pays of unknown outcome that were not made leave room
    for it: lives are killed mid-stream, both sides paying, until they do), and the exact
    check names it, and it alone."""
    ledger = Ledger()
    book = PayBook(ledger)
    doubled: dict[str, Any] | None = None
    room = -1
    async with _survivor(tmp_path) as (surv, nursery):
        rec = Recorder(surv, Signer.from_bytes(VICTIM_SECRET).address, ledger)
        argv = _opener_argv(tmp_path / "victim.sqlite", surv)
        payer: SurvivorPayer | None = None
        try:
            for life in range(ONE_PAY_LIVES):
                env = _victim_env("one-pay-twice" if life == 0 else None)
                victim = await Victim.start(argv, env, tmp_path / "victim.log", nursery, book)
                cid = bytes.fromhex((await victim.expect("ready"))["cid"])
                if payer is None:
                    payer = SurvivorPayer(surv, cid, nursery, 3, book)
                await payer.stop()
                final_v = await check_converged(victim, surv, cid)
                if doubled is not None:
                    # Every pay has ended: what R + U leaves over T, the extra pay counted.
                    latest = surv.latest(cid)
                    assert latest is not None
                    sums = ledger.sums[0, crash_party.TOKEN]
                    t = moved(latest.state, crash_party.TOKEN, surv.me(cid))
                    room = sums[RETURNED] + sums[UNKNOWN] - t
                    if room >= 0:
                        break
                payer.go()
                assert victim.proc.stdin is not None
                await victim.proc.stdin.send_all(b"go 6\n")
                if doubled is None:
                    doubled = await victim.expect("paid-twice")
                    await trio.sleep(0.1)
                else:
                    # Early, so that pays have started whose proposals are not yet
                    # durable: of unknown outcome, and never made.
                    await trio.sleep(0.005)
                await victim.kill()
            else:
                raise AssertionError(f"no room in R + U for one extra pay in {life + 1} lives")
            await victim.exit()
        finally:
            Victim.kill_all()
        nursery.cancel_scope.cancel()
    assert doubled is not None and room >= 0
    latest = surv.latest(cid)
    assert latest is not None and latest.state.version == final_v
    figures = check_pays(ledger, latest.state, surv.me(cid))  # blind to it
    with pytest.raises(AssertionError) as caught:
        check_chain(book, rec, latest.state, surv.me(cid))
    print(
        f"pay {doubled['id']} made twice (returned {doubled['returned']}); after {life + 1} "
        f"lives R + U - T = {room}: R <= T <= R + U passes ({figures}); caught: {caught.value}"
    )
    # One error, and about that pay: every honest pay passes the same check.
    (error,) = str(caught.value).splitlines()
    assert error.startswith(f"pay {doubled['id']} (") and "is made twice" in error, error
