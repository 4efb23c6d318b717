"""The crash test's checks, apart from its processes: what the survivor saw on the wire
(``Recorder``), the victim's store against it (check (1)), and the pays, in sum per
direction (check (4)) and one by one along the final state's chain (check (5)).  See
``test_crash`` for the test that drives them; ``test_client_faults`` uses the first two.
"""

from __future__ import annotations

import collections
import itertools
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import crash_party
import trio
from test_client_chaos import REFUSED, RETURNED, UNKNOWN, Ledger, tagged_pay

from channel import codec
from channel.client import Client
from channel.codec import Accept, Open, Propose, Sync
from channel.eip712 import state_digest
from channel.errors import InvalidSignature
from channel.keys import Signer, recover
from channel.machine import PersistProposal
from channel.state import ETH, Params, State
from channel.store import BURNED, COSIGNED, IN_FLIGHT, ChannelRecord, Store

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
