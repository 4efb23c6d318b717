"""The ```python blocks of docs/*.md run as written, against real peers.

Convention: the blocks of one file run in order, in one namespace, as top-level-await
code (as in ``python -m asyncio``): a block may ``await`` or ``async with`` at top level
and use what an earlier block of its file defined.  The names a file uses but never
defines are the reader's own values (a secret key, a peer's address, a policy); the
test puts real ones into the namespace first and starts the counterparties the blocks
talk to with the public API.  Nothing in the docs is there for the test.

Everything is real: keys generated per test, loopback TCP with BOLT 8, SQLite stores in
``tmp_path``, and for the on-chain example an anvil node with the Adjudicator deployed.
A block that raises fails the test, its traceback pointing at the doc's own lines.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from eth_account import Account

from channel import onchain
from channel.chain import Payout
from channel.client import CLOSED, Update, open_client
from channel.errors import TransportError
from channel.keys import Signer, address_of_node_id
from channel.state import ETH, Params, SignedState, State
from channel.transport import Connection, PeerAddress, serve
from dispute.adjudicator import AdjudicatorClient, deploy
from dispute.anvil import Anvil, run_anvil
from dispute.devnode import DevNodeControl
from dispute.rpc import JsonRpcBackend
from dispute.submitter import Submitter

DOCS = Path(__file__).resolve().parent.parent / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: Fences that look like Python but would escape this test.
OTHER_PYTHON_FENCE = re.compile(r"^```(py|python3|pycon|ipython)\s*$", re.MULTILINE)

ETHER = 10**18
#: An asset id for the off-chain example (the mainnet USDC token's address).
USDC = bytes.fromhex("a0b86991c6218b36c1d19d4a2e9eb0ce3606eb48")


@attrs.frozen(kw_only=True)
class Block:
    path: Path
    line: int  # of the block's first line of code
    source: str


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(path=path, line=text.count("\n", 0, m.start(1)) + 1, source=m.group(1))
        for m in PYTHON_BLOCK.finditer(text)
    ]


async def run_blocks(name: str, namespace: dict[str, Any]) -> None:
    """Run the python blocks of ``docs/<name>`` in order in ``namespace``."""
    blocks = python_blocks(DOCS / name)
    assert blocks, f"docs/{name} has no python blocks"
    for block in blocks:
        # Padded so that tracebacks and line numbers are the markdown file's own.
        code = compile(
            "\n" * (block.line - 1) + block.source,
            str(block.path),
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        if code.co_flags & inspect.CO_COROUTINE:
            await eval(code, namespace)
        else:
            exec(code, namespace)


def test_every_python_block_in_the_docs_is_run() -> None:
    """Each doc with python blocks has a test below, and no block hides behind another
    fence name."""
    docs = sorted(DOCS.glob("*.md"))
    assert {p.name for p in docs if python_blocks(p)} == {"api.md", "transport.md"}
    for p in docs:
        assert not OTHER_PYTHON_FENCE.search(p.read_text()), f"{p.name}: fence it as python"


# --- docs/transport.md ----------------------------------------------------------------


async def test_transport_md_dials_a_real_peer_and_serves() -> None:
    """transport.md's blocks parse a listening peer's address, complete the handshake
    with the key it names, deliver four framed messages in order and read its reply over
    loopback TCP, then serve on a bound port until cancelled."""
    peer_key = Signer.generate()
    received: list[bytes] = []
    done = trio.Event()

    async def peer(conn: Connection) -> None:
        try:
            for _ in range(4):
                received.append(await conn.receive())
            await conn.send(b"ok")
            await conn.receive()  # until the dialler hangs up
        except TransportError:
            pass
        finally:
            done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(serve, peer_key, peer)
            text = f"{peer_key.node_id.hex()}@127.0.0.1:{listening.port}"
            ns: dict[str, Any] = {
                "signer": Signer.generate(),
                "text": text,
                "m1": b"bid 101",
                "m2": b"ask 103",
                "m3": b"cancel 7",
            }
            await run_blocks("transport.md", ns)
            await done.wait()
            nursery.cancel_scope.cancel()

    assert ns["addr"] == PeerAddress(
        node_id=peer_key.node_id, host="127.0.0.1", port=listening.port
    )
    assert str(ns["addr"]) == text
    assert ns["conn"].remote_node_id == peer_key.node_id
    assert received == [b"...", b"bid 101", b"ask 103", b"cancel 7"]
    assert ns["msg"] == b"ok"
    assert ns["conn"].closed
    assert ns["listening"].host == "127.0.0.1"
    assert ns["listening"].port > 0


# --- docs/api.md ----------------------------------------------------------------------


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    # Interval mining: the example's submitter waits for 3 confirmations (its default).
    with run_anvil(args=["--block-time", "0.05"]) as node:
        yield node


def risk_policy(params: Params, latest: State, proposed: State) -> str | None:
    return None  # the example's counterparty never proposes


def admit_channel(params: Params, initial: State) -> str | None:
    return None


def takes_the_trade(params: Params, latest: State, proposed: State) -> str | None:
    """The taker's policy: it sells 10**15 wei for no less than 2 USDC (the default one
    refuses any proposal that lowers one of its balances, a trade too)."""
    (eth0, usdc0), (eth1, usdc1) = latest.allocations, proposed.allocations
    sold, got = eth0.balances[1] - eth1.balances[1], usdc1.balances[1] - usdc0.balances[1]
    if got < 0 or (sold > 0 and got * 10**15 < 2_000_000 * sold):
        return "not at 2 USDC per 10**15 wei"
    return None


def buy_back_eth(tip: State) -> Update:
    """The example's ``my_update_fn``: we (participant 0) buy 10**15 wei for 2 USDC."""
    eth, usdc = tip.allocations
    return Update(
        allocations=(
            attrs.evolve(eth, balances=(eth.balances[0] + 10**15, eth.balances[1] - 10**15)),
            attrs.evolve(
                usdc, balances=(usdc.balances[0] - 2_000_000, usdc.balances[1] + 2_000_000)
            ),
        ),
        app_data=tip.app_data,
    )


