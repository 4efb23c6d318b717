"""Shared helpers for the channel benchmarks (not a benchmark itself).

Progress goes to stderr; each benchmark prints exactly one JSON object as the
last line of stdout.  Instrumentation here wraps real components in the
benchmark's own child processes only; nothing in ``channel/`` is changed.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKEN = bytes.fromhex("00000000000000000000000000000000000000a1")
ADJUDICATOR = bytes.fromhex("00000000000000000000000000000000000000ad")
CHAIN_ID = 31337
#: The same two-asset state as the demo: (asset, ours, theirs).
BALANCES = [
    (b"\x00" * 20, 10**18, 10**18),
    (TOKEN, 5_000_000, 5_000_000),
]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        # Other work on the machine skews every figure: recorded so runs can be compared.
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class StoreCounter:
    """Counts store commits (one SQLite transaction = one WAL fsync with
    ``synchronous=FULL``), the ops they carry and the wall time spent committing."""

    def __init__(self) -> None:
        self.commits = 0
        self.ops = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def install(self) -> None:
        from channel.store import Store

        prepare, commit = Store.prepare, Store.commit
        counter = self

        def counting_prepare(store: Store, ops: Any) -> Any:
            with counter._lock:
                counter.ops += len(ops)
            return prepare(store, ops)

        def timed_commit(store: Store, plan: Any) -> None:
            t0 = time.perf_counter()
            try:
                commit(store, plan)
            finally:
                dt = time.perf_counter() - t0
                if plan.steps:
                    with counter._lock:
                        counter.commits += 1
                        counter.seconds += dt

        Store.prepare = counting_prepare  # type: ignore[method-assign]
        Store.commit = timed_commit  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with self._lock:
            return {
                "commits": self.commits,
                "ops": self.ops,
                "apply_s": self.seconds,
                "cpu_user_s": ru.ru_utime,
                "cpu_sys_s": ru.ru_stime,
                "wall_s": time.perf_counter(),
            }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


class Profiler:
    """cProfile of the Trio thread, toggled around the measured phases."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.prof = cProfile.Profile() if path else None

    def on(self) -> None:
        if self.prof is not None:
            self.prof.enable()

    def off(self) -> None:
        if self.prof is not None:
            self.prof.disable()

    def dump(self) -> None:
        if self.prof is not None and self.path:
            self.prof.dump_stats(self.path)
            with open(self.path + ".txt", "w") as f:
                st = pstats.Stats(self.prof, stream=f)
                st.sort_stats("tottime").print_stats(45)
                st.sort_stats("cumulative").print_stats(60)


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    import trio

    return trio.run(fn, *args)


def finish_pair(conn: Any, main: Any, other: Any, timeout: float, what: str) -> Any:
    """The result ``main`` reports on ``conn``; then both children must exit cleanly.

    If ``main`` fails to report, ``other`` is terminated and the error propagates."""
    try:
        result = wait_result(conn, main, timeout, what)
    except BaseException:
        other.terminate()
        raise
    main.join(30)
    other.join(30)
    for p in (main, other):
        if p.exitcode != 0:
            raise RuntimeError(f"child exited with {p.exitcode}")
    return result


def wait_result(conn: Any, proc: Any, timeout: float, what: str) -> Any:
    """Receive from ``conn``; fail fast if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(f"{what} exited with code {proc.exitcode} before reporting")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"{what} did not report within {timeout}s")
    return conn.recv()


def install_receive_yield_experiment() -> None:
    """EXPERIMENT (off unless ``OPTICHANNEL_BENCH_RECV_YIELD=K`` is set): make
    ``Connection.receive`` yield to the scheduler before every K-th message, so a
    client's flusher can commit and send the first K answers of a burst while the
    reader is still verifying the rest.  Tests a recommended change to
    ``Client._reader`` without editing ``channel/``; never on by default."""
    import os

    every = int(os.environ.get("OPTICHANNEL_BENCH_RECV_YIELD", "0"))
    if every <= 0:
        return
    import trio.lowlevel

    from channel.transport import Connection

    original = Connection.receive
    count = 0

    async def receive(self: Connection) -> bytes:
        nonlocal count
        count += 1
        if count % every == 0:
            await trio.lowlevel.checkpoint()
        return await original(self)

    Connection.receive = receive  # type: ignore[method-assign]
    log(f"  EXPERIMENT: receive yields every {every} messages")
