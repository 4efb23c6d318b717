"""The update machine's inputs and outputs (``channel.machine`` re-exports them).

Names say the direction: inputs are ``Action*`` (our caller) and ``Receive*`` (the
peer); outputs are ``Persist*`` (durable before anything after them leaves),
``Send*`` and ``Notify*``.  All frozen values: a machine step never mutates one.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from channel import codec
from channel.codec import Accept, Propose, Reject, Sync
from channel.errors import ChannelError
from channel.state import Allocation, Params, SignedState, State

# ---------------------------------------------------------------------------
# inputs


@attrs.frozen(kw_only=True)
class ActionPropose:
    """Our caller wants the next state to hold these allocations, computed from the state
    of version ``base_version``: the machine's ``tip()`` when the caller looked.  A
    proposal whose base is no longer the tip is refused (``LocalProtocolError``), never
    numbered on top of a state its allocations ignore."""

    update_id: int
    allocations: tuple[Allocation, ...]
    base_version: int
    app_data: bytes = b""
    is_final: bool = False


@attrs.frozen
class ActionConnected:
    """The transport to the peer is up: tell it where we stand."""


@attrs.frozen
class ActionCountersign:
    """The peer's proposals read so far are all handled: countersign the newest one
    that passed every check (the driver sends this before it waits for more bytes)."""


@attrs.frozen
class ReceivePropose:
    msg: Propose


@attrs.frozen
class ReceiveAccept:
    msg: Accept


@attrs.frozen
class ReceiveReject:
    msg: Reject


@attrs.frozen
class ReceiveSync:
    msg: Sync


Input: TypeAlias = (
    ActionPropose
    | ActionConnected
    | ActionCountersign
    | ReceivePropose
    | ReceiveAccept
    | ReceiveReject
    | ReceiveSync
)


# ---------------------------------------------------------------------------
# outputs


@attrs.frozen(kw_only=True)
class PersistProposal:
    """Our half-signed proposal; durable before it is sent (it raises max_signed)."""

    params: Params
    me: int
    base_version: int
    state: State
    signature: bytes


#: How the store writes a ``PersistLatest`` (the machine knows, so the store need not look):
#: a version we never signed (a plain insert), our own in-flight proposal now
#: countersigned (complete that row), or anything else (check against what is stored).
ROW_NEW, ROW_OWN, ROW_CHECK = "new", "own", "check"


@attrs.frozen(kw_only=True)
class PersistLatest:
    """A new latest co-signed state; also retires our proposals up to its version.

    ``retires_below``: with ``ROW_OWN``, our in-flight proposals below it were accepted
    by the same ``Accept`` and leave the in-flight set (``ROW_CHECK`` always does that)."""

    params: Params
    signed: SignedState
    row: str = ROW_CHECK
    retires_below: bool = False


@attrs.frozen(kw_only=True)
class PersistRevived:
    """The latest co-signed state (just persisted) is a proposal of ours the peer refused
    and brought back (``channel.revival``): marked, so that a restart can warn while it
    is still the latest (updates it held but had not reported then never are)."""

    params: Params
    version: int


@attrs.frozen(kw_only=True)
class PersistDropProposals:
    """Our in-flight proposals from ``from_version`` on are dead (their versions stay burned)."""

    params: Params
    from_version: int


@attrs.frozen
class SendMessage:
    msg: codec.Message


@attrs.frozen(kw_only=True)
class NotifyAccepted:
    """Our proposal ``update_id`` is co-signed (and durable).

    ``signed`` is normally that proposal's state; after a resync it may be a newer
    co-signed state that includes the update (the peer's signatures on the
    intermediate versions were lost with the connection).

    ``revived``: the update was reported rejected (``NotifyRejected``) earlier, and the
    peer countersigned that proposal after all (``channel.machine``, "Burned")."""

    update_id: int
    signed: SignedState
    revived: bool = False


@attrs.frozen(kw_only=True)
class NotifyRejected:
    update_id: int
    channel_id: bytes
    version: int
    reason: str
    retryable: bool


@attrs.frozen(kw_only=True)
class NotifyReceived:
    """The peer's proposal is now co-signed by us (and durable)."""

    signed: SignedState


@attrs.frozen(kw_only=True)
class NotifyProtocolError:
    """The peer sent something we refused; state is unchanged."""

    error: ChannelError
    channel_id: bytes = b""


Output: TypeAlias = (
    PersistProposal
    | PersistLatest
    | PersistDropProposals
    | PersistRevived
    | SendMessage
    | NotifyAccepted
    | NotifyRejected
    | NotifyReceived
    | NotifyProtocolError
)


@attrs.frozen(kw_only=True)
class InFlight:
    update_id: int
    proposal: Propose
    digest: bytes
