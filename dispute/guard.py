"""Self-defence for a running channel client: watch our channels on chain and act.

``Guard(client, chain)`` follows the head (polling ``poll_interval``), reads the
adjudicator's events for our channels — re-reading the last ``reorg_depth`` blocks each
time, so a claim that a reorg moved or re-mined is seen again — and, for each channel
under dispute, asks the pure policy (``dispute.policy.decide``) what to do:

* **refute** a claim older than our latest co-signed state, through the deadline-aware
  submitter (fees rise as the deadline nears; reorgs are followed);
* **settle** once the window is over (``auto_settle``), so the money comes home;
* **too late**: log it as critical and keep it in ``alerts`` — a ``FundsAtRiskError``
  the operator must see;
* a concluded channel is marked ``closed`` in the client.

Runs until cancelled: ``await nursery.start(guard.run)``.
"""

from __future__ import annotations

import logging

import attrs
import trio

from channel.chain import Adjudicator, Claimed, Concluded, Dispute, Refuted
from channel.client import CLOSED, CLOSING, Client
from channel.errors import ChainError, FundsAtRiskError
from dispute.policy import DEFAULT_MARGIN, Refute, Settle, TooLate, decide

log = logging.getLogger("dispute.guard")


@attrs.define
class _Watch:
    """A channel with a dispute registered on chain."""

    channel_id: bytes
    events: dict[bytes, Claimed | Refuted] = attrs.field(factory=dict)  # by state hash
    busy: set[str] = attrs.field(factory=set)


class Guard:
    def __init__(
        self,
        client: Client,
        chain: Adjudicator,
        *,
        from_block: int = 0,
        poll_interval: float = 1.0,
        reorg_depth: int = 12,
        margin: int = DEFAULT_MARGIN,
        auto_settle: bool = True,
    ) -> None:
        self.client = client
        self.chain = chain
        self.checkpoint = from_block
        self.poll_interval = poll_interval
        self.reorg_depth = reorg_depth
        self.margin = margin
        self.auto_settle = auto_settle
        self.alerts: list[FundsAtRiskError] = []
        self.actions: list[tuple[str, bytes, int]] = []  # (kind, channel id, version)
        self._watch: dict[bytes, _Watch] = {}

    def _ours(self) -> list[bytes]:
        return [
            c.channel_id
            for c in self.client.channels()
            if c.params.chain_id == self.chain.chain_id
            and c.params.adjudicator == self.chain.address
            and self.client.status(c.channel_id) != CLOSED
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await self.poll(nursery)
            task_status.started()
            while True:
                await trio.sleep(self.poll_interval)
                try:
                    await self.poll(nursery)
                except ChainError as exc:  # the node hiccuped: try again next round
                    log.warning("guard poll failed: %s", exc)

    async def poll(self, nursery: trio.Nursery) -> None:
        """One round: read new (and recent) events, then act on every open dispute."""
        ids = self._ours()
        head = await self.chain.head()
        if ids:
            lo = max(0, self.checkpoint - self.reorg_depth)
            for ev in await self.chain.events(lo, head.number, ids):
                if isinstance(ev, Claimed | Refuted):
                    w = self._watch.setdefault(ev.channel_id, _Watch(ev.channel_id))
                    if ev.meta.removed:
                        w.events.pop(ev.dispute.state_hash, None)
                    else:
                        w.events[ev.dispute.state_hash] = ev
                elif isinstance(ev, Concluded) and not ev.meta.removed:
                    self._watch.pop(ev.channel_id, None)
                    if self.client.status(ev.channel_id) != CLOSED:
                        self.client.set_status(ev.channel_id, CLOSED)
        self.checkpoint = head.number
        for cid, w in list(self._watch.items()):
            registered = await self.chain.dispute(cid)
            if registered is None:
                continue
            self._act(nursery, w, registered, head.timestamp)

    def _act(self, nursery: trio.Nursery, w: _Watch, registered: Dispute, now: int) -> None:
        cid = w.channel_id
        best = self.client.latest(cid)
        action = decide(best, registered, now, margin=self.margin)
        if isinstance(action, Refute):
            kind = f"refute:{action.state.state.version}"
            if kind not in w.busy:
                w.busy.add(kind)
                if self.client.status(cid) not in (CLOSING, CLOSED):
                    self.client.set_status(cid, CLOSING)
                nursery.start_soon(self._refute, w, kind, registered, action)
        elif isinstance(action, Settle) and self.auto_settle:
            kind = f"settle:{registered.version}"
            if kind not in w.busy:
                w.busy.add(kind)
                nursery.start_soon(self._settle, w, kind, registered)
        elif isinstance(action, TooLate):
            alert = FundsAtRiskError(
                f"channel {cid.hex()[:16]}: we hold v{action.ours} but the window for the "
                f"registered v{registered.version} closed at {registered.deadline} "
                f"(head time {now})"
            )
            if not any(str(a) == str(alert) for a in self.alerts):
                log.critical("%s", alert)
                self.alerts.append(alert)

    async def _refute(self, w: _Watch, kind: str, registered: Dispute, action: Refute) -> None:
        cid = w.channel_id
        try:
            out = await self.chain.refute(self.client.params(cid), registered, action.state)
            self.actions.append(("refute", cid, action.state.state.version))
            log.info(
                "channel %s: refuted v%d with v%d (%s)",
                cid.hex()[:16],
                registered.version,
                action.state.state.version,
                out,
            )
        except FundsAtRiskError as exc:
            log.critical("channel %s: %s", cid.hex()[:16], exc)
            self.alerts.append(exc)
        except ChainError as exc:
            log.warning("channel %s: refute failed, will retry: %s", cid.hex()[:16], exc)
        finally:
            w.busy.discard(kind)

    async def _settle(self, w: _Watch, kind: str, registered: Dispute) -> None:
        cid = w.channel_id
        try:
            ev = w.events.get(registered.state_hash)
            if ev is None:
                raise ChainError(f"no event for the registered v{registered.version}")
            claimed = await self.chain.claimed_state(ev.meta.tx_hash)
            out = await self.chain.settle(claimed.params, claimed.state, registered.deadline)
            self.actions.append(("settle", cid, registered.version))
            log.info("channel %s: settled at v%d (%s)", cid.hex()[:16], registered.version, out)
        except ChainError as exc:
            log.warning("channel %s: settle failed, will retry: %s", cid.hex()[:16], exc)
        finally:
            w.busy.discard(kind)
