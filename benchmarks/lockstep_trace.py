"""Where one lock-step update's time goes, hop by hop; JSON on the last line.

    .venv/bin/python benchmarks/lockstep_trace.py [--quick] [--pays N]

Two spawned children run the real ``open_client`` (as in ``updates.py``); alice pays
bob N times, one at a time.  Inside both children a few methods are wrapped to stamp
``time.perf_counter_ns()`` (CLOCK_MONOTONIC: one clock for both processes) on entry
and exit: ``Client.pay``, ``Outbox.emit``, ``Store.prepare``, ``Store.commit`` (and the
``COMMIT`` statement in it), ``Connection.send_many`` / ``send_now`` / ``receive`` and the handling
of each received frame.  The stamps of both processes are merged in time order and
cut into pays; the JSON gives, for every pair of consecutive stamps seen in most
pays, the median and p99 in microseconds, plus the median and p99 of a whole pay.
The wrappers cost a few microseconds per hop: read the hops, not the total, from here
(``updates.py`` gives the lock-step latency).  Each stamp also records the CPU time of
the thread that made it (``time.thread_time_ns``, user and system), so a hop between two
stamps of one party has a ``cpu_p50_us`` too: equal to its wall time where that party
computes, less where it waits (an fsync, the peer), and what waiting itself costs (the
scheduler, the wake-up) where it does.  ``waits`` gives the same for each party's hops
over the other's stamps (it waited meanwhile: how long, and what the waiting cost its
CPU), and ``cpu_us_per_pay`` the median CPU of each party's thread from its first stamp
in a pay to its last.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    ADJUDICATOR,
    BALANCES,
    CHAIN_ID,
    add_client_options,
    apply_client_options,
    client_options,
    finish_pair,
    log,
    machine_info,
    percentile,
    run_trio,
    wait_result,
)

ETH = BALANCES[0][0]
WARMUP = 300

#: (tag, time.perf_counter_ns(), time.thread_time_ns() of the stamping thread)
Stamps = list[tuple[str, int, int]]


def install_stamps(who: str, stamps: Stamps) -> None:
    """Wrap the hops of the client so that each entry and exit is stamped."""
    import sqlite3

    from channel import client, inbound, outbox, store, transport

    def mark(tag: str) -> None:
        stamps.append((f"{who}.{tag}", time.perf_counter_ns(), time.thread_time_ns()))

    def wrap(cls: type, name: str, tag: str) -> None:
        fn = getattr(cls, name)
        if inspect.iscoroutinefunction(fn):

            async def awrapped(*a: Any, **k: Any) -> Any:
                mark(tag + ">")
                try:
                    return await fn(*a, **k)
                finally:
                    mark(tag + "<")

            setattr(cls, name, awrapped)
        else:

            def wrapped(*a: Any, **k: Any) -> Any:
                mark(tag + ">")
                try:
                    return fn(*a, **k)
                finally:
                    mark(tag + "<")

            setattr(cls, name, wrapped)

    wrap(client.Client, "pay", "pay")
    wrap(outbox.Outbox, "emit", "emit")
    wrap(store.Store, "prepare", "prepare")
    wrap(transport.Connection, "send_many", "send")
    wrap(transport.Connection, "send_now", "send")
    wrap(transport.Connection, "receive", "receive")
    wrap(inbound.Inbound, "on_frame", "frame")

    def commit(self: store.Store, plan: Any) -> None:
        db: sqlite3.Connection = self._db
        mark("begin")
        db.execute("BEGIN IMMEDIATE")
        for step in plan.steps:
            step(db)
        mark("COMMIT>")
        db.execute("COMMIT")
        mark("COMMIT<")

    store.Store.commit = commit  # type: ignore[method-assign]


def bob_main(secret: bytes, store_dir: str, parent: Any, ctl: Any) -> None:
    import trio

    from channel.client import open_client
    from channel.keys import Signer

    stamps: Stamps = []
    install_stamps("B", stamps)

    async def main() -> None:
        async with open_client(
            Signer.from_bytes(secret), Path(store_dir) / "bob.sqlite", **client_options()
        ) as bob:
            parent.send(str(bob.peer_address()))
            while (cmd := await trio.to_thread.run_sync(ctl.recv)) != "stop":
                if cmd == "clear":
                    stamps.clear()
                ctl.send("ok")

    run_trio(main)
    ctl.send(stamps)


def alice_main(secret: bytes, store_dir: str, bob_addr: str, n: int, parent: Any, ctl: Any) -> None:
    from channel.client import open_client
    from channel.keys import Signer
    from channel.transport import PeerAddress

    stamps: Stamps = []
    install_stamps("A", stamps)

    async def main() -> Stamps:
        async with open_client(
            Signer.from_bytes(secret), Path(store_dir) / "alice.sqlite", **client_options()
        ) as alice:
            cid = await alice.open_channel(
                PeerAddress.parse(bob_addr),
                chain_id=CHAIN_ID,
                adjudicator=ADJUDICATOR,
                challenge_duration=3600,
                balances=BALANCES,
            )
            for _ in range(WARMUP):
                await alice.pay(cid, ETH, 1)
            ctl.send("clear")
            ctl.recv()
            stamps.clear()
            for _ in range(n):
                await alice.pay(cid, ETH, 1)
            return list(stamps)

    result = run_trio(main)
    ctl.send("stop")
    parent.send((result, ctl.recv()))


def analyse(a: Stamps, b: Stamps) -> dict[str, Any]:
    """Cut the merged stamps into pays and summarise each hop between two stamps."""
    events = sorted(a + b, key=lambda e: e[1])
    pays: list[Stamps] = []
    current: Stamps | None = None
    for tag, t, used in events:
        if tag == "A.pay>":
            current = [(tag, t, used)]
            pays.append(current)
        elif current is not None:
            current.append((tag, t, used))
            if tag == "A.pay<":
                current = None
    pays = [p for p in pays if p[-1][0] == "A.pay<"]
    hops: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)  # hops within one party only
    # A party's hops over the other's stamps: it waited meanwhile (wall, CPU).
    waits: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    per_pay_cpu: dict[str, list[float]] = {"A": [], "B": []}
    totals = []
    for p in pays:
        totals.append((p[-1][1] - p[0][1]) / 1e3)
        for (t1, s1, c1), (t2, s2, c2) in itertools.pairwise(p):
            hops[f"{t1} -> {t2}"].append((s2 - s1) / 1e3)
            if t1[0] == t2[0]:
                cpu[f"{t1} -> {t2}"].append((c2 - c1) / 1e3)
        for who in "AB":
            own = [(i, e) for i, e in enumerate(p) if e[0][0] == who]
            if own:
                per_pay_cpu[who].append((own[-1][1][2] - own[0][1][2]) / 1e3)
            for (i1, (t1, s1, c1)), (i2, (t2, s2, c2)) in itertools.pairwise(own):
                if i2 > i1 + 1:
                    w = waits[f"{t1} -> {t2}"]
                    w[0].append((s2 - s1) / 1e3)
                    w[1].append((c2 - c1) / 1e3)
    common = {k: v for k, v in hops.items() if len(v) >= len(pays) // 2}
    ordered = sorted(common.items(), key=lambda kv: -percentile(kv[1], 50) * len(kv[1]))
    return {
        "pays": len(pays),
        "p50_us_pay": round(percentile(totals, 50), 1),
        "p99_us_pay": round(percentile(totals, 99), 1),
        "tail": _tail(pays, totals, hops),
        "cpu_us_per_pay": {who: round(percentile(v, 50), 1) for who, v in per_pay_cpu.items() if v},
        "waits": {
            k: {
                "seen_in": len(w),
                "p50_us": round(percentile(w, 50), 1),
                "cpu_p50_us": round(percentile(c, 50), 1),
            }
            for k, (w, c) in waits.items()
            if len(w) >= len(pays) // 2
        },
        "hops": {
            k: {
                "seen_in": len(v),
                "p50_us": round(percentile(v, 50), 1),
                "p99_us": round(percentile(v, 99), 1),
                **({"cpu_p50_us": round(percentile(cpu[k], 50), 1)} if k in cpu else {}),
            }
            for k, v in ordered
        },
    }


def _tail(pays: list[Stamps], totals: list[float], hops: dict[str, list[float]]) -> dict[str, Any]:
    """Where the slowest 1% of pays lost their time: for each hop, the time it took in
    those pays beyond its own median (when over 100 us), summed, and in how many."""
    cut = percentile(totals, 99)
    medians = {k: percentile(v, 50) for k, v in hops.items()}
    excess: dict[str, float] = defaultdict(float)
    slow_in: dict[str, int] = defaultdict(int)
    slow = [p for p, total in zip(pays, totals, strict=True) if total >= cut]
    for p in slow:
        for (t1, s1, _), (t2, s2, _) in itertools.pairwise(p):
            k = f"{t1} -> {t2}"
            extra = (s2 - s1) / 1e3 - medians[k]
            if extra > 100:
                excess[k] += extra
                slow_in[k] += 1
    top = sorted(excess.items(), key=lambda kv: -kv[1])[:6]
    return {
        "pays": len(slow),
        "hops_beyond_median_us": {k: {"total": round(v), "slow_in": slow_in[k]} for k, v in top},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pays", type=int, help="lock-step pays traced (default 2000, quick 500)")
    ap.add_argument("--quick", action="store_true", help="smaller run (a few seconds)")
    add_client_options(ap)
    args = ap.parse_args()
    busy_poll = apply_client_options(args)
    args.pays = args.pays or (500 if args.quick else 2000)
    from channel.keys import Signer

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        a, b = Signer.generate(), Signer.generate()
        b_parent, b_child = ctx.Pipe()
        a_parent, a_child = ctx.Pipe()
        ctl_a, ctl_b = ctx.Pipe()
        bob = ctx.Process(target=bob_main, args=(b.secret_bytes(), d, b_child, ctl_b))
        bob.start()
        addr = wait_result(b_parent, bob, 60, "bob")
        alice = ctx.Process(
            target=alice_main, args=(a.secret_bytes(), d, addr, args.pays, a_child, ctl_a)
        )
        alice.start()
        log(f"tracing {args.pays} lock-step pays")
        stamps_a, stamps_b = finish_pair(a_parent, alice, bob, 600, "alice")
    result = {"benchmark": "lockstep_trace", "quick": args.quick, **analyse(stamps_a, stamps_b)}
    result["busy_poll"] = busy_poll
    result["machine"] = machine_info()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
