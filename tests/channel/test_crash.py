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

import collections
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
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
from test_client_chaos import REFUSED, RETURNED, UNKNOWN, Ledger, tagged_pay  # noqa: E402

from channel import codec  # noqa: E402
from channel.client import Client, open_client  # noqa: E402
from channel.codec import Accept, Open, Propose, Sync  # noqa: E402
from channel.eip712 import state_digest  # noqa: E402
from channel.errors import ChannelError, InvalidSignature, PeerTimeout  # noqa: E402
from channel.keys import Signer, recover  # noqa: E402
from channel.machine import PersistProposal  # noqa: E402
from channel.state import ETH, Params, State  # noqa: E402
from channel.store import BURNED, COSIGNED, IN_FLIGHT, ChannelRecord, Store  # noqa: E402
from channel.transport import PeerAddress  # noqa: E402

pytestmark = pytest.mark.slow

# TEST-ONLY keys: fixed so a failing seed replays exactly.  Never fund these anywhere.
VICTIM_SECRET = bytes.fromhex("11" * 31 + "01")
SURVIVOR_SECRET = bytes.fromhex("22" * 31 + "02")

#: Kills that must land while pipelined updates flow, in each pipelined case.
MIN_MID_STREAM_KILLS = 20

STATUS_NAMES = {IN_FLIGHT: "in_flight", COSIGNED: "cosigned", BURNED: "burned"}


# ---------------------------------------------------------------------------
# the survivor's wire recorder


#: Who proposed a state (``Recorder.proposed``).
SURVIVOR, VICTIM = "survivor", "victim"


class Recorder:
    """Wraps the survivor client's dispatch: every state the victim signed, as received.

    ``got[(channel_id, version)]`` maps each distinct state digest to the state, so a
    second entry for one version would be two different states signed by the victim
    at that version (rule S broken).  ``mine`` holds the survivor's own proposals, and
    ``proposed`` maps every proposal of either party (each state the survivor saw
    proposed, its own or the victim's) to its proposer and the version it was built on.
    Every co-signed state the survivor makes durable (its state listener: countersigned,
    accepted, or adopted from the victim's ``Sync``) goes to ``ledger.states``.
    """

    def __init__(self, client: Client, victim: bytes, ledger: Ledger) -> None:
        self.client = client
        self.victim = victim
        self.got: dict[tuple[bytes, int], dict[bytes, State]] = {}
        self.params: dict[bytes, Params] = {}
        self.mine: dict[tuple[bytes, int], State] = {}
        self.proposed: dict[State, tuple[str, int]] = {}
        self.problems: list[str] = []
        self.messages = 0
        #: The most victim proposals seen ahead of our latest co-signed state at once.
        self.max_depth = 0
        self._trigger: tuple[Callable[[codec.Message], bool], trio.Event] | None = None
        orig_dispatch: Callable[[bytes, codec.Message], None] = client.inbound.dispatch
        orig_emit: Callable[[bytes, Any], None] = client._emit

        def dispatch(node_id: bytes, msg: codec.Message) -> None:
            self.messages += 1
            self._on_message(msg)
            if self._trigger is not None and self._trigger[0](msg):
                self._trigger[1].set()
                self._trigger = None
            orig_dispatch(node_id, msg)

        def emit(peer: bytes, outputs: Any) -> None:
            for out in outputs:
                if isinstance(out, PersistProposal):
                    key = (out.params.channel_id, out.state.version)
                    old = self.mine.setdefault(key, out.state)
                    if old != out.state:
                        self.problems.append(f"survivor signed two states at v{key[1]}")
                    self.proposed[out.state] = (SURVIVOR, out.base_version)
            orig_emit(peer, outputs)

        client.inbound.dispatch = dispatch  # type: ignore[method-assign]
        client._emit = emit  # type: ignore[method-assign]
        client.add_state_listener(partial(ledger.on_state, SURVIVOR))

    def arm(self, predicate: Callable[[codec.Message], bool]) -> trio.Event:
        """An event set when the next message from the victim matching ``predicate``
        arrives (before our machine handles it): a kill on it lands at a known step."""
        event = trio.Event()
        self._trigger = (predicate, event)
        return event

    def _params(self, cid: bytes) -> Params | None:
        ch = self.client._channels.get(cid)
        return None if ch is None else ch.machine.params

    def _record(
        self, params: Params, state: State, sig: bytes | None, what: str, base: int | None = None
    ) -> None:
        """Record ``state`` if ``sig`` is the victim's; ``base``: it is the victim's
        proposal, built on that version."""
        if sig is None:
            self.problems.append(f"{what} v{state.version}: no signature from the victim")
            return
        digest = state_digest(params, state)
        try:
            signer = recover(digest, sig)
        except InvalidSignature as exc:
            self.problems.append(f"{what} v{state.version}: bad signature: {exc}")
            return
        if signer != self.victim:
            return  # not the victim's signature (e.g. our own, echoed back)
        self.params[params.channel_id] = params
        self.got.setdefault((params.channel_id, state.version), {})[digest] = state
        if base is not None:
            self.proposed.setdefault(state, (VICTIM, base))

    def _on_message(self, msg: codec.Message) -> None:
        if isinstance(msg, Open):
            self._record(msg.params, msg.state, msg.signature, "Open")
            return
        if isinstance(msg, Propose):
            params = self._params(msg.state.channel_id)
            if params is not None:
                self._record(params, msg.state, msg.signature, "Propose", msg.base_version)
                latest = self.client._channels[msg.state.channel_id].machine.latest
                if latest is not None:
                    depth = msg.state.version - latest.state.version
                    self.max_depth = max(self.max_depth, depth)
        elif isinstance(msg, Accept):
            params = self._params(msg.channel_id)
            state = self.mine.get((msg.channel_id, msg.version))
            if params is not None and state is not None:
                self._record(params, state, msg.signature, "Accept")
            elif params is not None:
                self.problems.append(f"Accept for v{msg.version}, which we never proposed")
        elif isinstance(msg, Sync):
            params = self._params(msg.latest.state.channel_id)
            if params is None:
                return
            me = params.participants.index(self.victim)
            self._record(params, msg.latest.state, msg.latest.signatures[me], "Sync.latest")
            for p in msg.pending:
                self._record(params, p.state, p.signature, "Sync.pending", p.base_version)

    def versions(self) -> int:
        return len(self.got)


