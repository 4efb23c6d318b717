"""The lock-step floor of two signing orders, measured; JSON on the last line.

    .venv/bin/python benchmarks/lockstep_orders.py [--quick] [--pays N]

Two spawned processes over plain loopback TCP and no client code: each update is
built, hashed (EIP-712), signed and checked with ``channel.state``/``eip712``/``keys``
as the client does, encoded with cbor2, and every durable point is a real SQLite commit
(WAL, ``synchronous=FULL``, warm WAL) of the state and its signatures in that party's
own file.  So each figure is what no implementation of that order can beat on this
machine, the way ``updates.py``'s ``lockstep_floor_ms`` is, but measured end to end
instead of added up.

``proposer_first`` (DESIGN §4, what the client does)
    The proposer signs and commits before its proposal leaves; the responder verifies,
    signs, commits and answers; the proposer verifies and commits the countersignature.
    Three commits in sequence.
``responder_first``
    The proposal leaves unsigned; the responder signs, commits and answers; the proposer
    verifies, signs and commits, and the update is done: co-signed and durable at the
    proposer.  Its signature then goes to the responder (``Confirm``), who commits it
    with its next commit, or alone once its socket has been idle for 1 ms.  Two commits
    in sequence.

Both keep the rule that no signature leaves a process before the state it signs is
durable there.  Each order runs twice: blocking, as the client does by default, and with
busy polling (``<order>_polling_*``, the client with ``busy_poll=BUSY_POLL``; see
``channel.busypoll``: after each send, the loop polls its socket instead of blocking).
The orders and modes alternate in rounds in the same pair of processes.  Each party
checkpoints its WAL inline every 300 rows (a few ms): p99 shows those stalls,
which the client takes off the commit path; p50 and p90 are the floors.  ``<case>_cpu_us``
is each party's CPU (user + system) per update in that case, its waiting included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    ADJUDICATOR,
    BALANCES,
    CHAIN_ID,
    cpu_seconds,
    length_frame,
    log,
    machine_info,
    percentile,
    probe_commit,
    probe_db,
    run_trio,
    split_frames,
    sqlite_commit_times,
    wait_result,
)

from channel import busypoll
from channel.limits import BUSY_POLL

ORDERS = ("proposer_first", "responder_first")
#: Busy polling after each send (seconds; 0 blocks): off (the client's default), and on.
MODES = {"": 0.0, "_polling": BUSY_POLL}
ROUNDS = 4
#: Confirms the responder holds back waits at most this long for a commit to join.
CONFIRM_IDLE_S = 0.001
CHECKPOINT_EVERY = 300


class _Party:
    """One side's signer, durable file and socket reader."""

    def __init__(self, secret: bytes, path: str) -> None:
        from channel.keys import Signer

        self.signer = Signer.from_bytes(secret)
        self.db, self.key = probe_db(path, warm=True)
        self.rows = 0
        self.buf = bytearray()
        self.frames: list[bytes] = []
        self.poll = 0.0  # busy polling after each send (seconds)

    async def send(self, stream: Any, msg: list[Any]) -> None:
        import cbor2

        await stream.send_all(length_frame(cbor2.dumps(msg)))
        busypoll.extend(self.poll)

    def commit(self, *bodies: bytes) -> None:
        probe_commit(self.db, self.key, self.rows + 1, *bodies)
        self.rows += len(bodies)
        if self.rows % CHECKPOINT_EVERY < len(bodies):
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def receive(self, stream: Any, idle: float | None = None) -> list[Any] | None:
        """The next message, or None if the socket stayed ``idle`` seconds without data
        first, or the peer closed."""
        import cbor2
        import trio

        while not self.frames:
            data = b""
            with trio.move_on_after(float("inf") if idle is None else idle):
                data = await stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
            self.frames = split_frames(self.buf)
        msg: list[Any] = cbor2.loads(self.frames.pop(0))
        return msg


