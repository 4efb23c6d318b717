"""The durable store: SQLite in WAL mode with ``synchronous=FULL``.

One writer applies *batches* of operations in one transaction, so every update
that is ready at that moment shares one fsync (group commit).  The driver
calls :meth:`Store.apply` (blocking; run it in a worker thread) and sends no
signature or acknowledgement that depends on a batch until ``apply`` returns.

Tables
------
``meta``      schema version and the owner's address (a store belongs to one key).
``channels``  params, our index, the peer's node id and last known address, the
              latest co-signed version and ``max_signed`` (the highest version we
              ever signed: rule S in ``channel.machine``).
``states``    every state we signed, with the signatures we hold, and its status:
              IN_FLIGHT (our half-signed proposal), COSIGNED, or BURNED (rejected
              or dropped — its version is never reused).  The latest co-signed row
              is the one a dispute needs; the rest is the audit trail.

Migrations run forward in place (``_MIGRATIONS``); a file from a newer release
is refused with ``StoreError`` rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeAlias

import attrs
import cbor2

from channel import codec
from channel.eip712 import state_digest
from channel.errors import StoreError
from channel.machine import (
    ROW_NEW,
    ROW_OWN,
    InFlight,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
)
from channel.state import Params, SignedState, State

SCHEMA_VERSION = 1
IN_FLIGHT, COSIGNED, BURNED = 0, 1, 2

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE channels (
            channel_id BLOB PRIMARY KEY,
            params BLOB NOT NULL,
            me INTEGER NOT NULL,
            peer_node_id BLOB NOT NULL,
            peer_addr TEXT,
            latest_version INTEGER,
            max_signed INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'open',
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        ) WITHOUT ROWID""",
        """CREATE TABLE states (
            channel_id BLOB NOT NULL,
            version INTEGER NOT NULL,
            base_version INTEGER NOT NULL,
            state BLOB NOT NULL,
            sig0 BLOB,
            sig1 BLOB,
            status INTEGER NOT NULL,
            PRIMARY KEY (channel_id, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX states_in_flight ON states (channel_id, status, version)",
    ],
}


@attrs.frozen(kw_only=True)
class PersistChannel:
    """A channel we are a party to; written before its first state."""

    params: Params
    me: int
    peer_node_id: bytes
    peer_addr: str | None = None
    status: str = "open"


@attrs.frozen(kw_only=True)
class PersistStatus:
    """A channel's new lifecycle status (``funding``, ``open``, ``closing``, ``closed``)."""

    channel_id: bytes
    status: str


@attrs.frozen(kw_only=True)
class PersistPeerAddress:
    """Where to reach the peer of a channel from now on."""

    channel_id: bytes
    peer_addr: str


StoreOp: TypeAlias = (
    PersistChannel
    | PersistStatus
    | PersistPeerAddress
    | PersistProposal
    | PersistLatest
    | PersistDropProposals
)


@attrs.frozen(kw_only=True)
class ChannelRecord:
    """Everything needed to rebuild a channel's machine after a restart."""

    params: Params
    me: int
    peer_node_id: bytes
    peer_addr: str | None
    latest: SignedState | None
    max_signed: int
    in_flight: tuple[InFlight, ...]
    status: str


def _state_blob(state: State) -> bytes:
    return cbor2.dumps(codec.state_to_wire(state), canonical=True)