# ---------------------------------------------------------------------------
# check (1): the victim's store holds everything it signed


def check_store(path: Path, victim: Signer, rec: Recorder) -> dict[str, int]:
    """Every state the survivor received a victim signature on is in the victim's store
    (co-signed latest, or in the audit trail with the same content); no version carries
    two different victim-signed states; and
    the victim's ``max_signed`` covers every version it put on the wire.  The victim must
    be dead (or stopped) while this runs.  The store is read from a copy, so the WAL
    recovery that counts is the restarted victim's own."""
    scratch = path.parent / "check"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            shutil.copyfile(src, scratch / src.name)
    store = Store(scratch / path.name, owner=victim.address)
    try:
        records: dict[bytes, ChannelRecord] = {r.params.channel_id: r for r in store.load()}
        trails = {cid: {v: (st, s) for v, st, s in store.signed_states(cid)} for cid in records}
    finally:
        store.close()
    stats = {"checked": 0, "in_flight": 0, "cosigned": 0, "burned": 0}
    errors: list[str] = []
    for (cid, v), states in sorted(rec.got.items()):
        stats["checked"] += 1
        tag = f"channel {cid.hex()[:12]} v{v}"
        if len(states) > 1:
            errors.append(f"{tag}: the victim signed {len(states)} different states")
        r = records.get(cid)
        if r is None:
            errors.append(f"{tag}: the victim's store has no such channel")
            continue
        if v > r.max_signed and not (v == 0 and r.max_signed == 0):
            errors.append(f"{tag}: above the stored max_signed v{r.max_signed}")
        latest_v = -1 if r.latest is None else r.latest.state.version
        row = trails[cid].get(v)
        for state in states.values():
            if row is None:
                # Even below the latest co-signed version: the store keeps every state
                # its owner signed (the audit trail), and nothing here prunes it.
                errors.append(f"{tag}: signed and sent, but not in the store (latest v{latest_v})")
            elif row[1].state != state:
                errors.append(f"{tag}: the store holds a different state at this version")
            else:
                stats[STATUS_NAMES[row[0]]] += 1
    for cid, r in records.items():
        if r.latest is not None:
            digest = state_digest(r.params, r.latest.state)
            signers = [recover(digest, s) for s in r.latest.signatures if s is not None]
            if signers != list(r.params.participants):
                errors.append(f"channel {cid.hex()[:12]}: latest is not signed by both parties")
            if trails[cid][r.latest.state.version][0] != COSIGNED:
                errors.append(f"channel {cid.hex()[:12]}: latest row is not COSIGNED")
    assert not errors, "\n".join(errors[:20])
    return stats


