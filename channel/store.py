"""The durable store: SQLite in WAL mode with ``synchronous=FULL``.

One writer applies *batches* of operations in one transaction, so every update
that is ready at that moment shares one fsync (group commit).  The driver builds
a batch's SQL with :meth:`Store.prepare` (``channel.storeplan``), runs it with
:meth:`Store.commit` (blocking: the client's committer thread) and sends no
signature or acknowledgement that depends on the batch until ``commit`` returns.
:meth:`Store.apply` does both, for callers outside the hot path.

Tables
------
``meta``      schema version and the owner's address (a store belongs to one key).
``channels``  params, our index, the peer's node id and last known address, the
              latest co-signed version and ``max_signed`` (the highest version we
              ever signed: rule S in ``channel.machine``).
``states``    every state we signed, with the signatures we hold, and its status:
              IN_FLIGHT (our half-signed proposal), COSIGNED, or BURNED (rejected
              or dropped — its version is never reused).  The latest co-signed row
              is the one a dispute needs; the rest is the audit trail, which grows
              by ~0.36 kB an update until :meth:`Store.prune_history` deletes it.

Migrations run forward in place (``_MIGRATIONS``); a file from a newer release
is refused with ``StoreError`` rather than guessed at.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import cbor2

from channel import codec
from channel.eip712 import state_digest
from channel.errors import StoreError
from channel.machine import InFlight
from channel.state import Params, SignedState
from channel.storeplan import (
    BURNED,
    COSIGNED,
    IN_FLIGHT,
    PersistChannel,
    PersistPeerAddress,
    PersistStatus,
    Plan,
    StoreOp,
    build_plan,
)

SCHEMA_VERSION = 2

#: A WAL that grew past this (a checkpoint held back by a long read) is cut back to it
#: when it starts over; below it, the file is reused, never shrunk (see ``checkpoint``).
WAL_SIZE_LIMIT = 64 * 1024 * 1024

#: What :meth:`Store.warm_wal` writes to a fresh WAL: more than the commits between two
#: checkpoints (``channel.outbox.CHECKPOINT_EVERY_COMMITS``) write in lock-step traffic,
#: ~3.3 pages of 4 kB a commit: 500 commits fill ~6.8 MB.
WARM_WAL_BYTES = 8 * 1024 * 1024

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
    # The latest version a refused proposal of ours came back at (``PersistRevived``).
    2: ["ALTER TABLE channels ADD COLUMN revived_version INTEGER"],
}


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
    #: The latest state is a proposal of ours the peer refused and brought back.
    revived: bool = False


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
            # The ephemeral tables of a multi-row ``UPDATE ... FROM (VALUES ...)`` stay in
            # memory instead of a temp file (~70 against ~43 us for ten rows).
            self._db.execute("PRAGMA temp_store=MEMORY")
            self._migrate(owner)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self._checkpointer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        #: Transactions committed so far: a caller interrupted mid-``commit`` tells by it
        #: whether the commit stood.
        self.commits = 0

    # -- checkpoints ------------------------------------------------------------

    def checkpoint_in_background(self) -> None:
        """Stop checkpointing the WAL inside commits; the caller runs :meth:`checkpoint`
        regularly from another thread instead.

        SQLite's automatic checkpoint runs inside whichever commit crosses 1000 WAL
        pages: that commit copies the pages into the database and fsyncs it, a stall
        of several milliseconds on one update in a few hundred.  A passive checkpoint
        on a second connection does the same work beside the writer."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")

    def warm_wal(self, nbytes: int = WARM_WAL_BYTES) -> bool:
        """Give the WAL file ``nbytes`` of written blocks, unless it has them already;
        True if it had to.  Call it before the first commit of the store's owner.

        A commit that appends to the WAL file costs about twice one that writes over
        blocks the file has (the file's size is metadata: ext4 commits its journal
        too): ~0.3-0.35 against ~0.18 ms here.  SQLite deletes the WAL when the store
        closes, so without this every start pays that on each commit until the first
        checkpoint lets the WAL start over.

        The padding is one small row rewritten in one commit per WAL page, without an
        fsync each (``synchronous=NORMAL``, under which a WAL database stays consistent
        whatever happens; the padding is all such a commit could lose).  The checkpoint
        that follows syncs the WAL, and copies one page: the database does not grow."""
        wal = Path(f"{self.path}-wal")
        try:
            if wal.stat().st_size >= nbytes:
                return False
        except FileNotFoundError:
            pass
        db = self._db
        try:
            (auto,) = db.execute("PRAGMA wal_autocheckpoint").fetchone()
            db.execute("PRAGMA wal_autocheckpoint=0")  # else the WAL starts over at 1000 pages
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute("CREATE TABLE IF NOT EXISTS wal_pad (n INTEGER)")
                db.execute("INSERT INTO wal_pad VALUES (0)")
                page = db.execute("PRAGMA page_size").fetchone()[0]
                for n in range(nbytes // page + 1):
                    db.execute("UPDATE wal_pad SET n = ?", (n,))
                db.execute("DROP TABLE wal_pad")
            finally:
                db.execute("PRAGMA synchronous=FULL")
                db.execute(f"PRAGMA wal_autocheckpoint={int(auto)}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self.checkpoint()
        return True

    def checkpoint(self) -> bool:
        """Copy committed WAL pages into the database (passive: never blocks the writer);
        True if every page was copied, so that the next commit starts the WAL over from
        its beginning.  Thread-safe against commits; call it from one thread at a time.

        Run it between commits, not beside one: a commit that lands while it runs
        leaves the WAL not fully copied, the next commit appends instead of starting
        over, and a WAL that only grows costs every commit twice (appending to a file
        makes its fsync flush the file system's journal too: 0.52 against 0.27 ms)."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._checkpointer.execute("PRAGMA synchronous=FULL")
            self._checkpointer.execute("PRAGMA busy_timeout=5000")
        try:
            ((busy, wal_pages, copied),) = self._checkpointer.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: checkpoint failed: {exc}") from None
        return not busy and wal_pages == copied

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
            _rollback(db)
            raise

    def schema_version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # -- writes -----------------------------------------------------------------

    def apply(self, ops: Sequence[StoreOp]) -> None:
        """Apply ``ops`` in order in one transaction and fsync; all or nothing."""
        self.commit(self.prepare(ops))

    def prepare(self, ops: Sequence[StoreOp]) -> Plan:
        """Turn ``ops`` into the SQL of one transaction (see ``channel.storeplan``).
        Pure Python: run it on the caller's thread, and :meth:`commit` the plan in a
        committer thread, where it holds the GIL only between SQLite calls.  Raises
        ``StoreError`` (e.g. a latest that would roll back)."""
        return build_plan(ops)

    def commit(self, plan: Plan) -> None:
        """Run ``plan`` in one transaction and fsync (``synchronous=FULL``); all or
        nothing.  Raises ``StoreError``."""
        if not plan.steps:
            return
        with self._transaction() as db:
            for step in plan.steps:
                step(db)

    def prune_history(self, channel_id: bytes, *, limit: int) -> int:
        """Delete up to ``limit`` of the channel's oldest states below its latest
        co-signed one, in one transaction (fsynced); how many went.  Never the latest,
        never a proposal of ours still in flight: what a dispute needs stays.  Rule S
        holds without the rows (``max_signed`` stays, and the store refuses a new
        proposal that is not above the latest).  Not thread-safe against commits: the
        client runs it on its committer thread (``Client.prune_history``)."""
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM states WHERE channel_id = ?1 AND version IN ("
                "SELECT version FROM states WHERE channel_id = ?1 AND status != ?2 "
                "AND version < (SELECT latest_version FROM channels WHERE channel_id = ?1) "
                "ORDER BY version LIMIT ?3)",
                (channel_id, IN_FLIGHT, limit),
            ).rowcount
        return int(deleted)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and fsynced) if the block completes, else
        rolled back; a database error becomes ``StoreError``."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
                self.commits += 1
            except BaseException:
                # Also for an exception raised after COMMIT returned (a KeyboardInterrupt
                # at that instant): the commit stands, and the exception goes on as itself
                # rather than as "cannot rollback - no transaction is active".
                _rollback(db)
                raise
        except (sqlite3.DatabaseError, OverflowError) as exc:  # OverflowError: an int64
            raise StoreError(f"{self.path}: {exc}") from None

    # -- reads ------------------------------------------------------------------

    def load(self) -> list[ChannelRecord]:
        """Every channel, with its latest co-signed state and in-flight proposals."""
        out = []
        rows = self._db.execute(
            "SELECT channel_id, params, me, peer_node_id, peer_addr, latest_version, "
            "max_signed, status, revived_version FROM channels ORDER BY created_at, channel_id"
        ).fetchall()
        for cid, params_blob, me, peer, addr, latest_v, max_signed, status, revived_v in rows:
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
                    revived=latest_v is not None and revived_v == latest_v,
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
        """The audit trail: ``(version, status, signed state)`` for every state we signed,
        as last committed.  Safe to call while the client runs: it reads on a connection
        of its own (never the committer's, whose open transaction it would see, nor from
        a second thread at once)."""
        if self._reader is None:
            try:
                self._reader = sqlite3.connect(
                    str(self.path), isolation_level=None, check_same_thread=False
                )
                self._reader.execute("PRAGMA query_only=ON")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: {exc}") from None
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
            for v, status, blob, s0, s1 in self._reader.execute(
                "SELECT version, status, state, sig0, sig1 FROM states WHERE channel_id=? "
                "ORDER BY version",
                (channel_id,),
            )
        ]

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._reader is not None:
            self._reader.close()
        self._db.close()


class StoreLock:
    """The claim of one running client on a store: an exclusive ``flock`` on the file
    ``<store>.lock`` beside it, held until :meth:`release` (or the process's death: the
    kernel drops it with the last descriptor, so a SIGKILLed client leaves no stale lock).

    Two clients on one store would each run its own machines from the same rows: each
    signs versions the other does not know it signed, and rule S (never two states at
    one version) no longer holds.  ``open_client`` therefore takes this lock first and
    refuses to start on a store another client holds.  The lock lives in a file of its
    own, not on the database: closing any descriptor of a file drops every POSIX lock
    the process holds on it, SQLite's included.  Tools that only read or set a status
    (the ``optichannel`` CLI) open the store without it.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(f"{store_path}.lock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"{store_path}: cannot open its lock file: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreError(
                f"{store_path} is in use by another running client"
                f"{f' (pid {holder})' if holder else ''}: two clients on one store would "
                "sign conflicting states; stop the other one first"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{store_path}: cannot lock {self.path.name}: {exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Let another client open the store (the lock file stays: removing it would race
        with a client that just opened it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


__all__ = [
    "BURNED",
    "COSIGNED",
    "IN_FLIGHT",
    "SCHEMA_VERSION",
    "ChannelRecord",
    "PersistChannel",
    "PersistPeerAddress",
    "PersistStatus",
    "Plan",
    "Store",
    "StoreLock",
    "StoreOp",
]


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if one is still open."""
    if db.in_transaction:
        db.execute("ROLLBACK")
