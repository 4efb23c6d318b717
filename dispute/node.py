"""A channel client with its on-chain powers switched on: the usual way to run one.

``open_node`` runs :func:`channel.client.open_client` with ``require_funding=True`` and a
:class:`~dispute.guard.Guard` beside it, so that while the client is online it watches
its channels and refutes stale claims without being asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from channel.client import Client, open_client
from channel.keys import Signer
from dispute.adjudicator import AdjudicatorClient
from dispute.guard import Guard


@attrs.frozen
class Node:
    client: Client
    chain: AdjudicatorClient
    guard: Guard


@asynccontextmanager
async def open_node(
    signer: Signer,
    store_path: str | Path,
    chain: AdjudicatorClient,
    *,
    guard_poll: float = 1.0,
    **client_options: Any,
) -> AsyncIterator[Node]:
    """Run a funded-channel client and its guard until the block exits."""
    async with open_client(signer, store_path, require_funding=True, **client_options) as client:
        guard = Guard(client, chain, from_block=chain.from_block, poll_interval=guard_poll)
        async with trio.open_nursery() as nursery:
            await nursery.start(guard.run)
            try:
                yield Node(client=client, chain=chain, guard=guard)
            finally:
                nursery.cancel_scope.cancel()