# ---------------------------------------------------------------------------
# check (4): every pay's caller was told the truth

#: A pay's outcome line (``crash_party``'s words) as ``test_client_chaos``'s ledger counts it.
OUTCOMES = {crash_party.PAID: RETURNED, crash_party.REFUSED: REFUSED, crash_party.UNKNOWN: UNKNOWN}
#: The two directions of the pays: (name, asset, whether the survivor is the payer).
DIRECTIONS = (("survivor->victim", ETH, True), ("victim->survivor", crash_party.TOKEN, False))


class PayBook:
    """Both parties' pays, counted in ``ledger`` (``test_client_chaos``'s) as channel 0: the
    survivor's in ETH, the victim's in TOKEN.  Every pay writes its tag (its id) as the app
    data of the states it proposes; ``tags`` maps a tag back to the ledger's pay, and
    ``returned_at`` a returned pay to the version of the co-signed state it returned.

    The victim's pays come from its lives' stdout: a ``pay`` line before each pay starts,
    an outcome line when it ends; a pay with no outcome line when its life was killed is
    of unknown outcome.  Its tags are its pay ids (``PID.N``), the survivor's ``sN``."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.tags: dict[bytes, int] = {}
        self.returned_at: dict[int, int] = {}
        self._tag_of: dict[int, bytes] = {}
        self._victim_ids: dict[str, int] = {}  # the victim's pay id -> the ledger's

    def _new_pay(self, asset: bytes, amount: int, tag: bytes) -> int:
        assert tag not in self.tags, f"pay tag {tag!r} used twice"
        pay_id = self.tags[tag] = self.ledger.new_pay(0, asset, amount)
        self._tag_of[pay_id] = tag
        return pay_id

    def survivor_pay(self, amount: int) -> tuple[int, bytes]:
        """A new pay of the survivor's: its ledger id and its tag."""
        tag = f"s{len(self.ledger.pays)}".encode()
        return self._new_pay(ETH, amount, tag), tag

    def settle(
        self,
        pay_id: int,
        outcome: str,
        error: str = "",
        reason: str = "",
        version: int | None = None,
    ) -> None:
        """Count how pay ``pay_id`` ended, as ``test_client_chaos.pay_forever`` does
        (``version``: of the state a pay that returned returned)."""
        ledger = self.ledger
        chan, asset, amount = ledger.pays[pay_id]
        assert pay_id not in ledger.outcomes, f"pay #{pay_id} ended twice"
        kind = ledger.outcomes[pay_id] = OUTCOMES[outcome]
        ledger.sums[chan, asset][kind] += amount
        ledger.counts[kind] += 1
        if kind == RETURNED:
            assert version is not None, f"pay #{pay_id} returned no version"
            self.returned_at[pay_id] = version
        elif kind == REFUSED:
            ledger.reasons[pay_id] = f"{error}({reason!r})"
            ledger.refusals[f"{error}: {re.sub(r'[0-9a-f]{16}|[0-9]+', '#', reason)}"] += 1

    def on_line(self, msg: dict[str, Any], pending: set[str]) -> None:
        """One pay line of a victim's life whose pays still awaiting an outcome are
        ``pending``."""
        pay_id = str(msg["id"])
        if msg["ev"] == "pay":
            assert pay_id not in self._victim_ids, f"the victim used pay id {pay_id} twice"
            self._victim_ids[pay_id] = self._new_pay(
                crash_party.TOKEN, int(msg["amount"]), pay_id.encode()
            )
            pending.add(pay_id)
            return
        assert pay_id in pending, f"victim: {msg} for no pay awaiting its outcome"
        pending.remove(pay_id)
        self.settle(
            self._victim_ids[pay_id],
            msg["ev"],
            msg.get("error", ""),
            msg.get("reason", ""),
            msg.get("version"),
        )

    def died(self, pending: set[str]) -> None:
        """The victim's life is over: its pays still awaiting are of unknown outcome."""
        for pay_id in sorted(pending):
            self.settle(self._victim_ids[pay_id], crash_party.UNKNOWN)
        pending.clear()

    def describe(self, pay_id: int) -> str:
        """``pay s12 (345 ETH, returned)``, for the messages."""
        _, asset, amount = self.ledger.pays[pay_id]
        tag = self._tag_of[pay_id].decode()
        unit = "ETH" if asset == ETH else "TOKEN"
        return f"pay {tag} ({amount} {unit}, {self.ledger.outcomes.get(pay_id, 'never ended')})"