def responder_main(secret: bytes, proposer: bytes, path: str, parent: Any) -> None:
    import cbor2
    import trio

    from channel import codec
    from channel.eip712 import state_digest
    from channel.keys import recover

    me = _Party(secret, path)
    cpu: dict[str, float] = {}  # CPU seconds spent during each case's measured updates

    async def handle(stream: trio.SocketStream) -> None:
        params = None
        case, since = "", 0.0
        held: list[bytes] = []  # confirmed states waiting to join a commit
        digests: dict[int, tuple[bytes, bytes]] = {}
        while True:
            msg = await me.receive(stream, CONFIRM_IDLE_S if held else None)
            if msg is None:
                if not held:
                    parent.send(cpu)
                    return
                me.commit(*held)
                held = []
                continue
            kind = msg[0]
            if kind == "params":
                params = codec.params_from_wire(msg[1])
                continue
            if kind == "mode":
                if case:
                    cpu[case] = cpu.get(case, 0.0) + cpu_seconds() - since
                me.poll, case, since = msg[1], msg[2], cpu_seconds()
                continue
            assert params is not None
            if kind == "P":
                _, v, wire, sig = msg
                state = codec.state_from_wire(wire)
                digest = state_digest(params, state)
                blob = cbor2.dumps(wire, canonical=True)
                if sig is not None and recover(digest, sig) != proposer:
                    raise RuntimeError("bad proposal signature")
                mine = me.signer.sign(digest)
                me.commit(*held, blob + (sig or b"") + mine)
                held = []
                digests[v] = (digest, blob + mine)
                await me.send(stream, ["A", v, mine])
            elif kind == "C":
                _, v, sig = msg
                digest, row = digests.pop(v)
                if recover(digest, sig) != proposer:
                    raise RuntimeError("bad confirm signature")
                held.append(row + sig)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handle, 0)
            parent.send(listeners[0].socket.getsockname()[1])

    run_trio(main)


