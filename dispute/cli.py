"""``optichannel``: the operator's command line for the on-chain side of channels.

It works offline on a client's store (the client need not run) and talks to the chain
through :class:`~dispute.adjudicator.AdjudicatorClient` and the deadline-aware submitter::

    optichannel deploy   --rpc URL                       deploy an Adjudicator
    optichannel channels --store PATH [--rpc URL]        list channels (and their chain state)
    optichannel close    --store PATH --rpc URL CHANNEL  pay out by a co-signed final state
    optichannel dispute  --store PATH --rpc URL CHANNEL  force close: claim our latest state
    optichannel refute   --store PATH --rpc URL CHANNEL  answer a stale claim with our latest
    optichannel settle   --store PATH --rpc URL CHANNEL  pay out once the window is over
    optichannel keystore new --out FILE                  a new key in an encrypted keystore

Keys come from ``--keystore FILE`` or ``OPTICHANNEL_PRIVATE_KEY`` (``dispute.keystore``),
never from an argument.  Every failure is one line on stderr (``optichannel: error: …``)
with exit status 2 for a usage error and 1 for anything else; ``--verbose`` adds the
traceback.  Results go to stdout (JSON, except the ``channels`` table).

The CLI writes to a store only a channel's status (``closing`` after a claim, ``closed``
after a payout), through ``Store.apply([PersistStatus(...)])``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import trio

from channel.chain import Claimed, Dispute, Payout, Refuted, TxOutcome
from channel.client import CLOSED, CLOSING
from channel.errors import ChainError, ChannelError, Reverted
from channel.keys import Signer
from channel.state import ETH, Params, SignedState
from channel.store import ChannelRecord, PersistStatus, Store
from dispute import keystore
from dispute.adjudicator import LOG_CHUNK, AdjudicatorClient, deploy
from dispute.policy import DEFAULT_MARGIN
from dispute.rpc import JsonRpcBackend
from dispute.submitter import Submitter

PROG = "optichannel"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CliError(ChannelError):
    """An operational failure the CLI explains itself (exit status 1)."""


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


# ----------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(_redact(message))


def _redact(message: str) -> str:
    # argparse echoes unknown arguments; one of them may be a key pasted by mistake.
    head, sep, rest = message.partition("unrecognized arguments: ")
    if not sep:
        return message
    shown = [w if w.startswith("-") else "…" for w in rest.split()]
    return f"{head}unrecognized arguments: {' '.join(shown)}"


def _address(text: str) -> bytes:
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex address: {text!r}") from None
    if len(raw) != 20:
        raise argparse.ArgumentTypeError(f"an address is 20 bytes: {text!r}")
    return raw


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return n


def _positive(text: str) -> int:
    n = _nonneg(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return x


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--verbose", action="store_true", help="print tracebacks on failure")

    key = _Parser(add_help=False, allow_abbrev=False)
    key.add_argument(
        "--keystore",
        metavar="FILE",
        help=f"encrypted keystore JSON (password: ${keystore.PASSWORD_ENV} or a prompt); "
        f"without it the key comes from ${keystore.PRIVATE_KEY_ENV}",
    )

    chain = _Parser(add_help=False, allow_abbrev=False)
    chain.add_argument("--rpc", metavar="URL", required=True, help="JSON-RPC endpoint")
    chain.add_argument(
        "--confirmations", type=_positive, default=1, help="blocks to wait for (default 1)"
    )
    chain.add_argument(
        "--poll-interval", type=_seconds, default=1.0, metavar="S", help="seconds between polls"
    )

    scan = _Parser(add_help=False, allow_abbrev=False)
    scan.add_argument(
        "--from-block",
        type=_nonneg,
        default=0,
        metavar="N",
        help="first block of log scans: the adjudicator's deployment block (default 0)",
    )

    store = _Parser(add_help=False, allow_abbrev=False)
    store.add_argument("--store", metavar="PATH", required=True, help="the client's store file")

    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Operate optichannel state channels on an EVM chain.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "deploy",
        parents=[common, key, chain],
        allow_abbrev=False,
        help="deploy the Adjudicator; prints its address and deployment block",
    )

    ch = sub.add_parser(
        "channels",
        parents=[common, store, scan],
        allow_abbrev=False,
        help="list the store's channels (with --rpc: their on-chain state)",
    )
    ch.add_argument("--rpc", metavar="URL", help="JSON-RPC endpoint: adds on-chain holdings")
    ch.add_argument(
        "--adjudicator",
        type=_address,
        metavar="ADDR",
        help="only read channels of this adjudicator (default: each channel's own)",
    )
    ch.add_argument("--json", action="store_true", help="JSON instead of a table")

    for name, text in (
        ("close", "pay out by the co-signed final state in the store"),
        ("dispute", "force close: register our latest co-signed state (a claim)"),
        ("refute", "replace a registered older state with our latest co-signed state"),
        ("settle", "after the challenge window, pay out by the registered state"),
    ):
        p = sub.add_parser(
            name, parents=[common, key, chain, store, scan], allow_abbrev=False, help=text
        )
        p.add_argument("channel", metavar="CHANNEL_ID", help="channel id or a unique hex prefix")

    ks = sub.add_parser("keystore", allow_abbrev=False, help="manage keystore files")
    ks_sub = ks.add_subparsers(dest="keystore_command", metavar="COMMAND", required=True)
    new = ks_sub.add_parser(
        "new",
        parents=[common],
        allow_abbrev=False,
        help="generate a key into a new encrypted keystore file (mode 0600)",
    )
    new.add_argument("--out", metavar="FILE", required=True, help="the keystore file to create")
    return parser


# ----------------------------------------------------------------- helpers


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _asset_name(asset: bytes) -> str:
    return "ETH" if asset == ETH else _hex(asset)


def _when(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _emit(out: TextIO, obj: Any) -> None:
    out.write(json.dumps(obj, indent=2) + "\n")


def _store_owner(path: Path) -> bytes:
    """The owner recorded in a store file, read without opening it for writing."""
    if not path.is_file():
        raise CliError(f"no store at {path}")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise CliError(f"{path} is not an optichannel store: {exc}") from None
    if row is None:
        raise CliError(f"{path} is not an optichannel store: it records no owner")
    return bytes(row[0])


def _open_store(path: str, signer: Signer | None) -> Store:
    """Open an existing store; with ``signer``, check that it is the store's owner."""
    p = Path(path)
    owner = _store_owner(p)
    if signer is not None and signer.address != owner:
        raise CliError(
            f"store {p} belongs to {_hex(owner)}, but the key is {_hex(signer.address)}: "
            "use that account's key"
        )
    return Store(p, owner=owner)


