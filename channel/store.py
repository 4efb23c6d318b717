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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import attrs
import cbor2

from channel import codec
from channel.eip712 import state_digest
from channel.errors import StoreError
from channel.machine import InFlight, PersistDropProposals, PersistLatest, PersistProposal
from channel.state import Params, SignedState

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


def _state_blob(signed_state: object) -> bytes:
    return cbor2.dumps(signed_state, canonical=True)


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
            self._migrate(owner)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None

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
        if not ops:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                batch = _Batch()
                for op in ops:
                    _APPLY[type(op)](db, op, batch)
                _finish(db, batch)
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
        self._db.close()


# -- op appliers (one per op type) --------------------------------------------


def _put_channel(db: sqlite3.Connection, op: PersistChannel, batch: _Batch) -> None:
    db.execute(
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


def _put_status(db: sqlite3.Connection, op: PersistStatus, batch: _Batch) -> None:
    db.execute("UPDATE channels SET status=? WHERE channel_id=?", (op.status, op.channel_id))


def _put_peer_addr(db: sqlite3.Connection, op: PersistPeerAddress, batch: _Batch) -> None:
    db.execute("UPDATE channels SET peer_addr=? WHERE channel_id=?", (op.peer_addr, op.channel_id))


def _sig_columns(me: int, sig: bytes) -> tuple[bytes | None, bytes | None]:
    return (sig, None) if me == 0 else (None, sig)


class _Batch:
    """Per-channel effects of one batch, written once at its end (group commit)."""

    def __init__(self) -> None:
        self.max_signed: dict[bytes, int] = {}
        self.latest: dict[bytes, int] = {}


def _put_proposal(db: sqlite3.Connection, op: PersistProposal, batch: _Batch) -> None:
    cid = op.params.channel_id
    s0, s1 = _sig_columns(op.me, op.signature)
    v = op.state.version
    cur = db.execute(
        "INSERT INTO states (channel_id, version, base_version, state, sig0, sig1, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (cid, v, op.base_version, _state_blob(codec.state_to_wire(op.state)), s0, s1, IN_FLIGHT),
    )
    if cur.rowcount != 1:
        raise StoreError(f"channel {cid.hex()[:16]}: v{v} already signed (rule S)")
    batch.max_signed[cid] = max(v, batch.max_signed.get(cid, 0))


def _put_latest(db: sqlite3.Connection, op: PersistLatest, batch: _Batch) -> None:
    cid = op.params.channel_id
    s = op.signed
    v = s.state.version
    if v <= batch.latest.get(cid, -1):
        raise StoreError(f"channel {cid.hex()[:16]}: refusing to roll latest back to v{v}")
    blob = _state_blob(codec.state_to_wire(s.state))
    sig0, sig1 = s.signatures
    cur = db.execute(
        "INSERT INTO states (channel_id, version, base_version, state, sig0, sig1, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (cid, v, v - 1 if v else 0, blob, sig0, sig1, COSIGNED),
    )
    if cur.rowcount != 1:
        # We signed this version before (our own proposal): complete that very state only.
        cur = db.execute(
            "UPDATE states SET sig0=?, sig1=?, status=? "
            "WHERE channel_id=? AND version=? AND state=?",
            (sig0, sig1, COSIGNED, cid, v, blob),
        )
        if cur.rowcount != 1:
            raise StoreError(
                f"channel {cid.hex()[:16]}: v{v} differs from the state we signed there (rule S)"
            )
    batch.latest[cid] = v
    batch.max_signed[cid] = max(v, batch.max_signed.get(cid, 0))


def _finish(db: sqlite3.Connection, batch: _Batch) -> None:
    for cid, v in batch.latest.items():
        cur = db.execute(
            "UPDATE channels SET latest_version=?, max_signed=max(max_signed, ?) "
            "WHERE channel_id=? AND (latest_version IS NULL OR latest_version < ?)",
            (v, batch.max_signed[cid], cid, v),
        )
        if cur.rowcount != 1:
            raise StoreError(f"channel {cid.hex()[:16]}: refusing to roll latest back to v{v}")
        db.execute(
            "UPDATE states SET status=? WHERE channel_id=? AND status=? AND version<?",
            (BURNED, cid, IN_FLIGHT, v),
        )
    for cid, v in batch.max_signed.items():
        if cid not in batch.latest:
            db.execute(
                "UPDATE channels SET max_signed = max(max_signed, ?) WHERE channel_id=?", (v, cid)
            )


def _drop_proposals(db: sqlite3.Connection, op: PersistDropProposals, batch: _Batch) -> None:
    db.execute(
        "UPDATE states SET status=? WHERE channel_id=? AND status=? AND version>=?",
        (BURNED, op.params.channel_id, IN_FLIGHT, op.from_version),
    )


_APPLY: dict[type, Callable[[sqlite3.Connection, Any, _Batch], None]] = {
    PersistChannel: _put_channel,
    PersistStatus: _put_status,
    PersistPeerAddress: _put_peer_addr,
    PersistProposal: _put_proposal,
    PersistLatest: _put_latest,
    PersistDropProposals: _drop_proposals,
}


def ops_only(items: Iterable[object]) -> list[StoreOp]:
    return [i for i in items if type(i) in _APPLY]  # type: ignore[misc]