def proposer_main(
    secret: bytes,
    responder: bytes,
    path: str,
    port: int,
    pays: int,
    cases: list[tuple[str, str]],
    parent: Any,
) -> None:
    import cbor2
    import trio

    from channel import codec
    from channel.eip712 import state_digest
    from channel.keys import recover
    from channel.state import Allocation, Params, State

    me = _Party(secret, path)
    params = Params.new(
        chain_id=CHAIN_ID,
        adjudicator=ADJUDICATOR,
        participants=(me.signer.address, responder),
        challenge_duration=3600,
    )
    state0 = State.initial(params, BALANCES)
    version = 0

    def next_state() -> State:
        nonlocal version
        version += 1
        a0 = state0.allocations[0]
        moved = Allocation(
            asset=a0.asset, balances=(a0.balances[0] - version, a0.balances[1] + version)
        )
        return State(
            channel_id=params.channel_id,
            version=version,
            allocations=(moved, *state0.allocations[1:]),
        )

    async def accept(stream: trio.SocketStream, v: int, digest: bytes) -> bytes:
        msg = await me.receive(stream)
        assert msg is not None and msg[0] == "A" and msg[1] == v
        if recover(digest, msg[2]) != responder:
            raise RuntimeError("bad countersignature")
        sig: bytes = msg[2]
        return sig

    async def proposer_first(stream: trio.SocketStream) -> float:
        t = time.perf_counter()
        state = next_state()
        wire = codec.state_to_wire(state)
        digest = state_digest(params, state)
        sig = me.signer.sign(digest)
        blob = cbor2.dumps(wire, canonical=True)
        me.commit(blob + sig)
        await me.send(stream, ["P", state.version, wire, sig])
        theirs = await accept(stream, state.version, digest)
        me.commit(blob + sig + theirs)
        return time.perf_counter() - t

    async def responder_first(stream: trio.SocketStream) -> float:
        t = time.perf_counter()
        state = next_state()
        wire = codec.state_to_wire(state)
        digest = state_digest(params, state)
        await me.send(stream, ["P", state.version, wire, None])
        blob = cbor2.dumps(wire, canonical=True)
        theirs = await accept(stream, state.version, digest)
        sig = me.signer.sign(digest)
        me.commit(blob + theirs + sig)
        done = time.perf_counter() - t
        await me.send(stream, ["C", state.version, sig])
        return done

    async def main() -> tuple[dict[str, list[float]], dict[str, float]]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(length_frame(cbor2.dumps(["params", codec.params_to_wire(params)])))
        runs = {"proposer_first": proposer_first, "responder_first": responder_first}
        lat: dict[str, list[float]] = {o + m: [] for o, m in cases}
        cpu: dict[str, float] = {o + m: 0.0 for o, m in cases}

        async def mode(m: str, case: str) -> None:
            """Switch to mode ``m``; the responder counts its CPU towards ``case`` (a
            measured case, or "" for the warm-up and the end)."""
            me.poll = MODES[m]
            await me.send(stream, ["mode", MODES[m], case])

        for o, m in cases:  # warm-up
            await mode(m, "")
            for _ in range(100):
                await runs[o](stream)
        for r in range(ROUNDS):
            for o, m in cases if r % 2 == 0 else cases[::-1]:
                await mode(m, o + m)
                c0 = cpu_seconds()
                for _ in range(pays // ROUNDS):
                    lat[o + m].append(await runs[o](stream))
                cpu[o + m] += cpu_seconds() - c0
        await mode("", "")
        await stream.aclose()
        return lat, cpu

    parent.send(run_trio(main))


class Measured(NamedTuple):
    """Per case (``order + mode``): each update's latency (s), and the CPU seconds
    (user + system, waiting included) per update of each party over those updates."""

    latencies: dict[str, list[float]]
    cpu_per_update: dict[str, dict[str, float]]


def measure(directory: str, pays: int, cases: list[tuple[str, str]] | None = None) -> Measured:
    """Measure ``pays`` lock-step updates for each ``(order, mode)`` case (all of
    ``ORDERS`` x ``MODES`` by default) in a fresh pair of processes whose stores live
    in ``directory``."""
    from channel.keys import Signer

    cases = cases or [(o, m) for o in ORDERS for m in MODES]
    ctx = mp.get_context("spawn")
    a, b = Signer.generate(), Signer.generate()
    tag = time.monotonic_ns()
    r_parent, r_child = ctx.Pipe()
    p_parent, p_child = ctx.Pipe()
    resp = ctx.Process(
        target=responder_main,
        args=(b.secret_bytes(), a.address, os.path.join(directory, f"r{tag}.sqlite"), r_child),
    )
    resp.start()
    prop: Any = None
    try:
        port = wait_result(r_parent, resp, 30, "responder")
        prop = ctx.Process(
            target=proposer_main,
            args=(
                a.secret_bytes(),
                b.address,
                os.path.join(directory, f"p{tag}.sqlite"),
                port,
                pays,
                cases,
                p_child,
            ),
        )
        prop.start()
        lat, cpu = wait_result(p_parent, prop, 600, "proposer")
        theirs = wait_result(r_parent, resp, 30, "responder")
        return Measured(
            lat,
            {
                case: {"proposer": cpu[case] / len(v), "responder": theirs[case] / len(v)}
                for case, v in lat.items()
            },
        )
    finally:
        for p in (prop, resp):
            if p is not None and p.is_alive():
                p.terminate()
                p.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s)")
    ap.add_argument("--pays", type=int, help="lock-step updates per order (default 4000)")
    args = ap.parse_args()
    pays = args.pays or (1000 if args.quick else 4000)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optichannel-orders-") as tmp:
        log(f"lock-step, {pays} updates per order, in {ROUNDS} alternating rounds")
        lat, cpu = measure(tmp, pays)
        commits = sqlite_commit_times(tmp, 300)
    out: dict[str, Any] = {
        "benchmark": "lockstep_orders",
        "quick": args.quick,
        "pays": pays,
        "busy_poll_polling": BUSY_POLL,
    }
    for o in lat:
        ms = [x * 1000 for x in lat[o]]
        out[f"{o}_p50_ms"] = round(percentile(ms, 50), 3)
        out[f"{o}_p90_ms"] = round(percentile(ms, 90), 3)
        out[f"{o}_p99_ms"] = round(percentile(ms, 99), 3)
        out[f"{o}_cpu_us"] = {who: round(x * 1e6, 1) for who, x in cpu[o].items()}
        log(f"  {o}: p50 {out[f'{o}_p50_ms']} ms, p90 {out[f'{o}_p90_ms']} ms")
    out["sqlite_commit_ms"] = round(percentile(commits, 50), 3)
    out["seconds_total"] = round(time.perf_counter() - t0, 1)
    out["machine"] = machine_info()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