def moved(final: State, asset: bytes, survivor: int) -> int:
    """T: what the payer of ``asset`` (the survivor pays ETH, the victim TOKEN) has paid
    by ``final``."""
    # BALANCES' opener column is the victim's, whichever side opens.
    victim_had, survivor_had = next((v, s) for a, v, s in crash_party.BALANCES if a == asset)
    balances = final.allocation(asset).balances
    if asset == ETH:
        return survivor_had - balances[survivor]
    return victim_had - balances[1 - survivor]


def check_pays(ledger: Ledger, final: State, survivor: int) -> str:
    """Check (4): per direction, with R the sum of the pays that returned a co-signed
    state and U of those whose outcome is unknown, the amount T moved by ``final``
    satisfies ``R <= T <= R + U``: no pay reported made is missing, no refused pay is
    made, no pay is made twice.  Every pay must have ended.  Returns the figures."""
    assert len(ledger.outcomes) == len(ledger.pays), "a pay never ended"
    figures, errors = [], []
    for name, asset, _ in DIRECTIONS:
        t = moved(final, asset, survivor)
        sums = ledger.sums[0, asset]
        r, u = sums[RETURNED], sums[UNKNOWN]
        n = collections.Counter(
            ledger.outcomes[i] for i, (_, a, _) in enumerate(ledger.pays) if a == asset
        )
        what = f"{name} R={r} U={u} T={t} (refused {sums[REFUSED]}; pays {dict(n)})"
        figures.append(what)
        if t < r:
            errors.append(f"{what}: T < R, pays reported made are not in v{final.version}")
        elif t > r + u:
            errors.append(f"{what}: T > R + U, a refused pay was made or a pay made twice")
    assert not errors, "; ".join(errors)
    return "; ".join(figures)


# ---------------------------------------------------------------------------
# check (5): which pays are in the final state, pay by pay


def _signed_at(
    rec: Recorder, cosigned: dict[int, State], who: str, cid: bytes, v: int
) -> State | None:
    """The state of version ``v`` that ``who`` signed: what a proposal of ``who``'s built
    on ``v`` was computed from (its own in-flight proposal, or a co-signed state, which
    it signed too).  Rule S makes it unique; None if it is not known."""
    if who == SURVIVOR:
        mine = rec.mine.get((cid, v))
        return mine if mine is not None else cosigned.get(v)
    states = list(rec.got.get((cid, v), {}).values())
    return states[0] if len(states) == 1 else None


def pay_chain(rec: Recorder, ledger: Ledger, final: State) -> list[tuple[State, str]]:
    """The chain of ``final``: every proposal whose update ``final`` includes, oldest
    first, each with its proposer; version 0 first.

    An ``Accept`` for version v accepts every proposal of the proposer up to v, and a
    ``Sync`` may settle several at once: a co-signed state includes the proposals it
    was built on, which no co-signed state of their own may name.  So the chain is walked
    back from ``final`` by the proposals' ``base_version`` (each built on the state of
    that version its proposer signed), not by the co-signed states alone."""
    cid = final.channel_id
    cosigned = {v: s.state for v, s in ledger.states[cid].items()}
    chain: list[tuple[State, str]] = []
    state = final
    while state.version > 0:
        entry = rec.proposed.get(state)
        assert entry is not None, f"v{state.version} of the chain: never proposed to the survivor"
        who, base = entry
        chain.append((state, who))
        prev = _signed_at(rec, cosigned, who, cid, base)
        assert prev is not None and prev.version == base < state.version, (
            f"v{state.version} ({who}'s) was built on v{base}, which {who} signed: not known"
        )
        state = prev
    assert state == cosigned.get(0), "the chain of the final state does not start at v0"
    chain.append((state, "opener"))
    chain.reverse()
    return chain


