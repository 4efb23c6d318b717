"""The error vocabulary of optichannel.

Every failure a caller can see is one of these.  The split follows h11: a
``LocalProtocolError`` is *our* caller's mistake (an update that breaks
conservation, proposing on a closed channel); a ``RemoteProtocolError`` is the
*peer's* (a bad signature, a rolled-back version).  A remote error never
changes durable state: the offending message is refused and the channel keeps
working with an honest peer.
"""

from __future__ import annotations


class ChannelError(Exception):
    """Base of every optichannel error."""


class LocalProtocolError(ChannelError):
    """The local caller asked for something the protocol forbids."""


class RemoteProtocolError(ChannelError):
    """The peer sent something the protocol forbids; it was refused."""


class InvalidSignature(RemoteProtocolError):
    """A signature is malformed, high-s, has a bad v, or is by the wrong key."""


class StaleVersion(RemoteProtocolError):
    """A version that is replayed, rolled back, or skips ahead."""


class ProposalConflict(RemoteProtocolError):
    """Both parties proposed at once; both proposals are refused and may be retried."""


class ChannelFinal(RemoteProtocolError):
    """The peer proposed an update to a channel whose latest state is final."""


class ConservationError(ChannelError):
    """An update changes the total held for some asset, or goes negative."""


class WrongChannel(RemoteProtocolError):
    """A message names a channel id this party does not hold with that peer."""


class UnknownPeer(RemoteProtocolError):
    """A message or connection from a key that is not a party to the channel."""


class DecodeError(RemoteProtocolError):
    """A wire frame that is not a well-formed message of a known type."""


class OversizeError(DecodeError):
    """A frame longer than ``channel.codec.MAX_FRAME``."""


class TransportError(ChannelError):
    """The encrypted transport failed: handshake, MAC, framing, or the socket."""


class HandshakeError(TransportError):
    """The BOLT 8 handshake failed (bad version byte, bad key, bad MAC)."""


class PeerTimeout(TransportError):
    """The peer did not answer within its deadline."""


class UpdateRejected(ChannelError):
    """The peer (or our own policy) refused a proposed update, with a reason."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(ChannelError):
    """The durable store is unusable (schema from the future, corrupt file)."""


class ChainError(ChannelError):
    """A chain backend call failed."""


class FundsAtRiskError(ChannelError):
    """A condition where funds may be lost unless someone acts.  Never swallow it."""


class Reverted(ChainError):
    """A call or transaction reverted; ``data`` is the revert data (custom error)."""

    def __init__(self, message: str, *, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data
