"""The update machine: one channel, two parties, no I/O (h11 style).

``ChannelMachine.handle(event) -> list[output]``.  The driver performs the
outputs in order, with one rule: every ``Persist*`` output is durable before any
``Send*`` or ``Notify*`` output that follows it leaves the process.  The responder's
side (the peer's proposals) is :mod:`channel.responder`, the reconnect
:mod:`channel.resync`: functions of the machine, kept apart for size.

The rules
---------
S (safety): a party never signs two different states of one channel with the
  same version.  Hence there is at most one co-signed state per version, and
  the newest co-signed state is unique — the one the adjudicator must honour.
  To keep S across crashes, a proposer persists its half-signed proposal
  (``PersistProposal``) before sending it, and ``max_signed`` (the highest
  version it ever signed) survives restarts.

Propose: ``version = max_signed + 1`` and ``base_version`` names the state it
  was computed from (the latest co-signed one, or the previous in-flight
  proposal when pipelining).  ``ActionPropose`` says which state its allocations
  were computed from, and the machine refuses it unless that is ``tip()`` once
  the peer's held proposals are countersigned (they go first): numbered on top of
  a newer state, allocations computed on an older one would undo what came
  between.  Versions therefore go up by exactly one per
  signed state; a rejected proposal *burns* its version, because the peer
  holds our signature on it and could countersign it later: the next state
  must be strictly newer so that a refute beats it on chain.

Accept (responder): a proposal is accepted iff
  1. it names this channel,                                  (``WrongChannel``)
  2. the channel is not final,
  3. we have no proposal of our own in flight (else: conflict, below),
  4. ``base_version`` is our latest co-signed version and the version is
     above everything we have signed,                          (``StaleVersion``)
  5. every asset's total is unchanged,                    (``ConservationError``)
  6. it is signed by the peer (low-s, v 27/28),              (``InvalidSignature``)
  7. the acceptance policy (risk limits) agrees.
  (4, 5 and 7 are judged against the newest proposal it has checked but not yet
  countersigned, if there is one, else against the latest co-signed state.)
  Anything else is answered with ``Reject`` and leaves the state unchanged.

  The responder then countersigns, ``PersistLatest``, and sends ``Accept`` — at once,
  or, with ``defer`` (the client's setting), as below.

Countersign with ``defer``: a proposal that passed 1-5 and 7 waits (``deferred``)
  until the driver has handled every frame it has read (``ActionCountersign``), or
  until ``MAX_DEFERRED`` wait.  Then the responder checks the newest one's signature
  (6; failing that, it rejects it and tries the one before), countersigns that one
  only, ``PersistLatest``, and sends one ``Accept`` for it.  An ``Accept`` for version
  v accepts every proposal of the peer up to v (the proposer handles it so with or
  without ``defer``): each was built on the one before, and the co-signed v
  supersedes them all on chain, so the earlier ones need no countersignature, nor an
  fsync, of their own.  Rule S holds: the responder signs nothing but v.  A lone
  proposal (lock-step) is countersigned as soon as it is read, as before.

Conflict: when both parties propose at once, the party with the lower address wins.
  The winner refuses the crossing proposal (rule 3, ``ProposalConflict``) and keeps its
  own in flight.  The loser (``should_yield``) accepts the winner's proposal instead of
  refusing it — dropping its own in-flight proposals, which the client retries — when
  that is safe: the proposal builds on the loser's latest state and its version is above
  everything the loser signed (rule S).  A proposal on our latest whose version collides
  with one we signed is a conflict too (retryable), never a replay.  Each side learns
  the other's signed versions from crossing proposals and ``Sync`` (``peer_max_signed``)
  and numbers its retries above them.  The client adds turn-taking (see docs/protocol.md).

Burned: the peer holds our signature on each proposal it rejected (or that was dropped
  as superseded), and may countersign it after all, until a newer state is co-signed:
  an honest peer never does, but nothing stops one.  A ``Sync`` (or a late ``Accept``)
  that brings such a state co-signed is adopted like any newer co-signed state (it is
  the one the adjudicator would honour); :mod:`channel.revival` settles what it holds.
  A retry carries the update id of the update it retries, so an update is never made
  twice; an update is reported made (``NotifyAccepted``, ``revived=True`` if it was
  reported rejected) only once no burned proposal lacking it could still come back;
  one held that a later revived state lacks is reported undone (retryable).  The
  machine remembers the burned proposals above its latest version (``burned``), at
  most ``MAX_BURNED``.

Reconnect: each side sends ``Sync`` (latest co-signed, ``max_signed``), then
  its half-signed proposals again as ``Propose`` messages (a ``Sync`` may also
  carry them inside, as earlier releases sent it).  A newer co-signed state from the peer is checked
  (both signatures, conservation) and adopted; the peer's half-signed
  proposals are then handled exactly like fresh ``Propose`` messages — so each
  is completed (accepted) or dropped (rejected), and both sides end on the same
  latest co-signed version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from channel import responder, resync, revival
from channel.codec import Accept, Open, Propose, Sync
from channel.eip712 import state_digest
from channel.errors import (
    ChannelError,
    ConservationError,
    InvalidSignature,
    LocalProtocolError,
    StaleVersion,
    WrongChannel,
)
from channel.events import (
    ROW_CHECK,
    ROW_NEW,
    ROW_OWN,
    ActionConnected,
    ActionCountersign,
    ActionPropose,
    InFlight,
    Input,
    NotifyAccepted,
    NotifyProtocolError,
    NotifyReceived,
    NotifyRejected,
    Output,
    PersistDropProposals,
    PersistLatest,
    PersistProposal,
    PersistRevived,
    ReceiveAccept,
    ReceivePropose,
    ReceiveReject,
    ReceiveSync,
    SendMessage,
)
from channel.keys import verify
from channel.limits import MAX_BURNED, MAX_VERSION, PIPELINE_WINDOW
from channel.state import Params, SignedState, State

#: ``policy(params, latest, proposed) -> None`` to accept or a reason to reject.
Policy: TypeAlias = Callable[[Params, State, State], "str | None"]
Sign: TypeAlias = Callable[[bytes], bytes]

REASON_CONFLICT = responder.REASON_CONFLICT


class ChannelMachine:
    """The update protocol of one channel as seen by one participant."""

    def __init__(
        self,
        *,
        params: Params,
        me: int,
        sign: Sign,
        latest: SignedState | None,
        max_signed: int,
        pending: list[InFlight] | None = None,
        policy: Policy | None = None,
        window: int = PIPELINE_WINDOW,
        defer: bool = False,
    ) -> None:
        """``defer``: hold the peer's checked proposals for ``ActionCountersign`` (see
        "Countersign"); a driver that sets it sends that before it waits for input."""
        if me not in (0, 1):
            raise ValueError("me must be 0 or 1")
        self.params = params
        self.me = me
        self.peer = 1 - me
        self._sign = sign
        self.latest = latest
        self.max_signed = max_signed
        #: The highest version the peer has shown us its signature on: our next proposal
        #: goes above it too, or the peer would have to refuse it (rule S on its side).
        self.peer_max_signed = 0
        self.pending: list[InFlight] = list(pending or [])
        self.policy = policy
        self.window = window
        self.my_address = params.participants[me]
        self.peer_address = params.participants[1 - me]
        #: The party with the higher address yields after a conflict.
        self.should_yield = self.my_address > self.peer_address
        #: The last peer message was a ``Sync``, or a proposal it re-sent after it.
        self._after_sync = False
        #: The peer's proposals that passed every check but the signature, oldest first,
        #: each with its digest: the newest is countersigned on ``ActionCountersign``.
        self.deferred: list[tuple[Propose, bytes]] = []
        self.defer = defer
        #: Our proposals dropped (rejected, superseded) above the latest version, oldest
        #: first: the peer may still countersign one (see "Burned").
        self.burned: list[InFlight] = []
        #: Updates a state the peer brought (``revival.adopt``) holds, not yet reported:
        #: a burned proposal of ours could still undo them.  Update id -> (its
        #: proposal's version, whether it was reported rejected).
        self.held: dict[int, tuple[int, bool]] = {}
        #: Updates reported rejected that such a state made after all: a retry of one is
        #: answered as accepted, never signed again (at most ``MAX_BURNED``, newest).
        self.made: dict[int, SignedState] = {}
        #: While anything is burned or held: the update ids each known state holds
        #: (``channel.revival``); None otherwise.
        self.content: dict[int, frozenset[int]] | None = None
        #: While tracking: the updates reported accepted since tracking began.
        self.reported: set[int] = set()

    # -- constructors -------------------------------------------------------

    @classmethod
    def open(
        cls,
        *,
        params: Params,
        me: int,
        sign: Sign,
        initial: State,
        update_id: int,
        policy: Policy | None = None,
        window: int = PIPELINE_WINDOW,
        defer: bool = False,
    ) -> tuple[ChannelMachine, list[Output]]:
        """Start opening a channel: sign version 0 and ask the peer to countersign."""
        if initial.version != 0 or initial.channel_id != params.channel_id:
            raise LocalProtocolError("the initial state must be version 0 of this channel")
        digest = state_digest(params, initial)
        sig = sign(digest)
        proposal = Propose(base_version=0, state=initial, signature=sig)
        m = cls(
            params=params,
            me=me,
            sign=sign,
            latest=None,
            max_signed=0,
            pending=[InFlight(update_id=update_id, proposal=proposal, digest=digest)],
            policy=policy,
            window=window,
            defer=defer,
        )
        return m, [
            PersistProposal(params=params, me=me, base_version=0, state=initial, signature=sig),
            SendMessage(Open(params=params, state=initial, signature=sig)),
        ]

    @classmethod
    def accept_open(
        cls,
        *,
        msg: Open,
        me: int,
        sign: Sign,
        policy: Policy | None = None,
        window: int = PIPELINE_WINDOW,
        defer: bool = False,
    ) -> tuple[ChannelMachine, list[Output]]:
        """Countersign a peer's ``Open``; raises ``RemoteProtocolError`` if it is invalid.

        The caller has already checked that the connection's key is the other participant
        and that its own policy wants this channel.
        """
        params, state = msg.params, msg.state
        digest = cls.check_open(msg, me)
        sigs: list[bytes | None] = [None, None]
        sigs[1 - me] = msg.signature
        sigs[me] = sign(digest)
        signed = SignedState(state=state, signatures=(sigs[0], sigs[1]))
        m = cls(
            params=params,
            me=me,
            sign=sign,
            latest=signed,
            max_signed=0,
            policy=policy,
            window=window,
            defer=defer,
        )
        accept = Accept(channel_id=params.channel_id, version=0, signature=sigs[me] or b"")
        return m, [
            PersistLatest(params=params, signed=signed, row=ROW_NEW),
            SendMessage(accept),
            NotifyReceived(signed=signed),
        ]

    @staticmethod
    def check_open(msg: Open, me: int) -> bytes:
        """The digest of a peer's valid ``Open``; raises ``RemoteProtocolError`` if it is
        not one (nothing is signed: ask policies only after this)."""
        params, state = msg.params, msg.state
        if state.channel_id != params.channel_id:
            raise WrongChannel("Open: the state names another channel")
        if state.version != 0 or state.is_final:
            raise StaleVersion("Open: the initial state must be version 0 and not final")
        if any(a.locked for a in state.allocations):
            raise ConservationError("Open: the initial state must lock nothing")
        digest = state_digest(params, state)
        verify(digest, msg.signature, params.participants[1 - me])
        return digest

    # -- queries ------------------------------------------------------------

    @property
    def channel_id(self) -> bytes:
        return self.params.channel_id

    @property
    def is_open(self) -> bool:
        return self.latest is not None

    def tip(self) -> State:
        """The state the next proposal builds on: our last in-flight one, else the newest
        proposal of the peer's that is checked and awaits our countersignature (ours is
        countersigned first), else the latest.  Countersign those first
        (``ActionCountersign``) to be sure of it: one whose signature then fails is
        rejected, and the tip moves back."""
        if self.pending:
            return self.pending[-1].proposal.state
        if self.deferred:
            return self.deferred[-1][0].state
        if self.latest is None:
            raise LocalProtocolError(f"channel {self.channel_id.hex()[:16]} is not open yet")
        return self.latest.state

    def window_full(self) -> bool:
        return len(self.pending) >= self.window

    def sync_messages(self) -> list[Sync | Open | Propose]:
        """What we tell a peer on (re)connect (see :func:`channel.resync.sync_messages`)."""
        return resync.sync_messages(self)

    # -- the dispatcher -----------------------------------------------------

    def handle(self, event: Input) -> list[Output]:
        """Advance the machine; raises only ``LocalProtocolError`` (our caller's mistake)."""
        t = type(event)
        handler = _DISPATCH.get(t)
        if handler is None:
            raise TypeError(f"unknown input {t.__name__}")
        if t is ReceiveSync:
            self._after_sync = True
        elif isinstance(event, ReceivePropose):
            if self._after_sync and resync.is_resent(self, event.msg):
                return []
            self._after_sync = False  # the re-sent ones come first, in version order
        elif t is not ActionPropose and t is not ActionCountersign:
            self._after_sync = False
        return handler(self, event)

    # -- local actions ------------------------------------------------------

    def _on_propose_action(self, ev: ActionPropose) -> list[Output]:
        if self.content is not None or self.made:
            # A retry of an update that a revived proposal made: not made twice.
            answer = revival.answer_made(self, ev.update_id)
            if answer is not None:
                return answer
        if not self.deferred:
            return self._propose(ev)
        # The peer's checked proposals first: ours builds on them.  Refused before any
        # countersignature if it was not computed on them; after, the countersignatures
        # stand whatever becomes of ours (outputs the driver must perform), so a refusal
        # is a notice, retryable if a bad signature of the peer's moved the tip back.
        self._check_base(ev)  # nothing is signed yet
        done = responder.on_countersign(self)
        try:
            return [*done, *self._propose(ev)]
        except LocalProtocolError as exc:
            moved = ev.base_version != self.tip().version
            refusal = NotifyRejected(
                channel_id=self.params.channel_id,
                update_id=ev.update_id,
                version=self.tip().version,  # ours got none: nothing was signed
                reason=f"{REASON_CONFLICT}: {exc}" if moved else str(exc),
                retryable=moved,
            )
            return [*done, refusal]

    def _check_base(self, ev: ActionPropose) -> None:
        tip = self.tip()
        if ev.base_version != tip.version:
            # Numbered on top of the tip, allocations computed from an older state would
            # undo whatever came between (a payment of the peer's that it saw co-signed).
            raise LocalProtocolError(
                f"channel {self.channel_id.hex()[:16]}: the update was computed on "
                f"v{ev.base_version}, but the next state builds on v{tip.version}"
            )

    def _propose(self, ev: ActionPropose) -> list[Output]:
        tip = self.tip()
        if self.latest is not None and self.latest.state.is_final:
            raise LocalProtocolError(f"channel {self.channel_id.hex()[:16]} is final")
        self._check_base(ev)
        if tip.is_final:
            raise LocalProtocolError("a final state is already in flight")
        if self.window_full():
            raise LocalProtocolError(f"pipeline window of {self.window} is full")
        self.prune_burned()
        if len(self.burned) >= MAX_BURNED:
            raise LocalProtocolError(
                f"channel {self.channel_id.hex()[:16]}: the peer refused {len(self.burned)} "
                "proposals since the last co-signed state; none is signed until it co-signs one"
            )
        version = max(self.max_signed, self.peer_max_signed) + 1
        if version > MAX_VERSION:
            raise LocalProtocolError(
                f"channel {self.channel_id.hex()[:16]} has used up its versions (v{MAX_VERSION})"
            )
        new = State(
            channel_id=self.params.channel_id,
            version=version,
            allocations=ev.allocations,
            app_data=ev.app_data,
            is_final=ev.is_final,
        )
        try:
            tip.check_successor(new)
        except ConservationError as exc:
            raise LocalProtocolError(str(exc)) from None
        digest = state_digest(self.params, new)
        sig = self._sign(digest)
        proposal = Propose(base_version=tip.version, state=new, signature=sig)
        self.max_signed = version
        flight = InFlight(update_id=ev.update_id, proposal=proposal, digest=digest)
        self.pending.append(flight)
        if self.content is not None:
            revival.note_proposal(self, flight)
        return [
            PersistProposal(
                params=self.params, me=self.me, base_version=tip.version, state=new, signature=sig
            ),
            SendMessage(proposal),
        ]

    def _on_connected(self, ev: ActionConnected) -> list[Output]:
        # Nothing of the deferred proposals was signed or stored: the peer sends them
        # again after its Sync, on this new link.
        self.deferred.clear()
        return [SendMessage(m) for m in self.sync_messages()]

    # -- the peer's messages -------------------------------------------------

    def _on_accept(self, ev: ReceiveAccept) -> list[Output]:
        a = ev.msg
        cid = self.params.channel_id.hex()[:16]
        if a.channel_id != self.params.channel_id:
            return [
                NotifyProtocolError(error=WrongChannel(f"Accept for another channel than {cid}"))
            ]
        # An Accept names one of our in-flight proposals, and accepts it and every one
        # before it (see "Countersign").  Their versions are usually consecutive, but not
        # always (a proposal made after learning of higher versions of the peer's skips
        # ahead): look the version up, never trust the arithmetic alone.
        i = a.version - self.pending[0].proposal.state.version if self.pending else -1
        if not (0 <= i < len(self.pending) and self.pending[i].proposal.state.version == a.version):
            i = next(
                (k for k, f in enumerate(self.pending) if f.proposal.state.version == a.version),
                -1,
            )
        if i < 0:
            return self._on_late_accept(a)
        head = self.pending[i]
        try:
            verify(head.digest, a.signature, self.peer_address)
        except InvalidSignature as err:
            return [NotifyProtocolError(error=err)]
        sigs: list[bytes | None] = [None, None]
        sigs[self.me] = head.proposal.signature
        sigs[self.peer] = a.signature
        signed = SignedState(state=head.proposal.state, signatures=(sigs[0], sigs[1]))
        self.latest = signed
        done = self.pending[: i + 1]
        del self.pending[: i + 1]
        out: list[Output] = [
            PersistLatest(params=self.params, signed=signed, row=ROW_OWN, retires_below=i > 0),
            *(NotifyAccepted(update_id=f.update_id, signed=signed) for f in done),
        ]
        if self.content is not None:
            revival.note_reported(self, [f.update_id for f in done])
            out.extend(revival.after_latest(self))
        return out

    def _on_late_accept(self, a: Accept) -> list[Output]:
        """An ``Accept`` for no proposal in flight: for a burned one, the peer
        countersigned what it refused, and the state is adopted as from a ``Sync``."""
        cid = self.params.channel_id.hex()[:16]
        burned = next((f for f in self.burned if f.proposal.state.version == a.version), None)
        if burned is None or self.latest is None or a.version <= self.latest.state.version:
            return [
                NotifyProtocolError(
                    error=StaleVersion(
                        f"channel {cid}: Accept for v{a.version} we are not awaiting"
                    )
                )
            ]
        sigs: list[bytes | None] = [None, None]
        sigs[self.me] = burned.proposal.signature
        sigs[self.peer] = a.signature
        signed = SignedState(state=burned.proposal.state, signatures=(sigs[0], sigs[1]))
        try:
            return revival.adopt(self, signed)
        except ChannelError as err:
            return [NotifyProtocolError(error=err)]

    def prune_burned(self) -> None:
        """Forget the burned proposals at or below the latest version: only a newer state
        is ever adopted, so none of them can come back.  (The list is not in version
        order: a pipelined proposal may burn after a later one.)"""
        if self.burned and self.latest is not None:
            v = self.latest.state.version
            if any(f.proposal.state.version <= v for f in self.burned):
                self.burned = [f for f in self.burned if f.proposal.state.version > v]

    def _drop_from(
        self, index: int, reason: str, retryable: bool, done: frozenset[int] = frozenset()
    ) -> list[Output]:
        """Drop our proposals from ``index`` on (they burn); each update is reported
        rejected, but those in ``done`` (updates a revived state made: see "Burned")."""
        revival.track(self)  # before anything burns: what each state holds
        dead = self.pending[index:]
        del self.pending[index:]
        self.burned.extend(dead)
        out: list[Output] = [
            PersistDropProposals(params=self.params, from_version=dead[0].proposal.state.version)
        ]
        for i, f in enumerate(dead):
            if f.update_id in done:
                continue
            out.append(
                NotifyRejected(
                    channel_id=self.params.channel_id,
                    update_id=f.update_id,
                    version=f.proposal.state.version,
                    reason=reason
                    if i == 0
                    else f"built on rejected v{dead[0].proposal.state.version}",
                    retryable=retryable or i > 0,
                )
            )
        return out

    def _on_reject(self, ev: ReceiveReject) -> list[Output]:
        r = ev.msg
        for i, f in enumerate(self.pending):
            if f.proposal.state.version == r.version and f.digest == r.state_hash:
                retryable = r.reason.startswith(REASON_CONFLICT)
                return self._drop_from(i, r.reason, retryable)
        # A reject for something already resolved (e.g. after a resync): nothing to do.
        return []


_DISPATCH: dict[type, Callable[[ChannelMachine, object], list[Output]]] = {
    ActionPropose: ChannelMachine._on_propose_action,  # type: ignore[dict-item]
    ActionConnected: ChannelMachine._on_connected,  # type: ignore[dict-item]
    ActionCountersign: responder.on_countersign,  # type: ignore[dict-item]
    ReceivePropose: responder.on_propose,  # type: ignore[dict-item]
    ReceiveAccept: ChannelMachine._on_accept,  # type: ignore[dict-item]
    ReceiveReject: ChannelMachine._on_reject,  # type: ignore[dict-item]
    ReceiveSync: resync.on_sync,  # type: ignore[dict-item]
}

__all__ = [
    "REASON_CONFLICT",
    "ROW_CHECK",
    "ROW_NEW",
    "ROW_OWN",
    "ActionConnected",
    "ActionCountersign",
    "ActionPropose",
    "ChannelMachine",
    "InFlight",
    "Input",
    "NotifyAccepted",
    "NotifyProtocolError",
    "NotifyReceived",
    "NotifyRejected",
    "Output",
    "PersistDropProposals",
    "PersistLatest",
    "PersistProposal",
    "PersistRevived",
    "Policy",
    "ReceiveAccept",
    "ReceivePropose",
    "ReceiveReject",
    "ReceiveSync",
    "SendMessage",
    "Sign",
]