@pytest.mark.chain
async def test_api_md_trades_and_settles_on_a_real_chain(
    anvil: Anvil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """api.md's blocks, in order: the signer is the Ethereum key of its secret and its
    node id the same key; the client opens a two-asset channel to a real peer, pays and
    trades, and both hold the co-signed result; then a funded channel is deposited into
    by both parties, traded on and closed cooperatively, and the chain pays out exactly
    the final co-signed balances."""
    monkeypatch.chdir(tmp_path)  # the examples' store is "mm.sqlite"
    secret32 = os.urandom(32)
    taker_key, funder_key, deployer = Signer.generate(), Signer.generate(), Signer.generate()
    async with DevNodeControl(anvil.url) as dev:
        for key in (Signer.from_bytes(secret32), funder_key, deployer):
            await dev.set_balance(key.address, 10 * ETHER)

    with trio.fail_after(30):
        async with JsonRpcBackend(anvil.url) as rpc:
            adjudicator, deploy_block = await deploy(rpc, deployer)
            submitter = Submitter(
                rpc, funder_key, chain_id=await rpc.chain_id(), confirmations=1, poll_interval=0.02
            )
            funder_chain = await AdjudicatorClient.connect(
                rpc, adjudicator, submitter, from_block=deploy_block
            )
            async with (
                open_client(taker_key, tmp_path / "taker.sqlite", policy=takes_the_trade) as taker,
                open_client(funder_key, tmp_path / "funder.sqlite", require_funding=True) as funder,
                trio.open_nursery() as nursery,
            ):

                def deposit_our_share(params: Params, signed: SignedState) -> None:
                    if signed.state.version == 0:
                        nursery.start_soon(
                            partial(
                                onchain.fund, funder, funder_chain, params.channel_id, poll=0.02
                            )
                        )

                funder.add_state_listener(deposit_our_share)
                ns: dict[str, Any] = {
                    "secret32": secret32,
                    "listen_port": 0,  # any free port: never one another run may hold
                    "risk_policy": risk_policy,
                    "admit_channel": admit_channel,
                    "peer_uri": str(taker.peer_address()),
                    "ADJ": adjudicator,
                    "USDC": USDC,
                    "my_update_fn": buy_back_eth,
                    "url": anvil.url,
                    "deploy_block": deploy_block,
                    "peer": funder.peer_address(),
                }
                await run_blocks("api.md", ns)

                # Keys: one secret, one Ethereum address, one BOLT 8 identity.
                signer = ns["signer"]
                assert signer.address == bytes.fromhex(Account.from_key(secret32).address[2:])
                assert address_of_node_id(signer.node_id) == signer.address

                # Running a client: pay 10**15 wei, then buy it back for 2 USDC.
                traded = ns["signed"]
                assert traded.fully_signed
                assert traded.state.version == 2
                assert [(a.asset, a.balances) for a in traded.state.allocations] == [
                    (ETH, (ETHER, ETHER)),
                    (USDC, (3_000_000, 2_000_000)),
                ]
                assert taker.latest(traded.state.channel_id) == traded

                # On chain: funded by both, one pay, closed, paid out by the final state.
                cid = ns["cid"]
                final = funder.latest(cid)
                assert final is not None
                assert final.state.is_final
                assert final.state.allocations[0].balances == (ETHER - 10**15, ETHER + 10**15)
                assert ns["client"].status(cid) == CLOSED
                assert await funder_chain.holdings(cid, ETH) == 0
                head = await rpc.block("latest")
                events = await funder_chain.events(deploy_block, head.number, [cid])
                assert [(e.to_a, e.to_b) for e in events if isinstance(e, Payout)] == [
                    final.state.allocations[0].balances
                ]