class Store:
    """A channel store in one SQLite file.  Not thread-safe: one writer at a time."""

    def __init__(self, path: str | Path, *, owner: bytes) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate(owner)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self._checkpointer: sqlite3.Connection | None = None

    # -- checkpoints ------------------------------------------------------------

    def checkpoint_in_background(self) -> None:
        """Stop checkpointing the WAL inside commits; the caller runs :meth:`checkpoint`
        regularly from another thread instead.

        SQLite's automatic checkpoint runs inside whichever commit crosses 1000 WAL
        pages: that commit copies the pages into the database and fsyncs it, a stall
        of several milliseconds on one update in a few hundred.  A passive checkpoint
        on a second connection does the same work beside the writer."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the database (passive: never blocks the writer).
        Thread-safe against commits; call it from one thread at a time."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._checkpointer.execute("PRAGMA synchronous=FULL")
            self._checkpointer.execute("PRAGMA busy_timeout=5000")
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: checkpoint failed: {exc}") from None

    # -- schema ---------------------------------------------------------------

    def _migrate(self, owner: bytes) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema v{current}; this release understands up to "
                f"v{SCHEMA_VERSION} — upgrade optichannel, do not downgrade a store"
            )
        stored_owner = db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
        if stored_owner is not None and bytes(stored_owner[0]) != owner:
            raise StoreError(
                f"{self.path} belongs to {bytes(stored_owner[0]).hex()}, not {owner.hex()}"
            )
        db.execute("BEGIN IMMEDIATE")
        try:
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[version]:
                    db.execute(stmt)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('owner', ?)", (owner,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # -- writes -----------------------------------------------------------------

    def apply(self, ops: Sequence[StoreOp]) -> None:
        """Apply ``ops`` in order in one transaction and fsync; all or nothing."""
        self.commit(self.prepare(ops))

    def prepare(self, ops: Sequence[StoreOp]) -> Plan:
        """Turn ``ops`` into the SQL of one transaction (encoding, checks that need no
        database).  Pure Python: run it on the caller's thread, and :meth:`commit` the
        plan in a worker thread, where it holds the GIL only between SQLite calls.

        Runs of the hot-path operations (proposals, fresh co-signed states, our own
        proposals countersigned) become one multi-row statement each.  Raises ``StoreError``
        (e.g. a latest that would roll back)."""
        steps: list[Step] = []
        batch = _Batch()
        run: list[Any] = []
        run_kind: object = None
        for op in ops:
            kind = _run_kind(op)
            if kind is not run_kind and run:
                steps.append(_RUNS[run_kind](run, batch))
                run = []
            run_kind = kind
            if kind is None:
                steps.append(_APPLY[type(op)](op, batch))
            else:
                run.append(op)
        if run:
            steps.append(_RUNS[run_kind](run, batch))
        if steps:
            steps.extend(_finish(batch))
        return Plan(steps)

    def commit(self, plan: Plan) -> None:
        """Run ``plan`` in one transaction and fsync (``synchronous=FULL``); all or
        nothing.  Raises ``StoreError``."""
        if not plan.steps:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for step in plan.steps:
                    step(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    # -- reads ------------------------------------------------------------------

    def load(self) -> list[ChannelRecord]:
        """Every channel, with its latest co-signed state and in-flight proposals."""
        out = []
        rows = self._db.execute(
            "SELECT channel_id, params, me, peer_node_id, peer_addr, latest_version, "
            "max_signed, status FROM channels ORDER BY created_at, channel_id"
        ).fetchall()
        for cid, params_blob, me, peer, addr, latest_v, max_signed, status in rows:
            params = codec.params_from_wire(cbor2.loads(params_blob))
            latest = None
            if latest_v is not None:
                latest = self._signed(cid, latest_v)
            in_flight = tuple(
                InFlight(
                    update_id=-1,
                    proposal=codec.Propose(
                        base_version=base,
                        state=codec.state_from_wire(cbor2.loads(blob)),
                        signature=bytes(sig0 if me == 0 else sig1),
                    ),
                    digest=state_digest(params, codec.state_from_wire(cbor2.loads(blob))),
                )
                for base, blob, sig0, sig1 in self._db.execute(
                    "SELECT base_version, state, sig0, sig1 FROM states "
                    "WHERE channel_id=? AND status=? ORDER BY version",
                    (cid, IN_FLIGHT),
                )
            )
            out.append(
                ChannelRecord(
                    params=params,
                    me=me,
                    peer_node_id=bytes(peer),
                    peer_addr=addr,
                    latest=latest,
                    max_signed=max_signed,
                    in_flight=in_flight,
                    status=status,
                )
            )
        return out

    def _signed(self, cid: bytes, version: int) -> SignedState:
        row = self._db.execute(
            "SELECT state, sig0, sig1 FROM states WHERE channel_id=? AND version=?",
            (cid, version),
        ).fetchone()
        if row is None:
            raise StoreError(f"channel {cid.hex()[:16]}: latest v{version} missing from states")
        return SignedState(
            state=codec.state_from_wire(cbor2.loads(row[0])),
            signatures=(
                None if row[1] is None else bytes(row[1]),
                None if row[2] is None else bytes(row[2]),
            ),
        )

    def signed_states(self, channel_id: bytes) -> list[tuple[int, int, SignedState]]:
        """The audit trail: ``(version, status, signed state)`` for every state we signed."""
        return [
            (
                v,
                status,
                SignedState(
                    state=codec.state_from_wire(cbor2.loads(blob)),
                    signatures=(
                        None if s0 is None else bytes(s0),
                        None if s1 is None else bytes(s1),
                    ),
                ),
            )
            for v, status, blob, s0, s1 in self._db.execute(
                "SELECT version, status, state, sig0, sig1 FROM states WHERE channel_id=? "
                "ORDER BY version",
                (channel_id,),
            )
        ]

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()


# -- plans: one builder per op type, each returning the SQL step it needs ------

#: One step of a transaction; raises ``StoreError`` when a check on the rows fails.
Step: TypeAlias = Callable[[sqlite3.Connection], None]


@attrs.frozen
class Plan:
    """The SQL of one group commit, built by :meth:`Store.prepare`."""

    steps: list[Step]


def _sql(sql: str, args: tuple[Any, ...]) -> Step:
    def step(db: sqlite3.Connection) -> None:
        db.execute(sql, args)

    return step


def _put_channel(op: PersistChannel, batch: _Batch) -> Step:
    return _sql(
        "INSERT INTO channels (channel_id, params, me, peer_node_id, peer_addr, status) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (channel_id) DO NOTHING",
        (
            op.params.channel_id,
            cbor2.dumps(codec.params_to_wire(op.params), canonical=True),
            op.me,
            op.peer_node_id,
            op.peer_addr,
            op.status,
        ),
    )


def _put_status(op: PersistStatus, batch: _Batch) -> Step:
    return _sql("UPDATE channels SET status=? WHERE channel_id=?", (op.status, op.channel_id))


def _put_peer_addr(op: PersistPeerAddress, batch: _Batch) -> Step:
    return _sql("UPDATE channels SET peer_addr=? WHERE channel_id=?", (op.peer_addr, op.channel_id))


def _sig_columns(me: int, sig: bytes) -> tuple[bytes | None, bytes | None]:
    return (sig, None) if me == 0 else (None, sig)


class _Batch:
    """Per-channel effects of one batch, written once at its end (group commit)."""

    def __init__(self) -> None:
        self.max_signed: dict[bytes, int] = {}
        self.latest: dict[bytes, int] = {}
        self.burn_below: dict[bytes, int] = {}


def _note_latest(batch: _Batch, cid: bytes, v: int) -> None:
    if v <= batch.latest.get(cid, -1):
        raise StoreError(f"channel {cid.hex()[:16]}: refusing to roll latest back to v{v}")
    batch.latest[cid] = v
    batch.max_signed[cid] = max(v, batch.max_signed.get(cid, 0))


_INSERT_STATE = (
    "INSERT INTO states (channel_id, version, base_version, state, sig0, sig1, status) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)

#: Rows per multi-row statement (SQLite allows 32,766 parameters in one statement).
_ROWS_PER_STATEMENT = 512


def _chunks(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    n = _ROWS_PER_STATEMENT
    return [rows[i : i + n] for i in range(0, len(rows), n)]


@lru_cache(maxsize=64)
def _insert_sql(n: int) -> str:
    return _INSERT_STATE + ", (?, ?, ?, ?, ?, ?, ?)" * (n - 1)


@lru_cache(maxsize=64)
def _complete_sql(n: int) -> str:
    # One statement for the whole run (the rows name their key and the peer's
    # signature): the committer thread then takes the GIL once, not once per row.
    return (
        "UPDATE states SET sig0 = v.column3, sig1 = v.column4, status = ? "
        "FROM (VALUES " + ", ".join(["(?, ?, ?, ?)"] * n) + ") AS v "
        "WHERE states.channel_id = v.column1 AND states.version = v.column2 "
        "AND states.status = ?"
    )


def _insert_run(run: list[PersistProposal | PersistLatest], batch: _Batch) -> Step:
    """Versions we sign for the first time: our proposals and the peer's proposals we
    countersign.  A row already there means we signed that version before: rule S
    forbids a second state, so the whole batch is refused."""
    rows = []
    for op in run:
        cid = op.params.channel_id
        if isinstance(op, PersistProposal):
            v = op.state.version
            s0, s1 = _sig_columns(op.me, op.signature)
            rows.append((cid, v, op.base_version, _state_blob(op.state), s0, s1, IN_FLIGHT))
            batch.max_signed[cid] = max(v, batch.max_signed.get(cid, 0))
        else:
            st = op.signed.state
            v = st.version
            _note_latest(batch, cid, v)
            sig0, sig1 = op.signed.signatures
            rows.append((cid, v, v - 1 if v else 0, _state_blob(st), sig0, sig1, COSIGNED))
    first = run[0].params.channel_id.hex()[:16]
    statements = [(_insert_sql(len(c)), [x for row in c for x in row]) for c in _chunks(rows)]

    def step(db: sqlite3.Connection) -> None:
        try:
            for sql, args in statements:
                db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise StoreError(
                f"channel {first}: a version in v{rows[0][1]!r}..v{rows[-1][1]!r} "
                "is already signed (rule S)"
            ) from None

    return step


def _complete_run(run: list[PersistLatest], batch: _Batch) -> Step:
    """Our own in-flight proposals, now countersigned: add the peer's signature to the
    very row we wrote before sending (no re-encoding; the machine names the row)."""
    rows = []
    for op in run:
        cid = op.params.channel_id
        v = op.signed.state.version
        _note_latest(batch, cid, v)
        sig0, sig1 = op.signed.signatures
        rows.append((cid, v, sig0, sig1))
    first = run[0].params.channel_id.hex()[:16]
    statements = [
        (_complete_sql(len(c)), len(c), [COSIGNED, *(x for row in c for x in row), IN_FLIGHT])
        for c in _chunks(rows)
    ]

    def step(db: sqlite3.Connection) -> None:
        for sql, n, args in statements:
            if db.execute(sql, args).rowcount != n:
                raise StoreError(
                    f"channel {first}: v{rows[0][1]!r}..v{rows[-1][1]!r} "
                    "are not all our in-flight proposals"
                )

    return step


def _put_latest(op: PersistLatest, batch: _Batch) -> Step:
    """Any other co-signed state (adopted on resync): it may complete a state we signed
    at that version, but only that very state (rule S)."""
    cid = op.params.channel_id
    s = op.signed
    v = s.state.version
    _note_latest(batch, cid, v)
    batch.burn_below[cid] = v
    blob = _state_blob(s.state)
    sig0, sig1 = s.signatures

    def step(db: sqlite3.Connection) -> None:
        cur = db.execute(
            _INSERT_STATE + " ON CONFLICT DO NOTHING",
            (cid, v, v - 1 if v else 0, blob, sig0, sig1, COSIGNED),
        )
        if cur.rowcount != 1:
            cur = db.execute(
                "UPDATE states SET sig0=?, sig1=?, status=? "
                "WHERE channel_id=? AND version=? AND state=?",
                (sig0, sig1, COSIGNED, cid, v, blob),
            )
            if cur.rowcount != 1:
                raise StoreError(
                    f"channel {cid.hex()[:16]}: v{v} differs from the state we signed there "
                    "(rule S)"
                )

    return step


def _finish(batch: _Batch) -> list[Step]:
    steps = []
    for cid, v in batch.latest.items():
        steps.append(_set_latest(cid, v, batch.max_signed[cid]))
    for cid, v in batch.burn_below.items():
        # An adopted state retires whatever we still had in flight below it.
        steps.append(
            _sql(
                "UPDATE states SET status=? WHERE channel_id=? AND status=? AND version<?",
                (BURNED, cid, IN_FLIGHT, v),
            )
        )
    for cid, v in batch.max_signed.items():
        if cid not in batch.latest:
            steps.append(
                _sql(
                    "UPDATE channels SET max_signed = max(max_signed, ?) WHERE channel_id=?",
                    (v, cid),
                )
            )
    return steps


def _set_latest(cid: bytes, v: int, max_signed: int) -> Step:
    def step(db: sqlite3.Connection) -> None:
        cur = db.execute(
            "UPDATE channels SET latest_version=?, max_signed=max(max_signed, ?) "
            "WHERE channel_id=? AND (latest_version IS NULL OR latest_version < ?)",
            (v, max_signed, cid, v),
        )
        if cur.rowcount != 1:
            raise StoreError(f"channel {cid.hex()[:16]}: refusing to roll latest back to v{v}")

    return step


def _drop_proposals(op: PersistDropProposals, batch: _Batch) -> Step:
    return _sql(
        "UPDATE states SET status=? WHERE channel_id=? AND status=? AND version>=?",
        (BURNED, op.params.channel_id, IN_FLIGHT, op.from_version),
    )


_APPLY: dict[type, Callable[[Any, _Batch], Step]] = {
    PersistChannel: _put_channel,
    PersistStatus: _put_status,
    PersistPeerAddress: _put_peer_addr,
    PersistLatest: _put_latest,
    PersistDropProposals: _drop_proposals,
}

_INSERT, _COMPLETE = object(), object()
_RUNS: dict[object, Callable[[Any, _Batch], Step]] = {
    _INSERT: _insert_run,
    _COMPLETE: _complete_run,
}


def _run_kind(op: object) -> object:
    """Which run an op joins (``None``: applied on its own)."""
    t = type(op)
    if t is PersistProposal:
        return _INSERT
    if t is PersistLatest:
        row = op.row  # type: ignore[attr-defined]
        if row == ROW_NEW:
            return _INSERT
        if row == ROW_OWN:
            return _COMPLETE
    return None
