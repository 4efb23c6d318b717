"""Protocol-wide size and time limits, set in exactly one place."""

from __future__ import annotations

#: Largest plaintext message in one transport frame (BOLT 8 caps it at 65535).
MAX_FRAME = 65535
#: Seconds a peer has to complete the BOLT 8 handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a peer has to answer a proposal before the update is abandoned.
UPDATE_TIMEOUT = 10.0
#: Proposals a proposer may have in flight at once on one channel.
PIPELINE_WINDOW = 64