def _find(records: Sequence[ChannelRecord], prefix: str, store: Path) -> ChannelRecord:
    text = prefix.lower()
    if text.startswith("0x"):
        text = text[2:]
    shown = prefix if len(prefix) <= 20 else prefix[:18] + "…"
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise CliError(f"channel id {shown!r} is not hex")
    hits = [r for r in records if r.params.channel_id.hex().startswith(text)]
    if not hits:
        raise CliError(f"no channel in {store} matches {shown!r}")
    if len(hits) > 1:
        ids = ", ".join(_hex(r.params.channel_id)[:18] for r in hits[:4])
        raise CliError(f"{shown!r} matches {len(hits)} channels ({ids}…): give more digits")
    return hits[0]


def _cosigned(rec: ChannelRecord) -> SignedState:
    latest = rec.latest
    if latest is None or not latest.fully_signed:
        raise CliError(f"channel {_hex(rec.params.channel_id)[:18]} has no co-signed state")
    return latest


def _outcome(out: TxOutcome, what: str) -> dict[str, Any]:
    if out.error.startswith("stood down"):
        return {"stood_down": True, "reason": out.error}
    if not out.success:
        raise ChainError(f"{what}: transaction {_hex(out.tx_hash)} reverted: {out.error}")
    return {"tx": _hex(out.tx_hash), "block": out.block_number, "gas_used": out.gas_used}


async def _payouts(adj: AdjudicatorClient, cid: bytes, out: TxOutcome) -> dict[str, Any]:
    if not out.success or not out.tx_hash:
        return {}
    events = await adj.events(out.block_number, out.block_number, [cid])
    return {
        _hex(e.asset): {"to_a": e.to_a, "to_b": e.to_b}
        for e in events
        if isinstance(e, Payout) and e.meta.tx_hash == out.tx_hash
    }


def _set_status(store: Store, cid: bytes, status: str) -> None:
    store.apply([PersistStatus(channel_id=cid, status=status)])


def _dispute_view(d: Dispute | None, now: int) -> dict[str, Any]:
    if d is None:
        return {"status": "none"}
    state = "settleable" if now >= d.deadline else "open"
    return {"status": state, "version": d.version, "deadline": d.deadline}


# ----------------------------------------------------------------- the chain session


