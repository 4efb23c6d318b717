"""One client with 100 channels to 100 peers in a second process; JSON on the last line.

    .venv/bin/python benchmarks/many_channels.py [--quick] [--channels 100] [--profile DIR]

Process "peers" runs 100 real clients in one Trio run: 100 keys, 100 durable
SQLite stores (WAL, ``synchronous=FULL``) and 100 listening sockets.  Process
"maker" runs a single client (one key, one store) that connects to all 100
over BOLT 8, opens one channel with each, and then drives ``pay()`` on every
channel at once: ``--workers`` tasks per channel, each awaiting its pays in
turn (so at most channels x workers updates are in flight).  Only the maker
proposes.  ``aggregate_updates_per_s`` is all co-signed durable updates over
the wall time of that phase.

Note the asymmetry this implies: the maker's one store group-commits the
updates of all channels together, while on the other side each of the 100
clients has its own store, so each commits (and fsyncs) on its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from contextlib import AsyncExitStack
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
    add_client_options,
    apply_client_options,
    client_options,
    delta,
    finish_pair,
    log,
    machine_info,
    run_trio,
)

ETH = BALANCES[0][0]


def peers_main(
    secrets: list[bytes], store_dir: str, parent: Any, ctl: Any, profile: str | None
) -> None:
    """Serve ``len(secrets)`` clients in one Trio run until told to stop."""
    import trio

    from channel.client import open_client
    from channel.keys import Signer

    counter = StoreCounter()
    counter.install()
    prof = Profiler(profile)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            clients = []
            for i, secret in enumerate(secrets):
                clients.append(
                    await stack.enter_async_context(
                        open_client(
                            Signer.from_bytes(secret),
                            Path(store_dir) / f"peer{i}.sqlite",
                            **client_options(),
                        )
                    )
                )
            parent.send([str(c.peer_address()) for c in clients])
            while True:
                cmd = await trio.to_thread.run_sync(ctl.recv)
                if cmd == "prof_on":
                    prof.on()
                elif cmd == "prof_off":
                    prof.off()
                ctl.send(counter.snapshot())
                if cmd == "stop":
                    break

    run_trio(main)
    prof.dump()


def maker_main(
    secret: bytes,
    store_dir: str,
    addresses: list[str],
    per_worker: int,
    workers: int,
    parent: Any,
    ctl: Any,
    profile: str | None,
) -> None:
    import trio

    from channel.client import open_client
    from channel.keys import Signer
    from channel.transport import PeerAddress

    counter = StoreCounter()
    counter.install()
    prof = Profiler(profile)

    def snap_both() -> tuple[dict[str, float], dict[str, float]]:
        ctl.send("snap")
        return counter.snapshot(), ctl.recv()

    async def main() -> dict[str, Any]:
        async with open_client(
            Signer.from_bytes(secret), Path(store_dir) / "maker.sqlite", **client_options()
        ) as mm:
            cids: list[bytes] = []
            t0 = time.perf_counter()

            async def open_one(addr: str) -> None:
                cids.append(
                    await mm.open_channel(
                        PeerAddress.parse(addr),
                        chain_id=CHAIN_ID,
                        adjudicator=ADJUDICATOR,
                        challenge_duration=3600,
                        balances=BALANCES,
                    )
                )

            limiter = trio.CapacityLimiter(20)

            async def open_limited(addr: str) -> None:
                async with limiter:
                    await open_one(addr)

            async with trio.open_nursery() as nursery:
                for addr in addresses:
                    nursery.start_soon(open_limited, addr)
            log(f"  {len(cids)} channels open in {time.perf_counter() - t0:.2f}s")

            async def run(n_per_worker: int) -> float:
                async def worker(cid: bytes) -> None:
                    for _ in range(n_per_worker):
                        await mm.pay(cid, ETH, 1)

                t = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for cid in cids:
                        for _ in range(workers):
                            nursery.start_soon(worker, cid)
                return time.perf_counter() - t

            warm = max(1, 2000 // (workers * len(cids)))
            await run(warm)
            log(f"  warm-up: {warm * workers * len(cids)} pays")

            ctl.send("prof_on")
            ctl.recv()
            prof.on()
            a0, b0 = snap_both()
            secs = await run(per_worker)
            a1, b1 = snap_both()
            prof.off()
            ctl.send("prof_off")
            ctl.recv()
            versions = []
            for cid in cids:
                latest = mm.latest(cid)
                assert latest is not None and latest.fully_signed
                versions.append(latest.state.version)
            return {
                "channels": len(cids),
                "updates": per_worker * workers * len(cids),
                "seconds": secs,
                "maker": delta(a1, a0),
                "peers": delta(b1, b0),
                "min_version": min(versions),
            }

    result = run_trio(main)
    ctl.send("stop")
    ctl.recv()
    prof.dump()
    parent.send(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 60 s)")
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--workers", type=int, default=16, help="concurrent pay tasks per channel")
    ap.add_argument(
        "--updates", type=int, help="total updates (default 40000, quick 10000), rounded"
    )
    ap.add_argument("--profile", metavar="DIR", help="write cProfile stats of both processes")
    add_client_options(ap)
    args = ap.parse_args()
    busy_poll = apply_client_options(args)
    total = args.updates or (10000 if args.quick else 40000)
    per_worker = max(1, round(total / (args.channels * args.workers)))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    from channel.keys import Signer

    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    maker_key = Signer.generate()
    peer_keys = [Signer.generate() for _ in range(args.channels)]
    prof = (lambda who: str(Path(args.profile) / f"{who}.prof")) if args.profile else None
    with tempfile.TemporaryDirectory(prefix="optichannel-many-") as tmp:
        p_parent, p_child = ctx.Pipe()
        m_parent, m_child = ctx.Pipe()
        ctl_maker, ctl_peers = ctx.Pipe()
        peers = ctx.Process(
            target=peers_main,
            args=(
                [k.secret_bytes() for k in peer_keys],
                tmp,
                p_child,
                ctl_peers,
                prof and prof("peers"),
            ),
        )
        peers.start()
        if not p_parent.poll(60):
            raise RuntimeError("the peers process did not start")
        addresses = p_parent.recv()
        log(f"{len(addresses)} peer clients listening; maker opens one channel to each")
        maker = ctx.Process(
            target=maker_main,
            args=(
                maker_key.secret_bytes(),
                tmp,
                addresses,
                per_worker,
                args.workers,
                m_child,
                ctl_maker,
                prof and prof("maker"),
            ),
        )
        maker.start()
        r: dict[str, Any] = finish_pair(m_parent, maker, peers, 600, "the maker")

    rate = r["updates"] / r["seconds"]
    log(f"  {r['updates']} pays, {r['channels']} channels: {r['seconds']:.2f}s = {rate:,.0f}/s")
    m, pe = r["maker"], r["peers"]
    result = {
        "benchmark": "many_channels",
        "quick": args.quick,
        "aggregate_updates_per_s": round(rate, 1),
        "channels": r["channels"],
        "updates": r["updates"],
        "workers_per_channel": args.workers,
        "seconds": round(r["seconds"], 3),
        "fsyncs_per_update": {
            "maker": round(m["commits"] / r["updates"], 4),
            "peers": round(pe["commits"] / r["updates"], 4),
        },
        "cpu_ms_per_update": {
            "maker": round((m["cpu_user_s"] + m["cpu_sys_s"]) * 1000 / r["updates"], 4),
            "peers": round((pe["cpu_user_s"] + pe["cpu_sys_s"]) * 1000 / r["updates"], 4),
        },
        "store_apply_s": {"maker": round(m["apply_s"], 3), "peers": round(pe["apply_s"], 3)},
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "busy_poll": busy_poll,
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
