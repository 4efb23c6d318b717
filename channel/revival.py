"""Burned proposals that come back, for :mod:`channel.machine` ("Burned" in its docstring).

The peer holds our signature on every proposal of ours it refused (or that was dropped
as superseded), and may countersign one after all while no newer state is co-signed:
an honest peer never does.  It then brings it in a ``Sync`` or a late ``Accept``, and
the machine adopts it (:func:`adopt`): it is the newest co-signed state, the one the
adjudicator would honour.  What that state holds is settled here, so that

* an update is never made twice: a retry keeps the update id of the update it retries,
  and an update already in the state is answered, never proposed again
  (:func:`answer_made`);
* an update is reported made only when no burned proposal lacking it could still
  become the newest co-signed state and undo it (it is *held* until then), and one
  reported made is never undone;
* an update held that a later revived state lacks is reported undone (retryable).

For that the machine tracks, while any proposal of ours is burned or any update held,
the update ids each state it knows holds (``content``: version -> ids, relative to the
latest state when tracking began).  In normal operation nothing is burned, ``content``
is ``None`` and none of this runs.  No I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel import responder
from channel.eip712 import state_digest
from channel.errors import InvalidSignature, StaleVersion
from channel.events import (
    InFlight,
    NotifyAccepted,
    NotifyRejected,
    Output,
    PersistLatest,
    PersistRevived,
)
from channel.keys import verify
from channel.limits import MAX_BURNED
from channel.state import SignedState

if TYPE_CHECKING:
    from channel.machine import ChannelMachine

EMPTY: frozenset[int] = frozenset()
REASON_UNDONE = "undone: the peer brought a newer co-signed state without it"


def track(m: ChannelMachine) -> dict[int, frozenset[int]]:
    """Start tracking what each state holds (before anything is burned), if not yet."""
    if m.content is None:
        base = -1 if m.latest is None else m.latest.state.version
        content: dict[int, frozenset[int]] = {base: EMPTY}
        for f in m.pending:
            content[f.proposal.state.version] = content.get(f.proposal.base_version, EMPTY) | {
                f.update_id
            }
        m.content = content
        m.reported = set()
    return m.content


def note_proposal(m: ChannelMachine, f: InFlight) -> None:
    if m.content is not None:
        m.content[f.proposal.state.version] = m.content.get(f.proposal.base_version, EMPTY) | {
            f.update_id
        }


def note_countersigned(m: ChannelMachine, version: int, base_version: int) -> None:
    """We countersigned the peer's proposal ``version`` on our latest ``base_version``."""
    if m.content is not None:
        m.content[version] = m.content.get(base_version, EMPTY)


def note_reported(m: ChannelMachine, update_ids: list[int]) -> None:
    if m.content is not None:
        m.reported.update(update_ids)


def answer_made(m: ChannelMachine, update_id: int) -> list[Output] | None:
    """The answer to a proposal of an update that is made or held already (a retry of
    one a revived state holds), or None to propose it."""
    if update_id in m.held:
        return []  # reported with the state that makes it
    made = m.made.get(update_id)
    if made is not None:
        return [NotifyAccepted(update_id=update_id, signed=made, revived=True)]
    if m.content is not None and m.latest is not None:
        v = m.latest.state.version
        if update_id in m.content.get(v, EMPTY):
            # Made by the latest state: reported as the held ones are, once nothing could
            # undo it (at once, unless a burned proposal lacking it is about).
            m.held[update_id] = (v, True)
            return after_latest(m)
        if any(f.update_id == update_id for f in m.pending):
            return []  # in flight already: reported when it is accepted
    return None


