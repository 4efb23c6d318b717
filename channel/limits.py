"""Protocol-wide size and time limits, set in exactly one place."""

from __future__ import annotations

#: Largest plaintext message in one transport frame (BOLT 8 caps it at 65535).
MAX_FRAME = 65535
#: Seconds a peer has to complete the BOLT 8 handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a peer has to answer a proposal before the update is abandoned.
UPDATE_TIMEOUT = 10.0
#: The suggested ``open_client(busy_poll=...)`` for a client with a core to itself: the
#: seconds the Trio loop keeps polling its sockets after it sent frames instead of
#: blocking (``channel.busypoll``), longer than a lock-step answer takes here (~0.5 ms),
#: short enough that an idle link stops costing CPU at once.  Off by default.
BUSY_POLL = 0.001
#: Proposals a proposer may have in flight at once on one channel.  Each pipelined
#: update waits for three fsyncs (ours, the peer's, ours) on top of the round trip; a
#: window of 256 keeps enough in flight to hide that latency (64 left both parties
#: idle part of the time: 2.7k/s against 3.2k/s, benchmarks/README.md).  Re-sent
#: proposals travel one per frame on reconnect, so the window is not bound by the frame.
PIPELINE_WINDOW = 256
#: Proposals a responder holds checked but not yet countersigned: it countersigns only
#: the newest of what it has read (one signature, one fsync and one ``Accept`` for the
#: lot), and at the latest when this many are waiting.
MAX_DEFERRED = 64
#: Our rejected proposals a machine remembers while no newer state is co-signed (the
#: peer holds our signature on each and may still countersign it: see "Burned" in
#: ``channel.machine``).  A proposer with this many refuses to sign another until the
#: peer co-signs something.
MAX_BURNED = 4 * PIPELINE_WINDOW
#: The highest version a state may have.  The adjudicator takes a uint64, but a store
#: keeps versions in SQLite's signed 64-bit INTEGER: a proposal above this is refused
#: (``StaleVersion``), and a channel that reaches it takes no more updates (it can still
#: be claimed and settled on chain with its latest state).
MAX_VERSION = 2**63 - 1
#: Live (not closed) channels one counterparty may have with us before we refuse its
#: ``Open``s: an ``Open`` costs its sender a handshake and nothing else, and each channel
#: costs us memory, rows and a resync on every reconnect.  ``open_client`` takes another.
MAX_CHANNELS_PER_PEER = 16
#: Live channels in all past which we refuse every peer's ``Open`` (ours still open):
#: new keys cost nothing, so the cap per peer alone does not bound the total.
MAX_CHANNELS = 10_000
#: Sockets a listener holds in the BOLT 8 handshake at once; a new one drops the oldest of
#: the source host holding the most (a handshake costs its sender a connect, and holds a
#: socket for up to HANDSHAKE_TIMEOUT).
MAX_HANDSHAKES = 128
#: Links at once from keys we hold no channel with (strangers: they come to open one);
#: a new stranger's link closes the oldest one's.
MAX_STRANGERS = 256
#: Seconds a stranger's link may stay up without a channel with us coming of it.
STRANGER_GRACE = 60.0
