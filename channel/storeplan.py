"""What a batch of store operations becomes: the SQL steps of one transaction.

``build_plan`` runs on the Trio thread (encoding, the checks that need no database);
``Store.commit`` runs the steps in one transaction on the committer thread, so that
thread holds the GIL only between SQLite calls.  One builder per operation type; runs
of the hot-path operations (proposals, fresh co-signed states, completions of our own
proposals) become one multi-row statement each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, TypeAlias

import attrs
import cbor2

from channel import codec
from channel.errors import StoreError
from channel.machine import (
    ROW_NEW,
    ROW_OWN,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    PersistRevived,
)
from channel.state import Params, State

IN_FLIGHT, COSIGNED, BURNED = 0, 1, 2


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
    | PersistRevived
)


def _state_blob(state: State) -> bytes:
    return cbor2.dumps(codec.state_to_wire(state), canonical=True)


def build_plan(ops: Sequence[StoreOp]) -> Plan:
    """The SQL of one transaction for ``ops``, in order; runs of the hot-path operations
    (proposals, fresh co-signed states, our own proposals countersigned) become one
    multi-row statement each.  Raises ``StoreError`` (e.g. a latest that would roll
    back)."""
    steps: list[Step] = []
    batch = _Batch()
    inserts: list[PersistProposal | PersistLatest] = []
    completions: list[PersistLatest] = []
    for op in ops:
        kind = _run_kind(op)
        if kind is None:
            # Anything else keeps its place: what was queued before it is written first.
            _flush_runs(steps, inserts, completions)
            steps.append(_APPLY[type(op)](op, batch))
            continue
        # The bookkeeping (a latest never rolls back, max_signed) follows the op order;
        # the rows of a run are independent (a completion's row is always from an
        # earlier commit: the proposal was sent, so it was durable), so they are
        # grouped into one insert and one update however the channels interleave.
        assert isinstance(op, PersistProposal | PersistLatest)
        _note(op, batch)
        if kind is _INSERT:
            inserts.append(op)
        else:
            assert isinstance(op, PersistLatest)
            completions.append(op)
    _flush_runs(steps, inserts, completions)
    if steps:
        steps.extend(_finish(batch))
    return Plan(steps)


def _note(op: PersistProposal | PersistLatest, batch: _Batch) -> None:
    cid = op.params.channel_id
    if isinstance(op, PersistProposal):
        v = op.state.version
        # Rule S against a latest set earlier in this batch (``_finish`` checks the one
        # already stored).
        why = _below_latest(batch.latest.get(cid), v)
        if why is not None:
            raise StoreError(f"channel {cid.hex()[:16]}: {why}")
        batch.max_signed[cid] = max(v, batch.max_signed.get(cid, 0))
        batch.first_proposal[cid] = min(v, batch.first_proposal.get(cid, v))
        return
    v = op.signed.state.version
    _note_latest(batch, cid, v)
    if op.retires_below:
        _retire_below(batch, cid, v)


def _flush_runs(
    steps: list[Step],
    inserts: list[PersistProposal | PersistLatest],
    completions: list[PersistLatest],
) -> None:
    if inserts:
        steps.append(_insert_run(inserts))
        inserts.clear()
    if completions:
        steps.append(_complete_run(completions))
        completions.clear()


# -- plans: one builder per op type, each returning the SQL step it needs ------

#: One step of a transaction; raises ``StoreError`` when a check on the rows fails.
Step: TypeAlias = Callable[[sqlite3.Connection], None]

#: ``(sql, args, the rows it covers)``, in order.
Statements: TypeAlias = list[tuple[str, list[Any], list[tuple[Any, ...]]]]


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


def _put_revived(op: PersistRevived, batch: _Batch) -> Step:
    return _sql(
        "UPDATE channels SET revived_version=? WHERE channel_id=?",
        (op.version, op.params.channel_id),
    )


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
        self.first_proposal: dict[bytes, int] = {}  # our lowest new proposal per channel


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


#: Runs of up to this many rows update them with one keyed statement each.  An
#: ``UPDATE ... FROM (VALUES ...)`` costs ~40 us before its first row (SQLite joins
#: through an ephemeral table) against ~3 us for a keyed ``UPDATE``: a lock-step update
#: pays that three times.  Longer runs take one such statement per chunk all the same,
#: so that the committer thread takes the GIL once per statement, not once per row.
_KEYED_ROWS = 4


def _update_rows(keyed: str, template: str, width: int, rows: list[tuple[Any, ...]]) -> Statements:
    """The statements that update ``rows``: ``(sql, args, rows it covers)``.  ``keyed``
    updates one row, its ``?1``..``?width`` being the row's values in order;
    ``template`` is the same update joined to ``FROM (VALUES {})``."""
    if len(rows) <= _KEYED_ROWS:
        return [(keyed, list(r), [r]) for r in rows]
    return _values_statements(template, width, rows)


def _insert_run(run: list[PersistProposal | PersistLatest]) -> Step:
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
        else:
            st = op.signed.state
            v = st.version
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


def _complete_run(run: list[PersistLatest]) -> Step:
    """Our own in-flight proposals, now countersigned: add the peer's signature to the
    very row we wrote before sending (no re-encoding; the machine names the row).  Our
    proposals below one that ``retires_below`` were accepted with it (one ``Accept``
    covers them): they leave the in-flight set, as below an adopted state."""
    rows = []
    for op in run:
        cid = op.params.channel_id
        v = op.signed.state.version
        sig0, sig1 = op.signed.signatures
        rows.append((cid, v, sig0, sig1))
    first = run[0].params.channel_id.hex()[:16]
    statements = _update_rows(
        f"UPDATE states SET sig0 = ?3, sig1 = ?4, status = {COSIGNED} "
        f"WHERE channel_id = ?1 AND version = ?2 AND status = {IN_FLIGHT}",
        f"UPDATE states SET sig0 = v.column3, sig1 = v.column4, status = {COSIGNED} "
        "FROM (VALUES {}) AS v WHERE states.channel_id = v.column1 "
        f"AND states.version = v.column2 AND states.status = {IN_FLIGHT}",
        4,
        rows,
    )

    def step(db: sqlite3.Connection) -> None:
        for sql, args, chunk in statements:
            if db.execute(sql, args).rowcount != len(chunk):
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
    _retire_below(batch, cid, v)
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


def _retire_below(batch: _Batch, cid: bytes, v: int) -> None:
    if v > batch.burn_below.get(cid, -1):
        batch.burn_below[cid] = v


def _finish(batch: _Batch) -> list[Step]:
    """The per-channel effects of the batch, one multi-row statement each when it touched
    more than a few channels (a hundred keyed statements cost a GIL round trip each).

    Each also checks rule S for the batch's proposals at the store: a proposal must be
    above the channel's latest co-signed version (versions at or below it may have no row
    left to collide with once the history is pruned); ``_note`` checks it against a
    latest set earlier in the same batch."""
    steps = []
    latest = [
        (cid, v, batch.max_signed[cid], batch.first_proposal.get(cid))
        for cid, v in batch.latest.items()
    ]
    if latest:
        steps.append(_set_latest(latest))
    for cid, v in batch.burn_below.items():
        # A new latest retires whatever we still had in flight below it.  One indexed
        # range per channel: a multi-row join over states was slower (~15 us a row).
        steps.append(
            _sql(
                "UPDATE states SET status=? WHERE channel_id=? AND status=? AND version<?",
                (BURNED, cid, IN_FLIGHT, v),
            )
        )
    signed = [
        (cid, v, batch.first_proposal.get(cid))
        for cid, v in batch.max_signed.items()
        if cid not in batch.latest
    ]
    if signed:
        statements = _update_rows(
            "UPDATE channels SET max_signed = max(max_signed, ?2) WHERE channel_id = ?1 "
            "AND (?3 IS NULL OR latest_version IS NULL OR latest_version < ?3)",
            "UPDATE channels SET max_signed = max(channels.max_signed, v.column2) "
            "FROM (VALUES {}) AS v WHERE channels.channel_id = v.column1 "
            "AND (v.column3 IS NULL OR channels.latest_version IS NULL "
            "OR channels.latest_version < v.column3)",
            3,
            signed,
        )
        steps.append(_checked(statements, _explain_signed))
    return steps


def _values_statements(template: str, width: int, rows: list[tuple[Any, ...]]) -> Statements:
    """``template`` with its ``{}`` filled by value tuples, one statement per chunk of
    ``rows``: ``(sql, args, chunk)``."""
    row = "(" + ", ".join(["?"] * width) + ")"
    return [
        (template.format(", ".join([row] * len(c))), [x for r in c for x in r], c)
        for c in _chunks(rows)
    ]


def _set_latest(rows: list[tuple[Any, ...]]) -> Step:
    """Move each channel's latest up to v (and max_signed with it); a channel whose latest
    is already at or above v fails the whole batch: a latest never rolls back.  Rows are
    ``(channel, v, max_signed, lowest proposal of the batch or None)``."""
    statements = _update_rows(
        "UPDATE channels SET latest_version = ?2, max_signed = max(max_signed, ?3) "
        "WHERE channel_id = ?1 AND (latest_version IS NULL OR "
        "(latest_version < ?2 AND (?4 IS NULL OR latest_version < ?4)))",
        "UPDATE channels SET latest_version = v.column2, "
        "max_signed = max(channels.max_signed, v.column3) "
        "FROM (VALUES {}) AS v WHERE channels.channel_id = v.column1 "
        "AND (channels.latest_version IS NULL OR (channels.latest_version < v.column2 "
        "AND (v.column4 IS NULL OR channels.latest_version < v.column4)))",
        4,
        rows,
    )
    return _checked(statements, _explain_latest)


#: ``explain(latest_version, row)``: why the channel of ``row`` refused the update (its
#: latest co-signed version is given), or None if it did not.
Explain: TypeAlias = Callable[[int | None, tuple[Any, ...]], str | None]


def _checked(statements: Statements, explain: Explain) -> Step:
    """Run ``statements``, each of which must change every row it covers; else refuse the
    batch with ``explain``'s reason for the first channel that refused."""

    def step(db: sqlite3.Connection) -> None:
        for sql, args, chunk in statements:
            many = len(chunk) > 1
            if many:  # to find the channel that refused, go back to before the statement
                db.execute("SAVEPOINT checked")
            if db.execute(sql, args).rowcount != len(chunk):
                if many:
                    db.execute("ROLLBACK TO checked")
                for row in chunk:
                    found = db.execute(
                        "SELECT latest_version FROM channels WHERE channel_id = ?", (row[0],)
                    ).fetchone()
                    why = "not in this store" if found is None else explain(found[0], row)
                    if why is not None:
                        raise StoreError(f"channel {row[0].hex()[:16]}: {why}")
                raise StoreError(  # pragma: no cover - a channel named twice
                    f"channel {chunk[0][0].hex()[:16]}: update refused"
                )
            if many:
                db.execute("RELEASE checked")

    return step


def _below_latest(latest: int | None, proposal: int | None) -> str | None:
    if proposal is not None and latest is not None and proposal <= latest:
        return f"a proposal at v{proposal} is not above the latest co-signed v{latest} (rule S)"
    return None


def _explain_latest(latest: int | None, row: tuple[Any, ...]) -> str | None:
    if latest is not None and latest >= row[1]:
        return f"refusing to roll latest back to v{row[1]}"
    return _below_latest(latest, row[3])


def _explain_signed(latest: int | None, row: tuple[Any, ...]) -> str | None:
    return _below_latest(latest, row[2])


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
    PersistRevived: _put_revived,
}

_INSERT, _COMPLETE = object(), object()


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
