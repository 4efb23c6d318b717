"""Shared helpers for the channel benchmarks (not a benchmark itself).

Progress goes to stderr; each benchmark prints exactly one JSON object as the
last line of stdout.  Instrumentation here wraps real components in the
benchmark's own child processes only; nothing in ``channel/`` is changed.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import resource
import struct
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
        # These machines are shared VMs whose speed drifts by half or more over an hour:
        # a sign here took 27 us when DESIGN §8 was measured; scale by this to compare.
        "sign_us_at_end": sign_us(),
        # How long an idle vCPU of a KVM guest polls before it halts (cpuidle-haltpoll);
        # None where there is no such knob.  It moves the lock-step figures (README).
        "guest_halt_poll_ns": _read_int("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    }


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def sign_us(rounds: int = 5, signs: int = 200) -> float:
    """The median time of one secp256k1 sign (``channel.keys``) over ``rounds`` rounds,
    in microseconds: how fast this machine is right now."""
    from channel.keys import Signer

    signer, digest = Signer.generate(), bytes(range(32))
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(signs):
            signer.sign(digest)
        per_round.append((time.perf_counter() - t) / signs * 1e6)
    return round(percentile(per_round, 50), 1)


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


def client_options() -> dict[str, Any]:
    """Keyword arguments for every ``open_client`` of a benchmark's children: the
    defaults, unless ``--busy-poll S`` (``add_client_options``) set
    ``OPTICHANNEL_BENCH_BUSY_POLL`` for an A/B run in one command."""
    value = os.environ.get("OPTICHANNEL_BENCH_BUSY_POLL")
    return {} if value is None else {"busy_poll": float(value)}


def busy_poll_seconds() -> float:
    """The busy polling the children's clients use: the bare baselines poll as long (after
    each send), so that a lock-step ratio compares like with like."""
    return float(client_options().get("busy_poll", 0.0))


def add_client_options(ap: Any) -> None:
    """``--busy-poll S``: the children's clients poll S seconds after sending (0: off)."""
    ap.add_argument(
        "--busy-poll",
        type=float,
        metavar="S",
        help="open_client(busy_poll=S) in the children (default: the client's, off)",
    )


def apply_client_options(args: Any) -> float:
    """Pass ``--busy-poll`` on to the spawned children; the value their clients use."""
    if args.busy_poll is not None:
        os.environ["OPTICHANNEL_BENCH_BUSY_POLL"] = repr(args.busy_poll)
        return float(args.busy_poll)
    return 0.0


#: What ``OPTICHANNEL_BENCH_ABLATE`` can switch off in the channel benchmark's children.
ABLATIONS = ("crypto", "store")


def ablations() -> list[str]:
    """The ablations asked for in ``OPTICHANNEL_BENCH_ABLATE`` (comma-separated)."""
    import os

    asked = [a for a in os.environ.get("OPTICHANNEL_BENCH_ABLATE", "").split(",") if a]
    unknown = set(asked) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; known: {ABLATIONS}")
    return asked


def install_ablations() -> None:
    """EXPERIMENT (off unless ``OPTICHANNEL_BENCH_ABLATE`` is set): measure what the
    client costs without a part, inside the benchmark's own children only.

    * ``crypto``: signing returns the signer's address padded to 65 bytes and recovery
      reads it back (no secp256k1 at all: nothing is really signed);
    * ``store``: a commit runs no SQL (nothing is durable).

    The JSON then carries ``"ablations"``: such figures are a breakdown of where the time
    goes, never a result."""
    asked = ablations()
    if "crypto" in asked:
        from channel import keys

        def sign(self: keys.Signer, digest: bytes) -> bytes:
            return self.address + bytes(44) + b"\x1b"

        def recover(digest: bytes, signature: bytes) -> bytes:
            return signature[:20]

        keys.Signer.sign = sign  # type: ignore[method-assign]
        keys.recover = recover
    if "store" in asked:
        from channel.store import Store

        def commit(self: Store, plan: Any) -> None:
            return None

        Store.commit = commit  # type: ignore[method-assign]
    if asked:
        log(f"  EXPERIMENT: ablated {asked} (not a result)")