class _Session:
    """A backend, and for one channel the adjudicator it lives on, with our key."""

    def __init__(self, args: argparse.Namespace, backend: JsonRpcBackend) -> None:
        self.args = args
        self.backend = backend

    async def adjudicator(
        self, address: bytes, key: bytes | None, *, chain_id: int | None = None
    ) -> AdjudicatorClient:
        actual = await self.backend.chain_id()
        if chain_id is not None and actual != chain_id:
            raise CliError(f"the channel lives on chain {chain_id}, but --rpc is chain {actual}")
        # Read-only sessions get a throwaway key: reads never sign anything.
        signer: bytes = key if key is not None else Signer.generate().secret_bytes()
        sub = Submitter(
            self.backend,
            signer,
            chain_id=actual,
            confirmations=getattr(self.args, "confirmations", 1),
            poll_interval=getattr(self.args, "poll_interval", 1.0),
        )
        return await AdjudicatorClient.connect(
            self.backend, address, sub, from_block=self.args.from_block
        )


# ----------------------------------------------------------------- commands


async def cmd_deploy(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    key = keystore.load_key(args.keystore, env)
    async with JsonRpcBackend(args.rpc) as backend:
        chain_id = await backend.chain_id()
        address, block = await deploy(backend, key)
    _emit(out, {"adjudicator": _hex(address), "block": block, "chain_id": chain_id})
    return EXIT_OK


async def cmd_channels(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    store = _open_store(args.store, None)
    try:
        records = store.load()
    finally:
        store.close()
    rows = [_channel_row(r) for r in records]
    if args.rpc is not None:
        async with JsonRpcBackend(args.rpc) as backend:
            session = _Session(args, backend)
            chain_id = await backend.chain_id()
            head = await backend.block("latest")
            adjs: dict[bytes, AdjudicatorClient] = {}
            for rec, row in zip(records, rows, strict=True):
                p = rec.params
                if p.chain_id != chain_id:
                    row["onchain"] = {"skipped": f"on chain {p.chain_id}"}
                    continue
                if args.adjudicator is not None and p.adjudicator != args.adjudicator:
                    row["onchain"] = {"skipped": "another adjudicator"}
                    continue
                if p.adjudicator not in adjs:
                    adjs[p.adjudicator] = await session.adjudicator(p.adjudicator, None)
                adj = adjs[p.adjudicator]
                holdings = {
                    asset: await adj.holdings(p.channel_id, bytes.fromhex(asset[2:]))
                    for asset in row["balances"]
                }
                row["onchain"] = {
                    "holdings": holdings,
                    "dispute": _dispute_view(await adj.dispute(p.channel_id), head.timestamp),
                    "head_time": head.timestamp,
                }
    if args.json:
        _emit(out, rows)
    else:
        _table(rows, out)
    return EXIT_OK


def _channel_row(rec: ChannelRecord) -> dict[str, Any]:
    p = rec.params
    state = rec.latest.state if rec.latest is not None else None
    balances: dict[str, dict[str, int]] = {}
    if state is not None:
        for a in state.allocations:
            balances[_hex(a.asset)] = {
                "ours": a.balances[rec.me],
                "theirs": a.balances[1 - rec.me],
                "locked": a.locked,
            }
    return {
        "channel_id": _hex(p.channel_id),
        "peer": _hex(p.participants[1 - rec.me]),
        "peer_node_id": _hex(rec.peer_node_id),
        "me": rec.me,
        "chain_id": p.chain_id,
        "adjudicator": _hex(p.adjudicator),
        "challenge_duration": p.challenge_duration,
        "version": None if state is None else state.version,
        "final": False if state is None else state.is_final,
        "status": rec.status,
        "balances": balances,
    }


def _table(rows: list[dict[str, Any]], out: TextIO) -> None:
    onchain = any("onchain" in r for r in rows)
    header = ["CHANNEL", "PEER", "VERSION", "STATUS", "OUR BALANCE"]
    if onchain:
        header += ["HOLDINGS", "DISPUTE"]
    lines = [header]
    for r in rows:
        version = "-" if r["version"] is None else str(r["version"]) + ("F" if r["final"] else "")
        ours = ", ".join(
            f"{_asset_name(bytes.fromhex(a[2:]))} {b['ours']}" for a, b in r["balances"].items()
        )
        line = [r["channel_id"][:18], r["peer"], version, r["status"], ours or "-"]
        if onchain:
            oc = r.get("onchain", {})
            if "skipped" in oc:
                line += ["-", oc["skipped"]]
            else:
                held = ", ".join(
                    f"{_asset_name(bytes.fromhex(a[2:]))} {v}" for a, v in oc["holdings"].items()
                )
                d = oc["dispute"]
                if d["status"] == "open":
                    text = f"v{d['version']} open until {_when(d['deadline'])}"
                elif d["status"] == "settleable":
                    text = f"v{d['version']} settleable"
                else:
                    text = "none"
                line += [held or "-", text]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


class _Channel:
    """A channel command's context: the store, the record, our key and its adjudicator."""

    def __init__(self, store: Store, rec: ChannelRecord, adj: AdjudicatorClient) -> None:
        self.store, self.rec, self.adj = store, rec, adj

    @property
    def params(self) -> Params:
        return self.rec.params

    @property
    def cid(self) -> bytes:
        return self.rec.params.channel_id

    @property
    def name(self) -> str:
        return f"channel {_hex(self.cid)[:18]}"


async def _with_channel(
    args: argparse.Namespace,
    env: Mapping[str, str],
    out: TextIO,
    body: Callable[[_Channel, TextIO], Awaitable[int]],
) -> int:
    key = keystore.load_key(args.keystore, env)
    store = _open_store(args.store, Signer.from_bytes(key))
    try:
        rec = _find(store.load(), args.channel, Path(args.store))
        async with JsonRpcBackend(args.rpc) as backend:
            adj = await _Session(args, backend).adjudicator(
                rec.params.adjudicator, key, chain_id=rec.params.chain_id
            )
            return await body(_Channel(store, rec, adj), out)
    finally:
        store.close()


async def _close(ch: _Channel, out: TextIO) -> int:
    latest = _cosigned(ch.rec)
    if not latest.state.is_final:
        raise CliError(
            f"{ch.name}: the latest co-signed state v{latest.state.version} is not final; "
            "close cooperatively from the running client, or force close with "
            "`optichannel dispute`"
        )
    res = await ch.adj.close(ch.params, latest)
    result = {"channel_id": _hex(ch.cid), "version": latest.state.version}
    result.update(_outcome(res, f"{ch.name}: close"))
    result["payouts"] = await _payouts(ch.adj, ch.cid, res)
    _set_status(ch.store, ch.cid, CLOSED)
    _emit(out, result)
    return EXIT_OK


async def _dispute(ch: _Channel, out: TextIO) -> int:
    latest = _cosigned(ch.rec)
    ours = latest.state.version
    registered = await ch.adj.dispute(ch.cid)
    if registered is not None:
        if registered.version < ours:
            raise CliError(
                f"{ch.name}: v{registered.version} is already registered and we hold v{ours}: "
                "run `optichannel refute`"
            )
        _set_status(ch.store, ch.cid, CLOSING)
        _emit(
            out,
            {
                "channel_id": _hex(ch.cid),
                "stood_down": True,
                "registered": _dispute_view(registered, (await ch.adj.head()).timestamp),
            },
        )
        return EXIT_OK
    held = [await ch.adj.holdings(ch.cid, a.asset) for a in latest.state.allocations]
    if not any(held):
        raise CliError(f"{ch.name} holds nothing on chain (never funded, or already concluded)")
    _set_status(ch.store, ch.cid, CLOSING)  # persist, then act: no more updates on it
    res = await ch.adj.claim(ch.params, latest)
    result = {"channel_id": _hex(ch.cid), "version": ours}
    result.update(_outcome(res, f"{ch.name}: claim"))
    now = await ch.adj.dispute(ch.cid)
    if now is not None:
        result["deadline"] = now.deadline
        result["deadline_utc"] = _when(now.deadline)
    _emit(out, result)
    return EXIT_OK


async def _refute(ch: _Channel, out: TextIO) -> int:
    latest = _cosigned(ch.rec)
    ours = latest.state.version
    registered = await ch.adj.dispute(ch.cid)
    if registered is None:
        raise CliError(f"{ch.name}: no dispute is registered (start one with `dispute`)")
    if registered.version >= ours:
        raise CliError(
            f"{ch.name}: the registered v{registered.version} is not older than our "
            f"latest v{ours}: nothing to refute"
        )
    head = await ch.adj.head()
    if head.timestamp + DEFAULT_MARGIN >= registered.deadline:
        raise CliError(
            f"{ch.name}: too late to refute v{registered.version} with v{ours}: the "
            f"challenge window closed at {_when(registered.deadline)}"
        )
    _set_status(ch.store, ch.cid, CLOSING)
    res = await ch.adj.refute(ch.params, registered, latest)
    result = {
        "channel_id": _hex(ch.cid),
        "refuted": registered.version,
        "version": ours,
        "deadline": registered.deadline,
    }
    result.update(_outcome(res, f"{ch.name}: refute"))
    _emit(out, result)
    return EXIT_OK


async def _registered_event(adj: AdjudicatorClient, cid: bytes, d: Dispute, head: int) -> bytes:
    """The transaction that registered ``d`` (newest first, in chunks, as ``dispute`` does)."""
    hi = head
    while hi >= adj.from_block:
        lo = max(adj.from_block, hi - LOG_CHUNK + 1)
        for ev in reversed(await adj.events(lo, hi, [cid])):
            if isinstance(ev, Claimed | Refuted) and not ev.meta.removed and ev.dispute == d:
                return ev.meta.tx_hash
        hi = lo - 1
    raise ChainError(f"channel {_hex(cid)[:18]}: no event registers v{d.version}")


async def _settle(ch: _Channel, out: TextIO, err: TextIO) -> int:
    registered = await ch.adj.dispute(ch.cid)
    if registered is None:
        raise CliError(
            f"{ch.name}: no dispute is registered: nothing to settle (`dispute` starts one)"
        )
    ours = ch.rec.latest.state.version if ch.rec.latest is not None else -1
    head = await ch.adj.head()
    if head.timestamp < registered.deadline:
        if ours > registered.version and head.timestamp + DEFAULT_MARGIN < registered.deadline:
            raise CliError(
                f"{ch.name}: the registered v{registered.version} is older than our latest "
                f"v{ours} and the challenge window is open until "
                f"{_when(registered.deadline)}: run `optichannel refute` now"
            )
        raise CliError(
            f"{ch.name}: WindowOpen: the challenge window is open until "
            f"{_when(registered.deadline)} (unix {registered.deadline}, "
            f"{registered.deadline - head.timestamp} s after the head); settle after it"
        )
    if ours > registered.version:
        err.write(
            f"{PROG}: warning: {ch.name}: we hold v{ours} but the window for the registered "
            f"v{registered.version} has closed; settling by v{registered.version}\n"
        )
    tx = await _registered_event(ch.adj, ch.cid, registered, head.number)
    claimed = await ch.adj.claimed_state(tx)
    if claimed.params.channel_id != ch.cid:
        raise ChainError(f"{ch.name}: transaction {_hex(tx)} registered another channel")
    res = await ch.adj.settle(claimed.params, claimed.state, registered.deadline)
    result = {"channel_id": _hex(ch.cid), "version": registered.version}
    result.update(_outcome(res, f"{ch.name}: settle"))
    result["payouts"] = await _payouts(ch.adj, ch.cid, res)
    _set_status(ch.store, ch.cid, CLOSED)
    _emit(out, result)
    return EXIT_OK


def cmd_keystore_new(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    password = keystore.password_from(env, what=f"the new keystore {args.out}", confirm=True)
    signer = Signer.generate()
    address = keystore.create_keystore(signer.secret_bytes(), password, args.out)
    _emit(out, {"address": _checksum(address), "keystore": str(args.out)})
    return EXIT_OK


def _checksum(address: bytes) -> str:
    from eth_utils.address import to_checksum_address

    return str(to_checksum_address(address))


# ----------------------------------------------------------------- entry point


async def _dispatch(
    args: argparse.Namespace, env: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    cmd = args.command
    if cmd == "deploy":
        return await cmd_deploy(args, env, out)
    if cmd == "channels":
        return await cmd_channels(args, env, out)
    if cmd == "close":
        return await _with_channel(args, env, out, _close)
    if cmd == "dispute":
        return await _with_channel(args, env, out, _dispute)
    if cmd == "refute":
        return await _with_channel(args, env, out, _refute)
    if cmd == "settle":
        return await _with_channel(args, env, out, lambda ch, o: _settle(ch, o, err))
    raise AssertionError(f"unhandled command {cmd!r}")  # a bug: the parser allows no other


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Reverted):
        return f"the chain refused: {exc}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out waiting for the chain"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 usage)."""
    out, err = sys.stdout, sys.stderr
    environ = os.environ if env is None else env
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        if args.command == "keystore":
            return cmd_keystore_new(args, environ, out)
        return trio.run(_dispatch, args, environ, out, err)
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except BaseException as raised:
        leaf = _leaf(raised)
        if isinstance(leaf, KeyboardInterrupt):
            err.write(f"{PROG}: interrupted\n")
            return 130
        if not isinstance(leaf, ChannelError | OSError | ValueError | trio.TooSlowError):
            raise  # a bug: let it show its traceback
        if verbose:
            traceback.print_exception(leaf, file=err)
        err.write(f"{PROG}: error: {_describe(leaf)}\n")
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
