"""One channel party in its own OS process, for the SIGKILL crash test.

Run as ``python tests/channel/crash_party.py --role opener --store S --peer ADDR``
(the party opens one channel to ``ADDR``, or resumes the one in its store) or
``--role responder --store S --listen PORT`` (it waits for the peer to open one).
The secret key comes from the environment variable ``CRASH_PARTY_SECRET`` (hex),
never from argv.

It talks to its parent over stdio, one JSON object per line:

stdout (one ``write`` per line)
  ``{"ev": "up", "port": P}``       the client runs (store loaded, listening/dialing)
  ``{"ev": "ready", ...}``          the channel is open and the peer is connected
  ``{"ev": "latest", ...}``         answer to ``latest``
  ``{"ev": "stopped", ...}``        answer to ``stop``: no pay of ours is running
  ``{"ev": "pay", "id": I, "amount": A}``  written before each pay starts
  ``{"ev": "paid", "id": I, "version": V}``  that pay returned the co-signed state V
  ``{"ev": "refused", "id": I, "error": T, "reason": R}``  it raised ``T``: not made
  ``{"ev": "unknown", "id": I}``    its outcome is settled on reconnect, either way
stdin
  ``go N``      start N concurrent pay loops (pipelined updates to the peer, in TOKEN)
  ``stop``      let the pay loops finish their current update and end
  ``latest``    report the latest co-signed state and what is in flight
  ``exit``      shut down cleanly

The process is meant to be SIGKILLed at any moment; it never cleans up on its own.
A pay whose ``pay`` line has no outcome line when the process died is of unknown
outcome; pay ids (``PID.N``) are unique across restarts.  A pay is ``Client.pay``'s
update made through ``Client.update`` with its id as the state's app data
(``test_client_chaos.tagged_pay``), so that every state the pay proposes names it.

``CRASH_PARTY_FAULT=send-before-persist`` (TEST-ONLY) breaks the client's
persist-then-send rule on purpose, so the crash test can show that its checks
catch a party that signs and sends before its store has the state.
``CRASH_PARTY_FAULT=pay-twice`` (TEST-ONLY) makes every pay twice, reported once, and
``CRASH_PARTY_FAULT=pay-unmade`` reports every pay made without proposing anything:
the crash test's accounting of the pays catches both.  ``CRASH_PARTY_FAULT=one-pay-twice``
(TEST-ONLY) makes a single pay twice, reported once (the ``ONE_PAY_TWICE_AT``-th of the
process), and then writes ``{"ev": "paid-twice", "id": I, "returned": [V1, V2]}``: that
one hides in the slack of ``R <= T <= R + U``, the exact check catches it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import sys
from collections.abc import Callable
from pathlib import Path

import trio
import trio.lowlevel

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from test_client_chaos import tagged_pay

from channel.client import Client, UpdateFn, open_client
from channel.eip712 import state_digest
from channel.errors import LocalProtocolError, PeerTimeout, UpdateRejected
from channel.keys import Signer
from channel.machine import PersistLatest
from channel.outbox import Outbox
from channel.state import ETH, SignedState
from channel.transport import PeerAddress

SECRET_ENV = "CRASH_PARTY_SECRET"
FAULT_ENV = "CRASH_PARTY_FAULT"
TOKEN = bytes.fromhex("00000000000000000000000000000000000000a1")
ADJUDICATOR = bytes.fromhex("00000000000000000000000000000000000000ad")
CHAIN_ID = 31337
#: Initial balances (asset, opener, responder); every pay is tiny next to them.  The
#: opener column is the victim's whichever side opens, and only the victim pays TOKEN: a
#: run's few thousand pays of at most MAX_AMOUNT never come near 10**9.
BALANCES = ((ETH, 10**12, 10**12), (TOKEN, 10**9, 10**9))
MAX_AMOUNT = 1000
UPDATE_TIMEOUT = 3.0

#: How a pay ended, as its caller saw it (the outcome lines on stdout).
PAID, REFUSED, UNKNOWN = "paid", "refused", "unknown"
#: ``report(outcome, error type, reason, version)``: called once per pay, however it
#: ended; ``version`` is that of the co-signed state a ``PAID`` pay returned, else None.
Report = Callable[[str, str, str, "int | None"], None]
#: ``one-pay-twice`` makes this update of the process (counted from 1) twice.
ONE_PAY_TWICE_AT = 40


def emit(**fields: object) -> None:
    """Write one line on stdout, in one ``write``: a SIGKILL cannot cut it short (``print``
    writes the newline apart when ``PYTHONUNBUFFERED`` is set)."""
    line = (json.dumps(fields) + "\n").encode()
    assert len(line) <= select.PIPE_BUF
    os.write(sys.stdout.fileno(), line)


def describe(client: Client, cid: bytes) -> dict[str, object]:
    info = next(c for c in client.channels() if c.channel_id == cid)
    latest = info.latest
    return {
        "cid": cid.hex(),
        "version": None if latest is None else latest.state.version,
        "digest": None if latest is None else state_digest(client.params(cid), latest.state).hex(),
        "in_flight": info.in_flight,
        "connected": info.connected,
    }


async def find_channel(client: Client, role: str, peer: PeerAddress | None) -> bytes:
    """Resume the channel in the store, or open it (opener) / await it (responder)."""
    while True:
        chans = client.channels()
        if chans:
            return chans[0].channel_id
        if role == "opener":
            assert peer is not None
            return await client.open_channel(
                peer,
                chain_id=CHAIN_ID,
                adjudicator=ADJUDICATOR,
                challenge_duration=3600,
                balances=BALANCES,
            )
        await trio.sleep(0.002)


async def wait_ready(client: Client, cid: bytes) -> None:
    while True:
        info = next(c for c in client.channels() if c.channel_id == cid)
        if info.latest is not None and info.connected:
            return
        await trio.sleep(0.002)


async def pay(
    client: Client, cid: bytes, asset: bytes, amount: int, tag: bytes, report: Report
) -> str:
    """Pay ``amount`` of ``asset`` to the peer, as ``test_client_chaos.pay_forever`` does:
    ``Client.update`` with ``tag`` (the pay's id) as the app data of every state it
    proposes, its outcome classified as ``PAID`` (it returned a co-signed state),
    ``REFUSED`` (``UpdateRejected`` or ``LocalProtocolError``: the pay is not made) or
    ``UNKNOWN`` (``PeerTimeout``, or cancelled while awaiting: made or not, the resync
    settles it).  ``report`` is called however the pay ends; then a cancellation, or any
    other error (a bug: it fails the test), propagates."""
    outcome, error, reason, version = UNKNOWN, "", "", None
    try:
        signed = await client.update(cid, tagged_pay(client.me(cid), asset, amount, tag))
        outcome, version = PAID, signed.state.version
    except PeerTimeout:
        pass
    except (UpdateRejected, LocalProtocolError) as exc:
        outcome, error = REFUSED, type(exc).__name__
        reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
    finally:
        report(outcome, error, reason, version)
    return outcome


def report_on_stdout(pay_id: str) -> Report:
    """Report pay ``pay_id``'s outcome to the parent, as one line on stdout."""

    def report(outcome: str, error: str, reason: str, version: int | None) -> None:
        if outcome == REFUSED:
            emit(ev=outcome, id=pay_id, error=error, reason=reason)
        elif outcome == PAID:
            emit(ev=outcome, id=pay_id, version=version)
        else:
            emit(ev=outcome, id=pay_id)

    return report


class Payer:
    """``go N`` / ``stop``: concurrent pay loops, so updates are pipelined.  Each pay is
    in TOKEN (the peer pays in ETH: each asset moves one way only), and is written on
    stdout before it starts and when it ends."""

    def __init__(self, client: Client, cid: bytes, nursery: trio.Nursery) -> None:
        self.client, self.cid, self.nursery = client, cid, nursery
        self.running = False
        self.loops = 0
        self.idle = trio.Event()
        self.idle.set()
        self.ok = self.failed = 0
        self.pays = 0  # pay ids, with the pid: unique across restarts

    def go(self, n: int) -> None:
        self.running = True
        for _ in range(n):
            self.loops += 1
            self.idle = trio.Event()
            self.nursery.start_soon(self._loop)

    async def stop(self) -> None:
        self.running = False
        await self.idle.wait()

    async def _loop(self) -> None:
        rng = random.Random()
        try:
            while self.running:
                self.pays += 1
                pay_id, amount = f"{os.getpid()}.{self.pays}", rng.randint(1, MAX_AMOUNT)
                emit(ev="pay", id=pay_id, amount=amount)
                outcome = await pay(
                    self.client, self.cid, TOKEN, amount, pay_id.encode(), report_on_stdout(pay_id)
                )
                if outcome == PAID:
                    self.ok += 1
                else:
                    self.failed += 1
                    await trio.sleep(0.001)
        finally:
            self.loops -= 1
            if self.loops == 0:
                self.idle.set()


async def _flusher_send_before_persist(self: Outbox) -> None:
    """TEST-ONLY FAULT: ``Outbox.run`` with the frames sent *before* the fsync,
    and a 20 ms gap between the two, so a SIGKILL lands in between."""
    while True:
        await self.wake.wait()
        self.wake = trio.Event()
        ops, sends, notes = self.ops, self.sends, self.notes
        self.ops, self.sends, self.notes = [], [], []
        for node_id, epoch, frame in sends:
            self.links.queue(node_id, [frame], epoch=epoch)
        await trio.sleep(0.02)
        if ops:
            await trio.to_thread.run_sync(self.store.apply, ops)
        for note in notes:
            self.on_note(note)
        for op in ops:
            if isinstance(op, PersistLatest):
                self.on_durable(op)


_client_update = Client.update


async def _update_twice(self: Client, channel_id: bytes, fn: UpdateFn) -> SignedState:
    """TEST-ONLY FAULT: every update (pay) is made twice and returns once (as a pay
    retried after its first proposal had been co-signed after all)."""
    await _client_update(self, channel_id, fn)
    return await _client_update(self, channel_id, fn)


async def _update_unmade(self: Client, channel_id: bytes, fn: UpdateFn) -> SignedState:
    """TEST-ONLY FAULT: every update (pay) returns the latest co-signed state and
    proposes nothing (a pay reported made that never was)."""
    await trio.sleep(0.001)
    latest = self.latest(channel_id)
    assert latest is not None
    return latest


_updates = 0


async def _update_one_twice(self: Client, channel_id: bytes, fn: UpdateFn) -> SignedState:
    """TEST-ONLY FAULT: the ``ONE_PAY_TWICE_AT``-th update (pay) of the process is made
    twice and returns once; then a ``paid-twice`` line names it.  The others are honest."""
    global _updates
    _updates += 1
    if _updates != ONE_PAY_TWICE_AT:
        return await _client_update(self, channel_id, fn)
    first = await _client_update(self, channel_id, fn)
    second = await _client_update(self, channel_id, fn)
    # The returned states may be later ones that accept this pay's proposal with others:
    # the pay's id is what ``fn`` writes as app data.
    emit(
        ev="paid-twice",
        id=fn(first.state).app_data.decode(),
        returned=[first.state.version, second.state.version],
    )
    return second


async def main(args: argparse.Namespace) -> None:
    fault = os.environ.get(FAULT_ENV)
    if fault == "send-before-persist":
        Outbox.run = _flusher_send_before_persist  # type: ignore[method-assign]
        Outbox.flush_now = lambda self: None  # type: ignore[method-assign]  # no shortcut
    elif fault == "pay-twice":
        Client.update = _update_twice  # type: ignore[method-assign]
    elif fault == "pay-unmade":
        Client.update = _update_unmade  # type: ignore[method-assign]
    elif fault == "one-pay-twice":
        Client.update = _update_one_twice  # type: ignore[method-assign]
    elif fault is not None:
        raise SystemExit(f"unknown {FAULT_ENV}={fault!r}")
    signer = Signer.from_bytes(bytes.fromhex(os.environ[SECRET_ENV]))
    peer = PeerAddress.parse(args.peer) if args.peer else None
    port = args.listen if args.role == "responder" else None
    async with (
        open_client(signer, args.store, port=port, update_timeout=UPDATE_TIMEOUT) as client,
        trio.open_nursery() as nursery,
    ):
        emit(ev="up", port=None if port is None else client.peer_address().port)
        cid = await find_channel(client, args.role, peer)
        await wait_ready(client, cid)
        emit(ev="ready", **describe(client, cid))
        payer = Payer(client, cid, nursery)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = ""
        while True:
            try:
                chunk = await stdin.receive_some(4096)
            except trio.ClosedResourceError:
                chunk = b""
            if not chunk:
                break
            buf += chunk.decode()
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                cmd = line.split()
                if not cmd:
                    continue
                if cmd[0] == "go":
                    payer.go(int(cmd[1]))
                elif cmd[0] == "stop":
                    await payer.stop()
                    emit(ev="stopped", ok=payer.ok, failed=payer.failed)
                elif cmd[0] == "latest":
                    emit(ev="latest", **describe(client, cid))
                elif cmd[0] == "exit":
                    await payer.stop()
                    nursery.cancel_scope.cancel()
                    return
        nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=("opener", "responder"), required=True)
    ap.add_argument("--store", required=True, help="SQLite store path (kept across restarts)")
    ap.add_argument("--peer", help="opener: the peer's pubkey@host:port")
    ap.add_argument("--listen", type=int, default=0, help="responder: the port to listen on")
    args = ap.parse_args(argv)
    if args.role == "opener" and not args.peer:
        ap.error("--role opener needs --peer")
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
