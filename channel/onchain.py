"""On-chain powers of the channel client, through the chain port (``channel.chain``).

* :func:`fund` — deposit our share of the initial state and wait until the channel holds
  both shares (confirmed); only then does the channel accept updates.
* :func:`close` — cooperative close: agree a final state off-chain, then pay out at once.
* :func:`force_close` — register our latest co-signed state on chain (a claim) when the
  peer will not cooperate; ``settle`` follows after the challenge window
  (``dispute.guard`` does it, and refutes a stale claim by the peer, unasked).

Funding order.  The adjudicator pays an under-funded channel participant A's balance
first (``docs/adjudicator.md``), so participant B deposits only once A's deposit is on
chain: B can then never pay for A's share.  A deposits at once.
"""

from __future__ import annotations

import trio

from channel.chain import Adjudicator, TxOutcome
from channel.client import CLOSED, CLOSING, FUNDING, OPEN, Client, Update
from channel.errors import ChainError, LocalProtocolError
from channel.state import State

#: Seconds between polls of the chain while waiting for deposits.
POLL_INTERVAL = 1.0


def _initial(client: Client, channel_id: bytes) -> State:
    latest = client.latest(channel_id)
    if latest is None:
        raise LocalProtocolError(f"channel {channel_id.hex()[:16]} is not open yet")
    return latest.state


async def _wait_holdings(
    chain: Adjudicator, channel_id: bytes, want: dict[bytes, int], poll: float
) -> None:
    while True:
        have = {asset: await chain.holdings(channel_id, asset) for asset in want}
        if all(have[a] >= want[a] for a in want):
            return
        await trio.sleep(poll)


async def fund(
    client: Client,
    chain: Adjudicator,
    channel_id: bytes,
    *,
    poll: float = POLL_INTERVAL,
) -> None:
    """Deposit our share of every asset of the channel's initial state, then wait until
    the channel holds everything; the channel then becomes ``open``.

    Raises ``ChainError`` if a deposit fails; bound the wait with a cancel scope.
    """
    if client.status(channel_id) != FUNDING:
        raise LocalProtocolError(
            f"channel {channel_id.hex()[:16]} is {client.status(channel_id)}, not funding"
        )
    params = client.params(channel_id)
    if chain.chain_id != params.chain_id or chain.address != params.adjudicator:
        raise ChainError(
            f"channel {channel_id.hex()[:16]} lives on chain {params.chain_id} at "
            f"0x{params.adjudicator.hex()}, not on this adjudicator"
        )
    me = client.me(channel_id)
    state = _initial(client, channel_id)
    if me == 1:
        first: dict[bytes, int] = {a.asset: a.balances[0] for a in state.allocations}
        await _wait_holdings(chain, channel_id, first, poll)
    for a in state.allocations:
        ours = a.balances[me]
        if ours == 0:
            continue
        # Skip what is already there (a restart after our deposit was mined).
        already = await chain.holdings(channel_id, a.asset)
        owed = a.balances[0] + ours if me == 1 else ours
        if already >= owed:
            continue
        out = await chain.deposit(channel_id, a.asset, ours)
        if not out.success:
            raise ChainError(
                f"channel {channel_id.hex()[:16]}: deposit of {ours} of "
                f"0x{a.asset.hex()} reverted: {out.error}"
            )
    await _wait_holdings(
        channel_id=channel_id,
        chain=chain,
        poll=poll,
        want={a.asset: a.total for a in state.allocations},
    )
    client.set_status(channel_id, OPEN)
    await client.drain()


async def close(client: Client, chain: Adjudicator, channel_id: bytes) -> TxOutcome:
    """Cooperative close: co-sign a final state with the peer, then pay out by it in one
    transaction.  Raises what ``Client.update`` raises if the peer will not sign (use
    :func:`force_close` then) and ``ChainError`` if the close transaction fails."""
    if client.status(channel_id) == OPEN:
        final = await client.update(
            channel_id,
            lambda tip: Update(allocations=tip.allocations, app_data=tip.app_data, is_final=True),
        )
        client.set_status(channel_id, CLOSING)
        await client.drain()
    else:
        latest = client.latest(channel_id)
        if latest is None or not latest.state.is_final:
            raise LocalProtocolError(
                f"channel {channel_id.hex()[:16]} is {client.status(channel_id)}; "
                "no final state to close with"
            )
        final = latest
    out = await chain.close(client.params(channel_id), final)
    if not out.success:
        raise ChainError(f"channel {channel_id.hex()[:16]}: close failed: {out.error}")
    client.set_status(channel_id, CLOSED)
    await client.drain()
    return out


async def force_close(client: Client, chain: Adjudicator, channel_id: bytes) -> TxOutcome:
    """Register our latest co-signed state on chain (starts the challenge window).  The
    channel accepts no more updates."""
    latest = client.latest(channel_id)
    if latest is None or not latest.fully_signed:
        raise LocalProtocolError(f"channel {channel_id.hex()[:16]} has no co-signed state")
    client.set_status(channel_id, CLOSING)
    await client.drain()
    out = await chain.claim(client.params(channel_id), latest)
    if not out.success:
        raise ChainError(f"channel {channel_id.hex()[:16]}: claim failed: {out.error}")
    return out
