"""Durable, encrypted co-signed updates between two OS processes; JSON on the last line.

    .venv/bin/python benchmarks/updates.py [--quick] [--rounds R] [--profile DIR]

Parties: two spawned child processes, each running the real ``open_client`` (Trio,
BOLT 8 over loopback TCP, SQLite WAL ``synchronous=FULL`` store in a temp dir).
"alice" opens a channel to "bob" and is the only proposer:

* pipelined: N ``pay()`` calls from 4 x window caller tasks on one channel (window 256);
* lock-step: M ``pay()`` calls awaited one at a time, each latency recorded;

both split into rounds, each round with its own baselines (below) run just before or
just after the channel's phases: the ratios are medians of the rounds' ratios, so a
machine whose speed drifts during the run weighs on both sides of each.

``lockstep_floor_ms`` is what no durable lock-step update can beat on this machine,
measured in the same run: the bare baseline's lock-step p50 plus three bare SQLite
commits (``sqlite_commit_ms``: WAL, ``synchronous=FULL``, one small row each, on a
warm WAL as the store's is in steady state), one for each commit on an update's
critical path.  ``sqlite_growing_commit_ms`` is the same commit on a fresh WAL that it
grows: about twice as slow, and paid by a store only until its first checkpoint.
``lockstep_idle_floor_ms`` is the same sum with ``sqlite_idle_commit_ms``: the commit
timed after an idle gap (``_common.IDLE_GAP_S``), as each commit of a lock-step update
is.  Those are slower than back-to-back ones on these VMs, so this is the tighter floor.
``lockstep_e2e_floor_ms`` is measured, not added up: in each round, a fresh pair of
processes runs ``lockstep_orders.py``'s ``proposer_first`` (DESIGN §4's order with real
commits and signatures over plain TCP, no client code: no encryption, machine, store
plan or outbox); ``ratio_p50_lockstep_vs_e2e_floor`` is what the client costs on top.

In the same run, a bare baseline: two processes doing only the co-signing over
plain Trio TCP with 4-byte length-prefixed frames -- the same two-asset state,
the same canonical-CBOR ``Propose``/``Accept`` messages (``channel.codec``), the
EIP-712 digest (``channel.eip712``) and coincurve sign/recover (``channel.keys``),
the same window -- with no store, no encryption, no update machine.

``--profile DIR`` writes cProfile stats of each child's Trio thread over the
measured phases (``DIR/{alice,bob}.prof`` and ``.prof.txt``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    ADJUDICATOR,
    BALANCES,
    CHAIN_ID,
    Profiler,
    StoreCounter,
    ablations,
    add_client_options,
    apply_client_options,
    busy_poll_seconds,
    client_options,
    cpu_seconds,
    delta,
    finish_pair,
    install_ablations,
    length_frame,
    log,
    machine_info,
    percentile,
    run_trio,
    split_frames,
    sqlite_commit_times,
    sqlite_growing_commit_times,
    sqlite_idle_commit_times,
    wait_result,
)
from lockstep_orders import measure as measure_orders

ETH = BALANCES[0][0]
WINDOW = 256  # channel.limits.PIPELINE_WINDOW; --window overrides it for experiments
#: Cap on the all-at-once phase (each pay its own task).
ALL_AT_ONCE_MAX = 5000
#: The phases are split into this many rounds, baseline and channel in turn.
ROUNDS = 3
#: Bare SQLite commits timed in each round (the floor's commit latency), on a warm WAL.
COMMIT_PROBES = 300
#: And on a fresh WAL that each commit grows (reported, not part of the floor).
GROWING_PROBES = 100
#: And each after an idle gap, as in lock-step (the idle floor's commit latency).
IDLE_PROBES = 200
#: Lock-step updates of the end-to-end floor in each round (``lockstep_orders.py``'s
#: ``proposer_first``: DESIGN §4's order with no client code), after its own warm-up.
E2E_FLOOR_PAYS = 400
WARMUP = 300


# --------------------------------------------------------------------------------------
# the channel benchmark: two children running the real client


def bob_main(
    secret: bytes, store_dir: str, parent: Any, ctl: Any, profile: str | None, window: int
) -> None:
    """The responder: serve, answer proposals, report counters on request."""
    import trio

    from channel.client import open_client
    from channel.keys import Signer

    counter = StoreCounter()
    counter.install()
    install_ablations()
    prof = Profiler(profile)

    async def main() -> None:
        async with open_client(
            Signer.from_bytes(secret),
            Path(store_dir) / "bob.sqlite",
            window=window,
            **client_options(),
        ) as bob:
            parent.send(str(bob.peer_address()))
            while True:
                cmd = await trio.to_thread.run_sync(ctl.recv)
                if cmd == "prof_on":
                    prof.on()
                elif cmd == "prof_off":
                    prof.off()
                if cmd == "stop":
                    ctl.send(counter.snapshot())
                    break
                ctl.send(counter.snapshot())

    run_trio(main)
    prof.dump()


def alice_main(
    secret: bytes,
    store_dir: str,
    bob_addr: str,
    parent: Any,
    ctl: Any,
    profile: str | None,
    window: int,
) -> None:
    """The proposer: open the channel, then run the phases the parent asks for, one at a
    time (``(phase, n)`` on ``parent``, each answered with its measurements), until
    ``("stop", 0)``, answered with the final co-signed version."""
    import trio

    from channel.client import open_client
    from channel.errors import PeerTimeout
    from channel.keys import Signer
    from channel.transport import PeerAddress

    counter = StoreCounter()
    counter.install()
    install_ablations()
    prof = Profiler(profile)

    def snap_both() -> tuple[dict[str, float], dict[str, float]]:
        ctl.send("snap")
        return counter.snapshot(), ctl.recv()

    async def main() -> None:
        async with open_client(
            Signer.from_bytes(secret),
            Path(store_dir) / "alice.sqlite",
            window=window,
            **client_options(),
        ) as alice:
            cid = await alice.open_channel(
                PeerAddress.parse(bob_addr),
                chain_id=CHAIN_ID,
                adjudicator=ADJUDICATOR,
                challenge_duration=3600,
                balances=BALANCES,
            )
            log(f"  channel {cid.hex()[:16]} open; warm-up {WARMUP} pays")
            async with trio.open_nursery() as nursery:
                for _ in range(WARMUP):
                    nursery.start_soon(alice.pay, cid, ETH, 1)
            for _ in range(WARMUP // 3):
                await alice.pay(cid, ETH, 1)

            async def pipelined(n: int) -> dict[str, Any]:
                # N pays from 4 x window concurrent tasks, each awaiting its pays in turn,
                # so the window is always full and a line of updates waits behind it.
                callers = 4 * window
                per_caller = -(-n // callers)
                timeouts = 0

                async def caller(k: int) -> None:
                    nonlocal timeouts
                    for _ in range(k):
                        try:
                            await alice.pay(cid, ETH, 1)
                        except PeerTimeout:
                            timeouts += 1  # waited > update_timeout for window space

                a0, b0 = snap_both()
                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(callers):
                        nursery.start_soon(caller, per_caller)
                elapsed = time.perf_counter() - t0
                a1, b1 = snap_both()
                return {
                    "updates": per_caller * callers - timeouts,
                    "timeouts": timeouts,
                    "seconds": elapsed,
                    "alice": delta(a1, a0),
                    "bob": delta(b1, b0),
                }

            async def lockstep(n: int) -> dict[str, Any]:
                lat: list[float] = []
                a0, b0 = snap_both()
                t0 = time.perf_counter()
                for _ in range(n):
                    s = time.perf_counter()
                    await alice.pay(cid, ETH, 1)
                    lat.append(time.perf_counter() - s)
                elapsed = time.perf_counter() - t0
                a1, b1 = snap_both()
                return {
                    "updates": n,
                    "seconds": elapsed,
                    "latencies": lat,
                    "alice": delta(a1, a0),
                    "bob": delta(b1, b0),
                }

            async def all_at_once(n: int) -> dict[str, Any]:
                # Every pay its own task, all started at once (the literal "N concurrent
                # pays").  Time spent waiting for window space counts against the client's
                # update_timeout, so a large N can end in PeerTimeout: that is reported.
                t0 = time.perf_counter()
                error = None
                try:
                    async with trio.open_nursery() as nursery:
                        for _ in range(n):
                            nursery.start_soon(alice.pay, cid, ETH, 1)
                except BaseException as exc:
                    leaf = exc
                    while isinstance(leaf, BaseExceptionGroup):
                        leaf = leaf.exceptions[0]
                    error = f"{type(leaf).__name__}: {leaf}"
                return {"updates": n, "seconds": time.perf_counter() - t0, "error": error}

            phases = {"pipelined": pipelined, "lockstep": lockstep, "all_at_once": all_at_once}
            parent.send("ready")
            while True:
                phase, n = await trio.to_thread.run_sync(parent.recv)
                if phase == "stop":
                    break
                ctl.send("prof_on")
                ctl.recv()
                prof.on()
                result = await phases[phase](n)
                prof.off()
                ctl.send("prof_off")
                ctl.recv()
                parent.send(result)
            await alice.drain()
            latest = alice.latest(cid)
            assert latest is not None and latest.fully_signed
            parent.send({"final_version": latest.state.version})

    run_trio(main)
    ctl.send("stop")
    ctl.recv()
    prof.dump()


class ChannelPair:
    """The two children of the channel benchmark, alive across rounds: ``phase`` runs one
    measured phase in them and returns what alice measured."""

    def __init__(self, tmp: str, profile_dir: str | None, window: int) -> None:
        from channel.keys import Signer

        ctx = mp.get_context("spawn")
        alice_key, bob_key = Signer.generate(), Signer.generate()
        bob_parent, bob_child = ctx.Pipe()
        self.conn, alice_child = ctx.Pipe()
        ctl_alice, ctl_bob = ctx.Pipe()
        prof = (lambda who: str(Path(profile_dir) / f"{who}.prof")) if profile_dir else None
        self.bob = ctx.Process(
            target=bob_main,
            args=(bob_key.secret_bytes(), tmp, bob_child, ctl_bob, prof and prof("bob"), window),
        )
        self.bob.start()
        if not bob_parent.poll(30):
            self.bob.terminate()
            raise RuntimeError("bob did not start")
        bob_addr = bob_parent.recv()
        self.alice = ctx.Process(
            target=alice_main,
            args=(
                alice_key.secret_bytes(),
                tmp,
                bob_addr,
                alice_child,
                ctl_alice,
                prof and prof("alice"),
                window,
            ),
        )
        self.alice.start()
        self._answer("start")

    def _answer(self, what: str) -> Any:
        try:
            return wait_result(self.conn, self.alice, 600, f"alice ({what})")
        except BaseException:
            self.bob.terminate()
            raise

    def phase(self, name: str, n: int) -> dict[str, Any]:
        self.conn.send((name, n))
        result: dict[str, Any] = self._answer(name)
        return result

    def kill(self) -> None:
        """Terminate whichever child is still running (nothing to do after ``stop``)."""
        for p in (self.alice, self.bob):
            if p.is_alive():
                p.terminate()
                p.join(10)

    def stop(self) -> int:
        """Stop both children (they must exit cleanly); the final co-signed version."""
        self.conn.send(("stop", 0))
        final: dict[str, Any] = finish_pair(self.conn, self.alice, self.bob, 120, "alice")
        return int(final["final_version"])


# --------------------------------------------------------------------------------------
# the bare baseline: sign/verify + codec over plain TCP, no store, no encryption

#: The bare baseline answers and refills in bursts of this many frames, so that its two
#: processes work at the same time (without it they take turns and the baseline
#: understates what two processes can do).
BARE_BURST = 4


def bare_responder_main(
    secret: bytes, proposer_address: bytes, parent: Any, ctl: Any, cumulative: bool = False
) -> None:
    """``cumulative``: the client's rule (channel.machine, "Countersign with defer"): of
    the proposals one socket read brings (at most MAX_DEFERRED), countersign the newest
    only; its Accept accepts the ones before it.  Otherwise every proposal is verified
    and countersigned (the baseline the issue defines)."""
    import cbor2
    import trio

    from channel import busypoll, codec
    from channel.eip712 import state_digest
    from channel.keys import Signer, recover
    from channel.limits import MAX_DEFERRED

    signer = Signer.from_bytes(secret)
    poll = busy_poll_seconds()  # as the clients do: poll after each send

    def countersign(msg: codec.Propose, digest: bytes) -> bytes:
        if recover(digest, msg.signature) != proposer_address:
            raise RuntimeError("bad signature")
        acc = codec.Accept(
            channel_id=msg.state.channel_id,
            version=msg.state.version,
            signature=signer.sign(digest),
        )
        return length_frame(codec.encode(acc))

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        params = None
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            replies = []
            newest: tuple[codec.Propose, bytes] | None = None
            held = 0
            for frame in split_frames(buf):
                if params is None:
                    params = codec.params_from_wire(cbor2.loads(frame))
                    continue
                msg = codec.decode(frame)
                assert isinstance(msg, codec.Propose)
                digest = state_digest(params, msg.state)
                if cumulative:
                    newest, held = (msg, digest), held + 1
                    if held < MAX_DEFERRED:
                        continue
                    replies.append(countersign(*newest))
                    newest, held = None, 0
                else:
                    replies.append(countersign(msg, digest))
                if len(replies) >= BARE_BURST:
                    # Answer in small bursts so the proposer can refill its window while we
                    # work on the rest: the two processes overlap (the fair floor).
                    await stream.send_all(b"".join(replies))
                    busypoll.extend(poll)
                    replies = []
            if newest is not None:
                replies.append(countersign(*newest))
            if replies:
                await stream.send_all(b"".join(replies))
                busypoll.extend(poll)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            parent.send(listeners[0].socket.getsockname()[1])
            while await trio.to_thread.run_sync(ctl.recv) == "snap":
                ctl.send(cpu_seconds())
            nursery.cancel_scope.cancel()

    run_trio(main)


def bare_proposer_main(
    secret: bytes,
    responder_address: bytes,
    port: int,
    n_pipe: int,
    n_lock: int,
    parent: Any,
    ctl: Any,
    window: int = WINDOW,
) -> None:
    """The bare proposer: an Accept for version v accepts every pending proposal up to v
    (so it works with either responder rule)."""
    import cbor2
    import trio

    from channel import busypoll, codec
    from channel.eip712 import state_digest
    from channel.keys import Signer, recover
    from channel.state import Allocation, Params, State

    signer = Signer.from_bytes(secret)
    poll = busy_poll_seconds()  # as the clients do: poll after each send
    params = Params.new(
        chain_id=CHAIN_ID,
        adjudicator=ADJUDICATOR,
        participants=(signer.address, responder_address),
        challenge_duration=3600,
    )
    state0 = State.initial(params, BALANCES)
    version = 0

    def next_proposal() -> tuple[tuple[int, bytes], bytes]:
        nonlocal version
        version += 1
        a0 = state0.allocations[0]
        allocs = (
            Allocation(
                asset=a0.asset, balances=(a0.balances[0] - version, a0.balances[1] + version)
            ),
            *state0.allocations[1:],
        )
        st = State(channel_id=params.channel_id, version=version, allocations=allocs)
        digest = state_digest(params, st)
        msg = codec.Propose(base_version=version - 1, state=st, signature=signer.sign(digest))
        return (version, digest), length_frame(codec.encode(msg))

    def check_accept(frame: bytes, pending: deque[tuple[int, bytes]]) -> int:
        """Check an Accept against the pending proposals; pop and count what it accepts."""
        msg = codec.decode(frame)
        assert isinstance(msg, codec.Accept)
        i = msg.version - pending[0][0]
        if not 0 <= i < len(pending) or recover(pending[i][1], msg.signature) != (
            responder_address
        ):
            raise RuntimeError("bad countersignature")
        for _ in range(i + 1):
            pending.popleft()
        return i + 1

    async def pipelined(stream: trio.SocketStream, n: int) -> float:
        pending: deque[tuple[int, bytes]] = deque()
        space = trio.Event()
        done = 0

        async def receiver() -> None:
            nonlocal done, space
            buf = bytearray()
            while done < n:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("responder closed")
                buf += data
                for i, frame in enumerate(split_frames(buf), 1):
                    done += check_accept(frame, pending)
                    if i % BARE_BURST == 0:
                        space.set()
                        await trio.lowlevel.checkpoint()  # let the sender refill
                space.set()

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            sent = 0
            while sent < n:
                room = min(window - len(pending), n - sent)
                if room <= 0:
                    space = trio.Event()
                    await space.wait()
                    continue
                batch = []
                for _ in range(room):
                    digest, frame = next_proposal()
                    pending.append(digest)
                    batch.append(frame)
                sent += room
                await stream.send_all(b"".join(batch))
                busypoll.extend(poll)
        return time.perf_counter() - t0

    async def lockstep(stream: trio.SocketStream, n: int) -> list[float]:
        lat = []
        buf = bytearray()
        for _ in range(n):
            s = time.perf_counter()
            key, frame = next_proposal()
            await stream.send_all(frame)
            busypoll.extend(poll)
            frames: list[bytes] = []
            while not frames:
                buf += await stream.receive_some(65536)
                frames = split_frames(buf)
            check_accept(frames[0], deque([key]))
            lat.append(time.perf_counter() - s)
        return lat

    async def main() -> dict[str, Any]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            length_frame(cbor2.dumps(codec.params_to_wire(params), canonical=True))
        )
        await pipelined(stream, WARMUP)
        ctl.send("snap")
        r0, p0 = ctl.recv(), cpu_seconds()
        secs = await pipelined(stream, n_pipe)
        ctl.send("snap")
        r1, p1 = ctl.recv(), cpu_seconds()
        lat = await lockstep(stream, n_lock)
        await stream.aclose()
        return {
            "pipelined_s": secs,
            "lockstep": lat,
            "cpu_s": {"proposer": p1 - p0, "responder": r1 - r0},
        }

    parent.send(run_trio(main))


def run_bare(
    n_pipe: int, n_lock: int, window: int = WINDOW, cumulative: bool = False
) -> dict[str, Any]:
    from channel.keys import Signer

    ctx = mp.get_context("spawn")
    a, b = Signer.generate(), Signer.generate()
    r_parent, r_child = ctx.Pipe()
    p_parent, p_child = ctx.Pipe()
    ctl_p, ctl_r = ctx.Pipe()
    resp = ctx.Process(
        target=bare_responder_main,
        args=(b.secret_bytes(), a.address, r_child, ctl_r, cumulative),
    )
    resp.start()
    prop: Any = None
    try:
        if not r_parent.poll(30):
            raise RuntimeError("bare responder did not start")
        port = r_parent.recv()
        prop = ctx.Process(
            target=bare_proposer_main,
            args=(a.secret_bytes(), b.address, port, n_pipe, n_lock, p_child, ctl_p, window),
        )
        prop.start()
        result: dict[str, Any] = wait_result(p_parent, prop, 300, "bare proposer")
        ctl_p.send("stop")
        prop.join(30)
        resp.join(30)
    finally:
        for p in (prop, resp):
            if p is not None and p.is_alive():
                p.terminate()
                p.join(10)
    return result


# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s)")
    ap.add_argument(
        "--pipelined", type=int, help="pipelined pays in all (default 21000, quick 6000)"
    )
    ap.add_argument("--lockstep", type=int, help="lock-step pays in all (default 2100, quick 900)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"rounds the phases are split into, baseline and channel in turn (default {ROUNDS})",
    )
    ap.add_argument("--profile", metavar="DIR", help="write cProfile stats of both parties")
    ap.add_argument(
        "--window",
        type=int,
        default=WINDOW,
        help="pipeline window passed to open_client (experiments; default PIPELINE_WINDOW)",
    )
    ap.add_argument(
        "--bare-window",
        type=int,
        help="pipeline window of the bare baseline (default: the same as --window)",
    )
    ap.add_argument(
        "--no-bare", action="store_true", help="skip the bare baseline (for profiling runs)"
    )
    add_client_options(ap)
    args = ap.parse_args()
    busy_poll = apply_client_options(args)
    rounds = max(1, args.rounds)
    n_pipe = -(-(args.pipelined or (6000 if args.quick else 21000)) // rounds)
    n_lock = -(-(args.lockstep or (900 if args.quick else 2100)) // rounds)
    e2e_pays = E2E_FLOOR_PAYS // 2 if args.quick else E2E_FLOOR_PAYS
    # DESIGN §4's order, blocking or (with any --busy-poll) polling for BUSY_POLL.
    e2e_case = ("proposer_first", "_polling" if busy_poll else "")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    bare_window = args.bare_window or args.window
    bare_n, bare_lock = (64, 64) if args.no_bare else (n_pipe, n_lock)

    t_start = time.perf_counter()
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="optichannel-bench-") as tmp:
        log(f"channel: two children, {rounds} rounds of {n_pipe} pipelined + {n_lock} lock-step")
        pair = ChannelPair(tmp, args.profile, args.window)

        def baseline(r: int) -> dict[str, Any]:
            bare = run_bare(bare_n, bare_lock, window=bare_window)
            cum = run_bare(bare_n, 64, window=bare_window, cumulative=True)
            commits = sqlite_commit_times(tmp, COMMIT_PROBES)
            growing = sqlite_growing_commit_times(tmp, GROWING_PROBES)
            idle = sqlite_idle_commit_times(tmp, IDLE_PROBES)
            floor_run = measure_orders(tmp, e2e_pays, [e2e_case])
            e2e = floor_run.latencies["".join(e2e_case)]
            log(
                f"  round {r + 1}: bare {bare_n / bare['pipelined_s']:,.0f}/s, "
                f"cumulative {bare_n / cum['pipelined_s']:,.0f}/s, "
                f"SQLite commit p50 {percentile(commits, 50):.3f} ms, "
                f"after idle {percentile(idle, 50):.3f} ms, "
                f"end-to-end floor {percentile(e2e, 50) * 1e3:.3f} ms"
            )
            return {
                "bare": bare,
                "cum": cum,
                "commits": commits,
                "growing": growing,
                "idle": idle,
                "e2e": e2e,
                "e2e_cpu": floor_run.cpu_per_update["".join(e2e_case)],
            }

        def channel(r: int) -> dict[str, Any]:
            pipe = pair.phase("pipelined", n_pipe)
            lock = pair.phase("lockstep", n_lock)
            log(
                f"  round {r + 1}: channel {pipe['updates'] / pipe['seconds']:,.0f}/s, "
                f"lock-step p50 {percentile(lock['latencies'], 50) * 1000:.3f} ms"
            )
            return {"pipe": pipe, "lock": lock}

        try:
            for r in range(rounds):
                # Baseline and channel in turn, the first one first in odd rounds and
                # second in even ones: a machine that speeds up or slows down during the
                # run weighs on both sides of each ratio alike.
                if r % 2 == 0:
                    b, c = baseline(r), channel(r)
                else:
                    c, b = channel(r), baseline(r)
                per_round.append(b | c)
            n_all = min(rounds * n_pipe, ALL_AT_ONCE_MAX)
            all_at_once = pair.phase("all_at_once", n_all)
            final_version = pair.stop()
        finally:
            pair.kill()  # on an error, the children would otherwise wait for orders forever

    def pooled(phase: str) -> dict[str, Any]:
        """One phase's measurements over all rounds."""
        out: dict[str, Any] = {
            "updates": sum(x[phase]["updates"] for x in per_round),
            "seconds": sum(x[phase]["seconds"] for x in per_round),
        }
        for who in ("alice", "bob"):
            out[who] = {
                k: sum(x[phase][who][k] for x in per_round) for k in per_round[0][phase][who]
            }
        return out

    pipe, lock = pooled("pipe"), pooled("lock")
    rate_pipe = pipe["updates"] / pipe["seconds"]
    bare_secs = sum(x["bare"]["pipelined_s"] for x in per_round)
    bare_rate = rounds * bare_n / bare_secs
    bare_cum_rate = rounds * bare_n / sum(x["cum"]["pipelined_s"] for x in per_round)
    lat_ms = [t * 1000 for x in per_round for t in x["lock"]["latencies"]]
    bare_lat_ms = [t * 1000 for x in per_round for t in x["bare"]["lockstep"]]
    commit_ms = [t for x in per_round for t in x["commits"]]
    growing_ms = [t for x in per_round for t in x["growing"]]
    idle_ms = [t for x in per_round for t in x["idle"]]
    e2e_ms = [t * 1000 for x in per_round for t in x["e2e"]]

    # A durable lock-step update has three commits on its critical path (the proposer's
    # proposal, the responder's countersigned state, the proposer's completion), so it
    # cannot beat the bare baseline's round trip plus three bare SQLite commits.
    def floor(bare_lat: list[float], commits: list[float]) -> float:
        return percentile(bare_lat, 50) + 3 * percentile(commits, 50)

    def per_update(phase: dict[str, Any], key: str) -> float:
        return float(phase["alice"][key] + phase["bob"][key]) / int(phase["updates"])

    def share(phase: dict[str, Any], who: str, key: str) -> float:
        return float(phase[who][key]) / float(phase["seconds"])

    def cpu_us(phase: dict[str, Any], who: str) -> float:
        """CPU (user + system, all threads) of ``who`` per update of ``phase``, in us."""
        d = phase[who]
        return float(d["cpu_user_s"] + d["cpu_sys_s"]) * 1e6 / int(phase["updates"])

    rounds_out = []
    for x in per_round:
        ch_rate = x["pipe"]["updates"] / x["pipe"]["seconds"]
        b_rate = bare_n / x["bare"]["pipelined_s"]
        r_lat = [t * 1000 for t in x["lock"]["latencies"]]
        r_floor = floor([t * 1000 for t in x["bare"]["lockstep"]], x["commits"])
        r_idle_floor = floor([t * 1000 for t in x["bare"]["lockstep"]], x["idle"])
        r_e2e = percentile([t * 1000 for t in x["e2e"]], 50)
        r_cpu = {who: cpu_us(x["lock"], who) for who in ("alice", "bob")}
        r_floor_cpu = {who: v * 1e6 for who, v in x["e2e_cpu"].items()}
        rounds_out.append(
            {
                "updates_per_s_pipelined": round(ch_rate, 1),
                "bare_updates_per_s_pipelined": round(b_rate, 1),
                "ratio_pipelined_vs_bare": round(ch_rate / b_rate, 3),
                "ratio_pipelined_vs_bare_cumulative": round(
                    ch_rate / (bare_n / x["cum"]["pipelined_s"]), 3
                ),
                "fsyncs_per_update": round(per_update(x["pipe"], "commits"), 4),
                "cpu_ms_per_update_pipelined": {
                    who: round(
                        (x["pipe"][who]["cpu_user_s"] + x["pipe"][who]["cpu_sys_s"])
                        * 1000
                        / x["pipe"]["updates"],
                        4,
                    )
                    for who in ("alice", "bob")
                },
                "p50_ms_lockstep": round(percentile(r_lat, 50), 3),
                "lockstep_floor_ms": round(r_floor, 3),
                "ratio_p50_lockstep_vs_floor": round(percentile(r_lat, 50) / r_floor, 3),
                "lockstep_idle_floor_ms": round(r_idle_floor, 3),
                "lockstep_e2e_floor_ms": round(r_e2e, 3),
                "ratio_p50_lockstep_vs_e2e_floor": round(percentile(r_lat, 50) / r_e2e, 3),
                "ratio_p50_lockstep_vs_idle_floor": round(percentile(r_lat, 50) / r_idle_floor, 3),
                "cpu_us_per_update_lockstep": {k: round(v, 1) for k, v in r_cpu.items()},
                "lockstep_e2e_floor_cpu_us": {k: round(v, 1) for k, v in r_floor_cpu.items()},
                "ratio_cpu_lockstep_vs_e2e_floor": round(
                    sum(r_cpu.values()) / sum(r_floor_cpu.values()), 3
                ),
            }
        )

    def median_of(key: str) -> float:
        return round(statistics.median(x[key] for x in rounds_out), 3)

    bare_cpu = {
        who: sum(x["bare"]["cpu_s"][who] for x in per_round) for who in ("proposer", "responder")
    }
    result = {
        "benchmark": "updates",
        "quick": args.quick,
        "rounds": rounds,
        "updates_per_s_pipelined": round(rate_pipe, 1),
        "updates_per_s_pipelined_all_at_once": round(
            all_at_once["updates"] / all_at_once["seconds"], 1
        ),
        "all_at_once_updates": all_at_once["updates"],
        "all_at_once_error": all_at_once["error"],
        "pipelined_callers": 4 * args.window,
        "pipelined_peer_timeouts": sum(x["pipe"]["timeouts"] for x in per_round),
        "updates_per_s_lockstep": round(lock["updates"] / lock["seconds"], 1),
        "p50_ms_lockstep": round(percentile(lat_ms, 50), 3),
        "p99_ms_lockstep": round(percentile(lat_ms, 99), 3),
        "bare_updates_per_s_pipelined": round(bare_rate, 1),
        "ratio_pipelined_vs_bare": median_of("ratio_pipelined_vs_bare"),
        "bare_cumulative_updates_per_s_pipelined": round(bare_cum_rate, 1),
        "ratio_pipelined_vs_bare_cumulative": median_of("ratio_pipelined_vs_bare_cumulative"),
        "bare_updates_per_s_lockstep": round(len(bare_lat_ms) / (sum(bare_lat_ms) / 1000), 1),
        "bare_p50_ms_lockstep": round(percentile(bare_lat_ms, 50), 3),
        "bare_p99_ms_lockstep": round(percentile(bare_lat_ms, 99), 3),
        "sqlite_commit_ms": {
            "p50": round(percentile(commit_ms, 50), 3),
            "p99": round(percentile(commit_ms, 99), 3),
        },
        "sqlite_growing_commit_ms": {
            "p50": round(percentile(growing_ms, 50), 3),
            "p99": round(percentile(growing_ms, 99), 3),
        },
        "sqlite_idle_commit_ms": {
            "p50": round(percentile(idle_ms, 50), 3),
            "p99": round(percentile(idle_ms, 99), 3),
        },
        "lockstep_floor_ms": round(floor(bare_lat_ms, commit_ms), 3),
        "ratio_p50_lockstep_vs_floor": median_of("ratio_p50_lockstep_vs_floor"),
        "lockstep_idle_floor_ms": round(floor(bare_lat_ms, idle_ms), 3),
        "ratio_p50_lockstep_vs_idle_floor": median_of("ratio_p50_lockstep_vs_idle_floor"),
        "lockstep_e2e_floor_ms": round(percentile(e2e_ms, 50), 3),
        "ratio_p50_lockstep_vs_e2e_floor": median_of("ratio_p50_lockstep_vs_e2e_floor"),
        "cpu_us_per_update_lockstep": {
            who: round(cpu_us(lock, who), 1) for who in ("alice", "bob")
        },
        "lockstep_e2e_floor_cpu_us": {
            who: round(statistics.mean(x["e2e_cpu"][who] for x in per_round) * 1e6, 1)
            for who in ("proposer", "responder")
        },
        "ratio_cpu_lockstep_vs_e2e_floor": median_of("ratio_cpu_lockstep_vs_e2e_floor"),
        "per_round": rounds_out,
        "bare_cpu_ms_per_update_pipelined": {
            who: round(bare_cpu[who] * 1000 / (rounds * bare_n), 4)
            for who in ("proposer", "responder")
        },
        "fsyncs_per_update": round(per_update(pipe, "commits"), 4),
        "fsyncs_per_update_lockstep": round(per_update(lock, "commits"), 4),
        "store_ops_per_commit_pipelined": round(
            (pipe["alice"]["ops"] + pipe["bob"]["ops"])
            / max(1, pipe["alice"]["commits"] + pipe["bob"]["commits"]),
            2,
        ),
        "cpu_ms_per_update_pipelined": {
            who: round(
                (pipe[who]["cpu_user_s"] + pipe[who]["cpu_sys_s"]) * 1000 / pipe["updates"], 4
            )
            for who in ("alice", "bob")
        },
        "cpu_sys_ms_per_update_pipelined": {
            who: round(pipe[who]["cpu_sys_s"] * 1000 / pipe["updates"], 4)
            for who in ("alice", "bob")
        },
        "store_apply_wall_share_pipelined": {
            who: round(share(pipe, who, "apply_s"), 3) for who in ("alice", "bob")
        },
        "store_apply_ms_per_update_lockstep": {
            who: round(lock[who]["apply_s"] * 1000 / lock["updates"], 4) for who in ("alice", "bob")
        },
        "pipelined_updates": pipe["updates"],
        "lockstep_updates": rounds * n_lock,
        "window": args.window,
        "bare_window": bare_window,
        "ablations": ablations(),
        "final_version": final_version,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "busy_poll": busy_poll,
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
