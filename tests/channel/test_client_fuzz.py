"""Seeded fuzzing of the client's inbound path, over a real BOLT 8 link.

Bob runs ``open_client`` on a real store; alice opens a channel, pays a few times and
leaves.  A raw connection with alice's own key (a buggy or malicious alice) then sends
bob a few hundred frames, one at a time or in bursts of up to five, made by
``fuzz_frames.Forger`` from valid messages mutated in structured ways (versions, bases,
balances, allocations, locked amounts, app data, finality, signatures, channel ids,
arity; ``Accept``, ``Reject`` and ``Sync`` for states bob never sent, or forged;
``Open`` with odd params) and at the byte level (bit flips, truncation, appended and
inserted bytes, CBOR type confusion), plus broken transport frames (a bad MAC, an
oversized or cut-off frame).  Valid proposals come in between, and bob pays now and
then, so that the state machine moves between bad inputs.  After every step:

* bob's client still runs, and no optichannel logger reported an error (an exception
  that escaped a component: the listener logs and survives a handler that raises);
* every reply to a refused frame is a ``Reject`` or an ``Error`` whose reason starts
  with the name of an error type of ``channel.errors``; a ``Reject`` names a state we
  sent; an ``Accept`` countersigns a state we sent that alice's key signed, that keeps
  the channel's totals and is above bob's ``max_signed``; a lone valid proposal (or
  ``Open``) is accepted; a broken transport frame closes the link;
* bob's store file (read by a second, read-only connection) never loses a co-signed
  state: each channel's latest co-signed version never goes down, every COSIGNED row
  stays byte-identical, each is signed by both keys and keeps the channel's totals, and
  bob's client holds the file's latest in memory.

At the end the real alice restarts from her store, which lacks whatever bob accepted
from the fuzzer, and the two converge on one co-signed state (resync) and pay again.

``FUZZ_SEED=<n>`` replays a run's choices (the timing of real sockets aside: the frames
of a burst may reach bob in one read or in several); the seed is printed, and a failure
lists it with the frames of each step that broke a rule and the last steps before it.
``FUZZ_STEPS=<n>`` runs longer; ``FUZZ_AVOID`` (see ``fuzz_frames``) steers around known
bugs.  The last two tests are what it found, made deterministic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
import trio
from fuzz_frames import BIG, Forger, Frame, View, totals, wire
from test_client import (
    TOTAL,
    _durable,
    _open,
    _raw_stranger_frames,
    _wait_same,
    bob_alone_after_a_pay,
)

from channel import codec, errors, noise
from channel.client import Client, default_policy, open_client
from channel.codec import Accept, Error, Open, Propose, Reject, Sync
from channel.eip712 import state_digest
from channel.errors import (
    ChannelError,
    DecodeError,
    InvalidSignature,
    LocalProtocolError,
    PeerTimeout,
    TransportError,
    UpdateRejected,
)
from channel.keys import Signer, verify
from channel.limits import MAX_CHANNELS_PER_PEER, MAX_FRAME, MAX_VERSION
from channel.state import ETH, UINT256_MAX, Allocation, ChannelId, Params, State
from channel.storeplan import COSIGNED
from channel.transport import Connection, connect

#: Steps per run: a frame, a burst, a pay of bob's, a reconnect or a broken transport frame.
STEPS = int(os.environ.get("FUZZ_STEPS", "300"))
#: Every ``Reject`` and ``Error`` reason starts with one of these.
ERROR_NAMES = frozenset(
    name
    for name, obj in vars(errors).items()
    if isinstance(obj, type) and issubclass(obj, ChannelError)
)
#: Reconnect before bob's ``links.MAX_PEER_ERRORS`` (100) refused frames on one link.
ERRORS_PER_LINK = 80
PROBE_PREFIX = b"prob"


@attrs.frozen
class Carried:
    """A state one of the step's frames asks bob to countersign (a proposal, a ``Sync``'s
    pending proposal, an ``Open``'s initial state), judged before it is sent."""

    label: str
    params: Params  # of the machine that handles it (bob digests it with these)
    state: State
    digest: bytes
    #: Bob must never countersign it: not signed by alice, changes the totals, at or
    #: below bob's max_signed, or on a final channel.
    bad: bool
    #: Nothing is wrong with it on bob's state: alone in its step, he must countersign it.
    valid: bool
    opens: bool = False