def adopt(m: ChannelMachine, theirs: SignedState) -> list[Output]:
    """Make ``theirs``, a co-signed state newer than our latest that the peer brought (in
    a ``Sync``, or an ``Accept`` for a burned proposal), our latest, and settle our
    proposals by it.  Raises ``ChannelError`` (nothing changed) if it does not check."""
    v = theirs.state.version
    if m.latest is not None and v <= m.latest.state.version:
        raise StaleVersion(f"v{v} is not above our latest v{m.latest.state.version}")
    check_cosigned(m, theirs)
    content = track(m)
    # The peer's proposals we checked against the latest this replaces: refused (it
    # sends them again, built on what it co-signed, or they were never ours to sign).
    stale, m.deferred = m.deferred, []
    refused: list[Output] = []
    for p, digest in stale:
        refused.extend(
            responder.reject(
                m,
                p.state,
                digest,
                StaleVersion(f"v{p.state.version} was built on v{p.base_version}, now v{v}"),
            )
        )
    m.latest = theirs
    m.max_signed = max(m.max_signed, v)
    out: list[Output] = [
        PersistLatest(params=m.params, signed=theirs),
        PersistRevived(params=m.params, version=v),
        *refused,
    ]
    have = content.get(v)
    if have is None:
        # None of our proposals of this run (one refused before a restart): no update to
        # name, but the client must hear of it.
        have = content[v] = EMPTY
        out.append(NotifyAccepted(update_id=0, signed=theirs, revived=True))
    settled: list[InFlight] = []
    while m.pending and m.pending[0].proposal.state.version <= v:
        settled.append(m.pending.pop(0))
    in_flight = {f.update_id for f in settled}
    for f in settled:
        if f.update_id not in have:
            out.append(
                NotifyRejected(
                    channel_id=m.params.channel_id,
                    update_id=f.update_id,
                    version=f.proposal.state.version,
                    reason="superseded on resync",
                    retryable=True,
                )
            )
    # The updates it makes that were not reported made: awaited, or reported refused.
    versions = {f.update_id: f.proposal.state.version for f in (*m.burned, *settled)}
    for uid in sorted(have - m.reported - m.held.keys()):
        m.held[uid] = (versions.get(uid, v), uid not in in_flight)
    made = have | frozenset(m.held)
    cut = next(
        (
            i
            for i, f in enumerate(m.pending)
            if f.update_id in made or (i == 0 and f.proposal.base_version != v)
        ),
        -1,
    )
    if cut >= 0:
        out.extend(m._drop_from(cut, "superseded on resync", True, made))
    out.extend(after_latest(m))
    return out


def after_latest(m: ChannelMachine) -> list[Output]:
    """The latest state changed (while tracking): report what is settled now."""
    if m.content is None or m.latest is None:
        return []
    m.prune_burned()
    latest = m.latest
    v = latest.state.version
    have = m.content.get(v, EMPTY)
    out: list[Output] = []
    for uid, (version, _) in list(m.held.items()):
        if uid not in have:
            del m.held[uid]
            m.made.pop(uid, None)
            out.append(
                NotifyRejected(
                    channel_id=m.params.channel_id,
                    update_id=uid,
                    version=version,
                    reason=REASON_UNDONE,
                    retryable=True,
                )
            )
    held = frozenset(m.held)
    if held and all(held <= m.content.get(f.proposal.state.version, EMPTY) for f in m.burned):
        for uid, (_, revived) in m.held.items():
            out.append(NotifyAccepted(update_id=uid, signed=latest, revived=revived))
            if revived:
                _remember_made(m, uid, latest)
            m.reported.add(uid)
        m.held.clear()
    if not m.burned and not m.held:
        m.content = None  # nothing can come back: stop tracking
        m.reported = set()
        return out
    content = {k: c for k, c in m.content.items() if k >= v}
    # What every state still tracked holds, and was reported, need not be tracked: a
    # peer that keeps one proposal burned at all times would else grow every set (and
    # each new proposal's copy of one) by every update.
    common = frozenset.intersection(*content.values()) - m.held.keys()
    if common:
        content = {k: c - common for k, c in content.items()}
        m.reported -= common
    m.content = content
    return out


def _remember_made(m: ChannelMachine, update_id: int, signed: SignedState) -> None:
    m.made[update_id] = signed
    while len(m.made) > MAX_BURNED:
        del m.made[next(iter(m.made))]


def check_cosigned(m: ChannelMachine, signed: SignedState) -> None:
    if not signed.fully_signed:
        raise InvalidSignature("a co-signed state must carry both signatures")
    digest = state_digest(m.params, signed.state)
    for i in (0, 1):
        sig = signed.signatures[i]
        assert sig is not None
        verify(digest, sig, m.params.participants[i])
    if m.latest is not None:
        m.latest.state.check_successor(signed.state)
    elif m.pending:
        m.pending[0].proposal.state.check_successor(signed.state)