def sqlite_commit_times(directory: str, commits: int = 600) -> list[float]:
    """The latencies (ms) of bare durable SQLite commits on this disk, now: a WAL
    database with ``synchronous=FULL`` in ``directory``; each commit inserts one
    ~450-byte row and updates one (what a lock-step update's commits write).  No
    client code: the floor the store's commits stand on.

    The WAL is warmed first, as the store's is in steady state: one large commit grows
    it to ``WARM_WAL_BYTES`` and a checkpoint lets the next commit start it over, so
    every timed commit writes over blocks the file already has (a checkpoint every 200
    commits keeps it so).  A commit that grows the file costs about twice as much here
    (the file's size is metadata: ext4 commits its journal too), which the store pays
    only until its first checkpoint; :func:`sqlite_growing_commit_times` measures it."""
    return _commit_probe(directory, commits, warm=True)


def sqlite_growing_commit_times(directory: str, commits: int = 200) -> list[float]:
    """As :func:`sqlite_commit_times`, on a fresh WAL that every commit grows."""
    return _commit_probe(directory, commits, warm=False)


#: The idle time before each commit of :func:`sqlite_idle_commit_times`: about what a
#: party of a lock-step update sleeps between two of its commits (the proposer waits
#: ~0.5 ms for the countersignature, the responder ~0.9 ms for the next proposal).
IDLE_GAP_S = 0.0005


def sqlite_idle_commit_times(directory: str, commits: int = 200) -> list[float]:
    """As :func:`sqlite_commit_times`, but each commit comes after ``IDLE_GAP_S`` of
    sleep, as every commit of a lock-step update does.  On these VMs such a commit
    costs ~30-50 us more than one of a back-to-back series: the fsync of a vCPU that
    halted in the gap (and of a host I/O path that went quiet) completes later, and no
    CPU work before the commit changes that (measured: spinning 50 us first does not)."""
    return _commit_probe(directory, commits, warm=True, gap=IDLE_GAP_S)


#: What the commit probe's warm-up writes to the WAL: more than 200 timed commits add.
WARM_WAL_BYTES = 4 << 20


def _commit_probe(directory: str, commits: int, *, warm: bool, gap: float = 0.0) -> list[float]:
    path = os.path.join(directory, f"commit-probe-{time.monotonic_ns()}.sqlite")
    db, key = probe_db(path, warm=warm)
    times = []
    try:
        for v in range(1, commits + 1):
            body = os.urandom(450)
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            probe_commit(db, key, v, body)
            times.append((time.perf_counter() - t) * 1000)
            if warm and v % 200 == 0:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
    return times


def probe_db(path: str, *, warm: bool) -> tuple[Any, bytes]:
    """A bare WAL database (``synchronous=FULL``) for timed commits: ``(connection,
    key)``; ``warm`` grows its WAL to ``WARM_WAL_BYTES`` first and checkpoints it, so
    that commits write over blocks the file has.  Checkpoint it every few hundred
    commits to keep it so."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA journal_size_limit=-1")
    db.execute("CREATE TABLE s (k BLOB, v INTEGER, body BLOB, PRIMARY KEY (k, v)) WITHOUT ROWID")
    db.execute("CREATE TABLE c (k BLOB PRIMARY KEY, latest INTEGER) WITHOUT ROWID")
    key = os.urandom(32)
    db.execute("INSERT INTO c VALUES (?, 0)", (key,))
    if warm:
        db.execute("CREATE TABLE pad (b BLOB)")
        db.execute("BEGIN IMMEDIATE")
        for _ in range(WARM_WAL_BYTES // 4000):
            db.execute("INSERT INTO pad VALUES (?)", (os.urandom(3900),))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return db, key


def probe_commit(db: Any, key: bytes, v: int, *bodies: bytes) -> None:
    """One durable commit: a row per body (versions v, v+1, ...) and the latest updated:
    what a lock-step update's commit writes (a ~450-byte state with its signatures)."""
    db.execute("BEGIN IMMEDIATE")
    for i, body in enumerate(bodies):
        db.execute("INSERT INTO s VALUES (?, ?, ?)", (key, v + i, body))
    db.execute("UPDATE c SET latest = ? WHERE k = ?", (v + len(bodies) - 1, key))
    db.execute("COMMIT")


#: The bare benchmarks' framing over plain TCP: a 4-byte big-endian length, then the body.
_LEN = struct.Struct(">I")


def length_frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def split_frames(buf: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buf``, removed from it."""
    out = []
    while len(buf) >= 4:
        (n,) = _LEN.unpack_from(buf)
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4 : 4 + n]))
        del buf[: 4 + n]
    return out