def check_chain(book: PayBook, rec: Recorder, final: State, survivor: int) -> str:
    """Check (5), exact: every state on the chain of ``final`` (every proposal whose
    update it includes, see ``pay_chain``) names the pay whose proposal it is, and moves
    exactly that pay's amount from its payer to the other, nothing else.  Then, per pay:
    every returned pay is on the chain (at or below the version it returned), no refused
    pay is, no pay is twice; and per direction T is the sum of the pays on the chain.  So
    the pays made are the returned ones plus a subset of the unknown ones, known exactly;
    and every co-signed state the survivor learnt of is on the chain (none was undone).
    Returns the figures."""
    ledger = book.ledger
    assert not ledger.problems, ledger.problems[:10]
    assert len(ledger.outcomes) == len(ledger.pays), "a pay never ended"
    chain = pay_chain(rec, ledger, final)
    on_chain = {s.version: s for s, _ in chain}
    errors: list[str] = []
    made: dict[int, int] = {}  # pay id -> the version of its proposal on the chain
    paid: collections.Counter[bytes] = collections.Counter()
    for (prev, _), (state, who) in itertools.pairwise(chain):
        step = f"v{prev.version} -> v{state.version} ({who}'s)"
        pay_id = book.tags.get(state.app_data)
        if pay_id is None:
            errors.append(f"{step} names no pay: app data {state.app_data!r}")
            continue
        _, asset, amount = ledger.pays[pay_id]
        what = book.describe(pay_id)
        if who != (SURVIVOR if asset == ETH else VICTIM):
            errors.append(f"{step} names the other party's {what}")
        if pay_id in made:
            errors.append(
                f"{what} is made twice: its proposals v{made[pay_id]} and v{state.version} "
                f"are both on the chain of v{final.version}"
            )
        made.setdefault(pay_id, state.version)
        if ledger.outcomes[pay_id] == REFUSED:
            errors.append(
                f"{what} raised {ledger.reasons[pay_id]}, yet its proposal v{state.version} "
                f"is on the chain of v{final.version}: made"
            )
        payer = survivor if asset == ETH else 1 - survivor
        want = tagged_pay(payer, asset, amount, state.app_data)(prev).allocations
        if state.allocations != want:
            errors.append(
                f"{step} moves {[a.balances for a in state.allocations]} from "
                f"{[a.balances for a in prev.allocations]}: not exactly {what}"
            )
        paid[asset] += amount
    for v, s in sorted(ledger.states[final.channel_id].items()):
        if on_chain.get(v) != s.state:
            errors.append(f"co-signed v{v} is not on the chain of v{final.version}: undone")
    for pay_id, outcome in ledger.outcomes.items():
        if outcome != RETURNED:
            continue
        at, returned = made.get(pay_id), book.returned_at[pay_id]
        if at is None:
            errors.append(
                f"{book.describe(pay_id)} returned v{returned}, but no state on the chain of "
                f"v{final.version} names it: reported made, never made"
            )
        elif at > returned or returned not in on_chain:
            errors.append(
                f"{book.describe(pay_id)} returned v{returned}, which does not include it "
                f"(its proposal is v{at})"
            )
    figures = []
    for name, asset, _ in DIRECTIONS:
        t = moved(final, asset, survivor)
        mine = [i for i in made if ledger.pays[i][1] == asset]
        n = collections.Counter(ledger.outcomes[i] for i in mine)
        unknown = sum(
            1
            for i, (_, a, _) in enumerate(ledger.pays)
            if a == asset and ledger.outcomes[i] == UNKNOWN
        )
        figures.append(
            f"{name} T={t} = {len(mine)} pays on the chain ({n[RETURNED]} returned, "
            f"{n[UNKNOWN]} of {unknown} unknown)"
        )
        if t != paid[asset]:
            errors.append(f"{name}: T={t}, but the pays on the chain sum to {paid[asset]}")
    if errors:  # raised, not asserted: the message is the errors, one a line, and no more
        raise AssertionError("\n".join(errors[:20]))
    seen = len(ledger.states[final.channel_id]) - 1
    return (
        f"{len(chain) - 1} proposals on the chain of v{final.version}, {seen} of them "
        f"co-signed states the survivor learnt of: " + "; ".join(figures)
    )


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
    or more) for the updates to be flowing, and then two are 'sync' kills; the others
    fall where they may."""
    plan = [("open", rng.uniform(0, 0.002)), ("up", rng.uniform(0, 0.004))]
    late = [("stream", rng.uniform(0.02, 0.3)) for _ in range(mid_stream)]
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