def _signed_by(params: Params, state: State, sig: bytes | None, address: bytes) -> bool:
    if sig is None:
        return False
    try:
        verify(state_digest(params, state), sig, address)
    except InvalidSignature:
        return False
    return True


def _rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Bob's ``channels`` and ``states`` rows, read by a second, read-only connection."""
    return _durable(path)


def _is_answer_to(tag: str, msg: codec.Message) -> bool:
    return isinstance(msg, Error) and tag in msg.reason


class Fuzzer(Forger):
    """Sends the forger's frames over the raw link, reads bob's answers, and checks the
    rules after each step; broken rules are collected in ``violations``."""

    def __init__(
        self,
        *,
        seed: int,
        alice: Signer,
        bob: Client,
        bob_path: Path,
        main: Params,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        super().__init__(seed=seed, alice=alice, bob=bob, main=main)
        self.seed = seed
        self.bob_path = bob_path
        self.caplog = caplog
        self.monkeypatch = monkeypatch
        self.nursery: trio.Nursery | None = None
        self.conn: Connection | None = None
        self.link_up = False
        self.conn_errors = 0  # frames bob refused with an Error on this link
        self.probes = 0
        # bob's store file at the last check
        self.file_latest: dict[bytes, int] = {}
        self.file_max_signed: dict[bytes, int] = {}
        self.reference: dict[bytes, list[tuple[bytes, int]]] = {}
        self.logs_seen = 0
        # the step under way
        self.step = ""
        self.carried: list[Carried] = []
        self.accepted: set[int] = set()
        self.replies: list[str] = []
        self.reasons: list[str] = []
        # the report
        self.violations: list[str] = []
        self.history: list[str] = []
        self.stats: Counter[str] = Counter()
        self.outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.observations: Counter[str] = Counter()

    def violation(self, what: str) -> None:
        self.violations.append(f"{self.step}: {what}")

    def begin(self, i: int, what: str) -> None:
        self.step = f"step {i} {what}"
        self.carried, self.accepted, self.replies, self.reasons = [], set(), [], []
        self.model = {}
        self.views = {}
        for cid in self.channels:
            latest = self.bob.latest(cid)
            if latest is not None:
                busy = any(i.in_flight for i in self.bob.channels() if i.channel_id == cid)
                max_signed = max(self.file_max_signed.get(cid, 0), latest.state.version)
                self.views[cid] = View(latest=latest.state, max_signed=max_signed, busy=busy)

    # -- judging what a frame carries ----------------------------------------------------

    def judge(self, label: str, params: Params, p: Propose) -> Carried:
        state = p.state
        view = self.views.get(state.channel_id)
        tip, max_signed = self.tip(params) if view is not None else (state, 0)
        bad = (
            view is None
            or not _signed_by(params, state, p.signature, self.key.address)
            or totals(state) != totals(view.latest)
            or state.version <= view.max_signed
            or state.version > MAX_VERSION
            or view.latest.is_final
        )
        valid = (
            view is not None
            and not bad
            and not view.busy
            and p.base_version == tip.version
            and state.version > max_signed
            # bob has no policy: the default one refuses what takes from him
            and default_policy(1, view.latest, state) is None
        )
        if valid:
            self.model[state.channel_id] = (state.version, state.version)
        digest = state_digest(params, state)
        return Carried(label=label, params=params, state=state, digest=digest, bad=bad, valid=valid)

    def judge_open(self, label: str, msg: Open) -> Carried:
        p, s = msg.params, msg.state
        bad = (
            p.participants != (self.key.address, self.bob.address)
            or p.channel_id in self.views
            or s.channel_id != p.channel_id
            or s.version != 0
            or s.is_final
            or any(a.locked for a in s.allocations)
            or any(a.total > UINT256_MAX for a in s.allocations)
            # bob's cap on live channels with one peer (all of his are with alice)
            or len(self.channels) + sum(c.opens and c.valid for c in self.carried)
            >= MAX_CHANNELS_PER_PEER
            or not _signed_by(p, s, msg.signature, self.key.address)
        )
        digest = state_digest(p, s)
        return Carried(
            label=label, params=p, state=s, digest=digest, bad=bad, valid=not bad, opens=True
        )

    def sync_is_plain(self, msg: Sync) -> bool:
        """Whether bob handles a ``Sync``'s proposals as if they came on their own: its
        latest is below his, or his very state, so it neither moves his latest nor is
        refused (a refused ``Sync`` is dropped whole)."""
        theirs = msg.latest.state
        view = self.views.get(theirs.channel_id)
        return (
            view is not None
            and all(p.state.channel_id == theirs.channel_id for p in msg.pending)
            and (
                theirs.version < view.latest.version
                or (theirs.version == view.latest.version and theirs == view.latest)
            )
        )

    def carried_by(self, frame: Frame) -> list[Carried] | None:
        """What ``frame`` asks bob to countersign, judged; None if it may not be sent: it
        would finalise the main channel, push it to the top of the version range (the end
        of the test pays on it) or leave bob next to nothing to pay with."""
        try:
            msg = codec.decode(frame.data)
        except Exception:  # DecodeError, or whatever else bob's own decode would raise
            return []
        if isinstance(msg, Open):
            return [self.judge_open(frame.label, msg)]
        proposals = [msg] if isinstance(msg, Propose) else []
        machine: Params | None = None  # a Sync's proposals go to the Sync's channel
        if isinstance(msg, Sync):
            proposals = list(msg.pending)
            machine = self.channels.get(msg.latest.state.channel_id)
        out = []
        main = self.views[self.main.channel_id].latest
        for p in proposals:
            params = machine or self.channels.get(p.state.channel_id, self.main)
            c = self.judge(frame.label, params, p)
            if isinstance(msg, Sync) and not self.sync_is_plain(msg):
                c = attrs.evolve(c, valid=False)
            if (
                p.state.channel_id == self.main.channel_id
                and _signed_by(self.main, p.state, p.signature, self.key.address)
                and totals(p.state) == totals(main)
                and (
                    p.state.is_final
                    or p.state.version > main.version + 1000
                    or min(a.balances[1] for a in p.state.allocations) < 1000
                )
            ):
                return None
            out.append(c)
        return out

    def admit(self, frame: Frame) -> bool:
        """Whether ``frame`` may be sent (see ``carried_by``; and it fits in a frame:
        oversize on the wire is the transport step's); if so, what it carries is noted."""
        model = dict(self.model)
        carried = self.carried_by(frame) if len(frame.data) <= MAX_FRAME else None
        if carried is None:
            self.model = model
            return False
        self.carried.extend(carried)
        return True

    def pick_frames(self, n: int) -> list[Frame]:
        frames: list[Frame] = []
        while len(frames) < n:
            frame = self.one_frame()
            if self.admit(frame):
                frames.append(frame)
        return frames

    # -- the link ------------------------------------------------------------------------

    async def reconnect(self) -> None:
        if self.conn is not None:
            await trio.aclose_forcefully(self.conn)
        self.conn = await connect(self.key, self.bob.peer_address())
        self.link_up = True
        self.conn_errors = 0
        self.stats["links"] += 1

    async def send(self, frames: list[Frame]) -> None:
        assert self.conn is not None
        try:
            await self.conn.send_many([f.data for f in frames])
        except TransportError:
            self.link_up = False

    def probe(self) -> tuple[bytes, str]:
        """A frame bob refuses with an ``Error`` that names it (its channel is unknown)
        and that changes nothing."""
        self.probes += 1
        cid = ChannelId(PROBE_PREFIX + self.probes.to_bytes(4, "big") + bytes(24))
        alloc = Allocation(asset=ETH, balances=(0, 0))
        state = State(channel_id=cid, version=1, allocations=(alloc,))
        msg = Propose(base_version=0, state=state, signature=bytes(65))
        return codec.encode(msg), cid.hex()[:16]

    async def settle(self) -> None:
        """Two probes, each answered in turn: bob has handled every frame sent before
        them, countersigned what he held, and sent every answer (the second probe is
        sent after the first is answered, so bob reads it after his reader went idle).
        A link that closed meanwhile leaves bob's flusher to finish: wait for it too."""
        for _ in range(2):
            if not self.link_up:
                break
            assert self.conn is not None
            frame, tag = self.probe()
            try:
                await self.conn.send(frame)
            except TransportError:
                self.link_up = False
                break
            await self.read_until(partial(_is_answer_to, tag))
        await self.bob.drain()

    async def read_until(self, done: Callable[[codec.Message], bool], patience: float = 5) -> bool:
        """Handle bob's messages until ``done(message)``; False if the link closed or
        ``patience`` seconds went by first."""
        assert self.conn is not None
        with trio.move_on_after(patience):
            while True:
                try:
                    data = await self.conn.receive()
                except TransportError:
                    self.link_up = False
                    self.replies.append("closed")
                    return False
                try:
                    msg = codec.decode(data)
                except DecodeError as exc:
                    self.violation(f"bob sent a frame that does not decode: {exc}")
                    continue
                if isinstance(msg, Error) and PROBE_PREFIX.hex() in msg.reason:
                    self.conn_errors += 1
                else:
                    self.on_message(msg)
                if done(msg):
                    return True
        return False

    # -- bob's answers -------------------------------------------------------------------

    def on_message(self, msg: codec.Message) -> None:
        if isinstance(msg, Accept):
            self.replies.append("Accept")
            self.on_accept(msg)
        elif isinstance(msg, Reject | Error):
            name = msg.reason.split(":", 1)[0]
            self.replies.append(f"{type(msg).__name__}:{name}")
            self.reasons.append(msg.reason)
            if name not in ERROR_NAMES:
                self.violation(f"{type(msg).__name__} names no error type: {msg.reason!r}")
            if isinstance(msg, Error):
                self.conn_errors += 1
            elif not any(
                c.state.version == msg.version and c.digest == msg.state_hash for c in self.carried
            ):
                self.violation(f"Reject of v{msg.version} names no state we sent: {msg.reason}")
        elif isinstance(msg, Sync):
            self.replies.append("Sync")
            s = msg.latest
            params = self.channels.get(s.state.channel_id)
            if params is None or not all(
                _signed_by(params, s.state, s.signatures[i], params.participants[i]) for i in (0, 1)
            ):
                self.violation(f"bob's Sync holds v{s.state.version}, not co-signed on ours")
        elif isinstance(msg, Propose):
            self.replies.append("Propose")
            params = self.channels.get(msg.state.channel_id)
            if params is None or not _signed_by(params, msg.state, msg.signature, self.bob.address):
                self.violation("bob proposed a state he did not sign, or on no channel of ours")
            else:
                self.bob_props.append(msg)
        else:
            self.violation(f"bob sent {type(msg).__name__}")

    def on_accept(self, a: Accept) -> None:
        for k, c in enumerate(self.carried):
            if c.state.channel_id != a.channel_id or c.state.version != a.version:
                continue
            if not _signed_by(c.params, c.state, a.signature, self.bob.address):
                continue
            self.accepted.add(k)
            if c.bad:
                self.violation(f"bob countersigned a state he must refuse: {c.label}")
            if c.opens:
                self.channels[c.params.channel_id] = c.params
            return
        self.violation(f"Accept of v{a.version} countersigns nothing we sent in this step")

    # -- the rules -----------------------------------------------------------------------

    def check_store(self) -> None:
        channel_rows, state_rows = _rows(self.bob_path)
        params: dict[bytes, Params] = {}
        for row in channel_rows:
            cid = bytes(row[0])
            params[cid] = codec.params_from_wire(cbor2.loads(row[1]))
            latest_v, max_signed = row[5], row[6]
            assert isinstance(latest_v, int) and isinstance(max_signed, int), row
            before = self.file_latest.get(cid, -1)
            if latest_v < before:
                self.violation(f"channel {cid.hex()[:8]}: latest v{before} went to v{latest_v}")
            self.file_latest[cid], self.file_max_signed[cid] = latest_v, max_signed
            mem = self.bob.latest(cid)
            machine = self.bob._channels[cid].machine.latest
            held = [None if s is None else s.state.version for s in (mem, machine)]
            if held != [latest_v, latest_v]:
                self.violation(f"channel {cid.hex()[:8]}: v{latest_v} on file, {held} in memory")
        rows: dict[tuple[bytes, int], tuple[Any, ...]] = {
            (bytes(r[0]), r[1]): r for r in state_rows
        }
        for cid, v in self.file_latest.items():
            if rows.get((cid, v), ())[6:7] != (COSIGNED,):
                self.violation(f"channel {cid.hex()[:8]}: its latest v{v} is no co-signed row")
        for key, row in self.cosigned.items():
            if rows.get(key) != row:
                self.violation(f"co-signed row v{key[1]} of {key[0].hex()[:8]} changed or went")
        for key, row in sorted(rows.items()):
            if row[6] != COSIGNED or key in self.cosigned:
                continue
            p, state = params[key[0]], codec.state_from_wire(cbor2.loads(row[3]))
            where = f"co-signed row v{key[1]} of {key[0].hex()[:8]}"
            if not all(_signed_by(p, state, row[4 + i], p.participants[i]) for i in (0, 1)):
                self.violation(f"{where} is not signed by both")
            if totals(state) != self.reference.setdefault(key[0], totals(state)):
                self.violation(f"{where} changes the totals")
            if any(b.state == state for b in self.burned):
                self.observations["a proposal of bob's that alice refused, adopted later"] += 1
            self.cosigned[key] = row

    def check_logs(self) -> None:
        for rec in self.caplog.records[self.logs_seen :]:
            if rec.levelno >= logging.ERROR:
                where = ""
                if rec.exc_info and rec.exc_info[1] is not None:
                    exc = rec.exc_info[1]
                    while isinstance(exc, BaseExceptionGroup):
                        exc = exc.exceptions[0]
                    lines, tb = [], exc.__traceback__
                    while tb is not None:
                        lines.append(f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}")
                        tb = tb.tb_next
                    where = f" [{type(exc).__name__}: {str(exc)[:60]} at {' > '.join(lines[-4:])}]"
                self.violation(f"{rec.name} logged: {rec.getMessage()[:80]}{where}")
            elif rec.levelno >= logging.WARNING:
                self.observations[f"warning: {rec.getMessage()[:50]}"] += 1
        self.logs_seen = len(self.caplog.records)

    def check(self, labels: list[str], *, single: bool) -> None:
        """The rules, once every answer to the step has arrived; ``single``: the step
        was one frame (a valid proposal or Open carried alone must be accepted)."""
        nursery = self.bob._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            tail = "\n".join(self.history[-8:])
            raise AssertionError(
                f"FUZZ_SEED={self.seed}: {self.step}: bob's client stopped:\n{tail}"
            )
        self.check_logs()
        if single and len(self.carried) == 1 and "closed" not in self.replies:
            for k, c in enumerate(self.carried):
                if c.valid and k not in self.accepted:
                    self.violation(f"{c.label} was valid, but bob said {self.reasons}")
        self.check_store()
        if single:
            kind = labels[0].split(" at ")[0].split("=")[0].split(",")[0]
            self.outcomes[kind][",".join(sorted(set(self.replies))) or "silent"] += 1
        for k in self.accepted:
            self.stats["accepted: " + ("open" if self.carried[k].opens else "state")] += 1
        for reply in self.replies:
            self.stats[f"reply {reply}"] += 1

    # -- steps -----------------------------------------------------------------------

    async def frames_step(self, i: int) -> None:
        self.begin(i, "")
        n = 1 if self.rng.random() < 0.7 else self.rng.randint(2, 5)
        frames = self.pick_frames(n)
        labels = [f.label for f in frames]
        self.step = f"step {i} {labels}"
        self.history.append(self.step)
        self.stats["frames"] += n
        await self.send(frames)
        await self.settle()
        self.check(labels, single=n == 1)

    async def bob_pays(self, i: int) -> None:
        """Bob proposes; alice answers with mutated Accepts, Rejects and Syncs (and maybe
        a crossing proposal), then settles it: a valid Accept, a Reject (bob's pay fails
        and alice keeps his signature, for a later Sync), a Sync carrying it co-signed,
        or a conflict Reject (bob retries: his next proposals are accepted)."""
        self.begin(i, "bob pays")
        r, cid = self.rng, self.main.channel_id
        done, outcome = trio.Event(), []

        async def pay() -> None:
            try:
                await self.bob.pay(cid, ETH, r.randint(1, 20))
                outcome.append("returned")
            except (UpdateRejected, PeerTimeout, LocalProtocolError) as exc:
                outcome.append(type(exc).__name__)
            except Exception as exc:
                outcome.append(repr(exc))
                self.violation(f"bob.pay raised {exc!r}")
            finally:
                done.set()

        assert self.nursery is not None
        seen = len(self.bob_props)
        self.nursery.start_soon(pay)
        with trio.move_on_after(2):
            while len(self.bob_props) == seen and not done.is_set():
                await self.read_until(lambda msg: isinstance(msg, Propose), patience=0.05)
        if len(self.bob_props) == seen:
            await done.wait()
            self.history.append(f"{self.step}: no proposal ({outcome})")
            self.check(["bob pays"], single=False)
            return
        prop = self.bob_props[-1]
        frames = []
        for _ in range(r.randint(0, 3)):
            frames.append(
                r.choice([self.accept_frame, self.reject_frame, self.sync_frame])(self.main)
            )
        if r.random() < 0.15:
            frames.append(self.propose_frame(self.main, valid=True))  # a crossing proposal
        how = r.choice(["accept"] * 6 + ["reject"] * 2 + ["sync"] * 2 + ["conflict"])
        v, digest = prop.state.version, state_digest(self.main, prop.state)
        if how == "accept":
            end = wire(Accept.TYPE, cid, v, self.sign(self.main, prop.state))
        elif how in ("reject", "conflict"):
            end = wire(
                Reject.TYPE, cid, v, digest, "ProposalConflict: " if how == "conflict" else "no"
            )
        else:
            latest = self.bob.latest(cid)
            assert latest is not None
            signed = [
                codec.state_to_wire(prop.state),
                self.sign(self.main, prop.state),
                prop.signature,
            ]
            end = wire(Sync.TYPE, signed, latest.state.version, [])
        frames = [f for f in [*frames, Frame(f"settled by {how}", end)] if self.admit(f)]
        labels = [f.label for f in frames]
        self.step = f"step {i} bob pays v{v}, then {labels}"
        self.history.append(self.step)
        self.stats["frames"] += len(frames)
        await self.send(frames)
        await self.settle()
        with trio.move_on_after(5):
            while not done.is_set():  # accept whatever bob proposes until his pay is done
                if not self.link_up:
                    await self.reconnect()
                latest = self.bob.latest(cid)
                newest = max(self.bob_props, key=lambda p: p.state.version)
                if latest is not None and newest.state.version > latest.state.version:
                    sig = self.sign(self.main, newest.state)
                    await self.send(
                        [Frame("accept", wire(Accept.TYPE, cid, newest.state.version, sig))]
                    )
                await self.settle()
                with trio.move_on_after(0.05):
                    await done.wait()
        await done.wait()
        if outcome == ["UpdateRejected"]:
            self.burned.append(prop)  # alice holds bob's signature on a refused proposal
        self.stats[f"bob's pay, settled by {how}: {outcome[0]}"] += 1
        self.check(labels, single=False)

    async def transport_step(self, i: int) -> None:
        """A frame that breaks the transport: bob closes the link, and nothing changes."""
        what = self.rng.choice(["bad MAC", "oversized", "cut off"])
        self.begin(i, f"transport/{what}")
        self.history.append(self.step)
        self.stats["frames"] += 1
        conn = self.conn
        assert conn is not None
        good = codec.encode(Error(reason="fuzz"))
        with self.monkeypatch.context() as m:
            if what == "bad MAC":
                broken = bytearray(conn._session.encrypt(good))
                broken[-1] ^= 1
                await conn._stream.send_all(bytes(broken))
            elif what == "oversized":
                frame = conn._session.encrypt(b"\x00" * 2000)
                # MAX_FRAME is the largest a 2-byte length can say: lower bob's limit.
                m.setattr(noise, "MAX_FRAME", 1000)
                await conn._stream.send_all(frame)
            else:
                assert isinstance(conn._stream, trio.SocketStream)
                await conn._stream.send_all(conn._session.encrypt(good)[:-5])
                await conn._stream.send_eof()
            if not await self.read_until(lambda msg: False) and self.link_up:
                self.violation(f"bob kept the link open after a frame {what}")
        await self.reconnect()
        await self.settle()
        self.check([self.step], single=False)

    async def run(self, steps: int) -> None:
        self.begin(-1, "setup")
        await self.reconnect()
        await self.settle()
        self.check_store()
        for i in range(steps):
            if not self.link_up or self.conn_errors >= ERRORS_PER_LINK:
                self.begin(i, "reconnect")
                await self.reconnect()
                await self.settle()
            x = self.rng.random()
            if x < 0.07:
                await self.bob_pays(i)
            elif x < 0.09:
                await self.transport_step(i)
            elif x < 0.1:
                self.begin(i, "reconnect")
                self.history.append(self.step)
                await self.reconnect()
                await self.settle()
                self.check(["reconnect"], single=False)
            else:
                await self.frames_step(i)
            if len(self.violations) > 30:
                break

    def report(self) -> str:
        lines = [f"stats: {dict(sorted(self.stats.items()))}"]
        lines.append(f"observations: {dict(self.observations)}")
        lines += [f"  {k}: {dict(c.most_common())}" for k, c in sorted(self.outcomes.items())]
        return "\n".join(lines)


async def test_mutated_frames_from_the_counterparty_never_crash_bob_or_cost_him_a_cosigned_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of mutated frames from alice's own key, mixed with valid ones, over a real
    link: bob's client keeps running, refuses each bad frame with a typed error, accepts
    the valid proposals, and his store never loses or changes a co-signed state nor holds
    one that is not signed by both keys or does not keep the totals; afterwards the real
    alice, restarted from her store, resyncs with bob and pays."""
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    print(f"FUZZ_SEED={seed}")

    def key(name: str) -> Signer:
        return Signer.from_bytes(hashlib.sha256(f"{name}/{seed}".encode()).digest())

    alice_key, bob_key = key("alice"), key("bob")  # test-only keys
    salt = hashlib.sha256(f"salt/{seed}".encode()).digest()
    original_new = Params.new

    def seeded_new(**kw: Any) -> Params:
        return original_new(**{**kw, "salt": kw.get("salt") or salt})

    caplog.set_level(logging.WARNING)
    alice_path, bob_path = tmp_path / "alice.sqlite", tmp_path / "bob.sqlite"
    t0 = trio.current_time()
    async with open_client(bob_key, bob_path, update_timeout=2) as bob:
        with monkeypatch.context() as m:
            m.setattr(Params, "new", seeded_new)  # the channel id follows the seed too
            async with open_client(alice_key, alice_path) as alice:
                cid = await _open(alice, bob, TOTAL, chain_id=31337)
                for _ in range(3):
                    await alice.pay(cid, ETH, 1)
                main = alice.params(cid)
        await bob.drain()
        fuzz = Fuzzer(
            seed=seed,
            alice=alice_key,
            bob=bob,
            bob_path=bob_path,
            main=main,
            caplog=caplog,
            monkeypatch=monkeypatch,
        )
        async with trio.open_nursery() as nursery:
            fuzz.nursery = nursery
            await fuzz.run(STEPS)
        if fuzz.conn is not None:
            await fuzz.conn.aclose()
        print(fuzz.report())
        if os.environ.get("FUZZ_HISTORY"):
            print("\n".join(fuzz.history))
        tail = "\n".join(fuzz.history[-8:])
        assert not fuzz.violations, (
            f"FUZZ_SEED={seed}: {len(fuzz.violations)} broken rules:\n"
            + "\n".join(fuzz.violations[:12])
            + f"\nthe last steps:\n{tail}"
        )

        # The real alice restarts from her store, which lacks what bob accepted from the
        # fuzzer: the resync brings her to bob's latest, and a pay goes through.
        before = bob.latest(cid)
        assert before is not None
        async with open_client(alice_key, alice_path) as alice:
            await _wait_same(alice, bob, cid)
            latest = alice.latest(cid)
            assert latest == before
            assert all(
                _signed_by(main, latest.state, latest.signatures[i], main.participants[i])
                for i in (0, 1)
            )
            paid = await alice.pay(cid, ETH, 1)
            assert paid.state.version > before.state.version
            await _wait_same(alice, bob, cid)
        fuzz.begin(STEPS, "after the real alice paid")
        fuzz.check(["end"], single=False)
        assert not fuzz.violations, f"FUZZ_SEED={seed}: " + "\n".join(fuzz.violations)
    elapsed = trio.current_time() - t0
    print(f"FUZZ_SEED={seed}: {fuzz.stats['frames']} frames in {elapsed:.1f}s")


# -- what the fuzzer found, made deterministic -----------------------------------------


async def test_a_bignum_protocol_version_or_message_type_is_refused_as_a_decode_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame whose protocol version or message type is a CBOR bignum too long for
    Python's int-to-str limit (4300 digits) is refused with ``DecodeError`` like any other
    bad frame, from any key: an answer, the link kept, no failure logged."""
    caplog.set_level(logging.WARNING)
    frames = [
        cbor2.dumps([BIG, Propose.TYPE], canonical=True),
        cbor2.dumps([codec.PROTOCOL_VERSION, -BIG], canonical=True),
    ]
    async with open_client(Signer.generate(), tmp_path / "bob.sqlite") as bob:  # test-only key
        reasons = await _raw_stranger_frames(bob, frames, Signer.generate())
    assert [r.split(":")[0] for r in reasons] == ["DecodeError"] * 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_signed_proposal_past_the_int64_range_neither_stops_bob_nor_changes_his_store(
    tmp_path: Path,
) -> None:
    """A proposal that alice's key signed, that keeps the totals and whose version is a
    valid uint64 past 2**63 - 1 (the largest SQLite INTEGER, ``MAX_VERSION``) is refused
    as ``StaleVersion``: bob's client keeps running, his store keeps every row it had, and
    alice then pays as usual."""
    alice_key, bob_key = Signer.generate(), Signer.generate()  # test-only keys
    async with bob_alone_after_a_pay(tmp_path, alice_key, bob_key) as (bob, cid, params, latest):
        await bob.drain()
        _, rows = _durable(tmp_path / "bob.sqlite")
        a = latest.state.allocations[0]
        far = attrs.evolve(
            latest.state,
            version=2**63,
            allocations=(attrs.evolve(a, balances=(a.balances[0] - 1, a.balances[1] + 1)),),
        )
        sig = alice_key.sign(state_digest(params, far))
        conn = await connect(alice_key, bob.peer_address())
        await conn.send(
            codec.encode(Propose(base_version=latest.state.version, state=far, signature=sig))
        )
        with trio.fail_after(5):
            answer = codec.decode(await conn.receive())
            while not isinstance(answer, Accept | Reject | Error):
                answer = codec.decode(await conn.receive())
        # Past MAX_VERSION: refused as StaleVersion (it used to stop bob's client).
        assert isinstance(answer, Reject), answer
        assert answer.reason.startswith("StaleVersion"), answer
        await conn.aclose()
        assert set(rows) <= set(_durable(tmp_path / "bob.sqlite")[1])
        async with open_client(alice_key, tmp_path / "alice.sqlite") as alice:
            await _wait_same(alice, bob, cid)
            await alice.pay(cid, ETH, 1)
            await _wait_same(alice, bob, cid)
