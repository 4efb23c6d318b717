"""The ``optichannel`` operator CLI against a real anvil and real client stores.

One anvil and one pair of clients per module: the clients open three funded channels,
pay back and forth, and exit; the CLI then works offline on their store files.

* X (window 100 s): disputed and settled by the CLI;
* Y (window 100 s): holds a co-signed final state; closed by the CLI;
* Z (window 10 days): Bob claims a stale state; the CLI refutes it.

Tests are plain functions (``main`` runs its own ``trio.run``); chain reads go through
:func:`_chain`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from channel import onchain
from channel.client import Update, open_client
from channel.keys import Signer
from channel.state import ETH, SignedState
from channel.store import COSIGNED
from dispute import keystore
from dispute.adjudicator import AdjudicatorClient, deploy
from dispute.anvil import run_anvil
from dispute.cli import main
from dispute.devnode import DevNodeControl
from dispute.rpc import JsonRpcBackend
from dispute.submitter import Submitter

ETHER = 10**18
SHORT = 100
LONG = 10 * 86400
T = TypeVar("T")


def _chain(url: str, fn: Callable[[JsonRpcBackend], Awaitable[T]]) -> T:
    async def run() -> T:
        async with JsonRpcBackend(url) as backend:
            return await fn(backend)

    return trio.run(run)


async def _open_funded(alice: Any, bob: Any, adj: dict[str, Any], window: int) -> bytes:
    cid: bytes = await alice.open_channel(
        bob.peer_address(),
        chain_id=adj["chain_id"],
        adjudicator=adj["address"],
        challenge_duration=window,
        balances=[(ETH, ETHER, ETHER // 2)],
    )
    with trio.fail_after(5):
        while bob.latest(cid) is None:  # noqa: ASYNC110 - bob's store catches up
            await trio.sleep(0.01)
    async with trio.open_nursery() as n:
        n.start_soon(partial(onchain.fund, bob, adj["cb"], cid, poll=0.05))
        n.start_soon(partial(onchain.fund, alice, adj["ca"], cid, poll=0.05))
    return cid


async def _build(url: str, tmp: Path) -> dict[str, Any]:
    async with JsonRpcBackend(url) as backend, DevNodeControl(url) as control:
        a, b = Signer.generate(), Signer.generate()  # test-only keys
        for s in (a, b):
            await control.fund(s.address, 10 * ETHER)
        chain_id = await backend.chain_id()
        address, block = await deploy(backend, a)

        def adj(s: Signer) -> AdjudicatorClient:
            sub = Submitter(backend, s, chain_id=chain_id, confirmations=1, poll_interval=0.05)
            return AdjudicatorClient(
                backend, address, chain_id=chain_id, submitter=sub, from_block=block
            )

        ctx = {"chain_id": chain_id, "address": address, "ca": adj(a), "cb": adj(b)}
        async with (
            open_client(a, tmp / "a.sqlite", require_funding=True) as alice,
            open_client(b, tmp / "b.sqlite", require_funding=True) as bob,
        ):
            x = await _open_funded(alice, bob, ctx, SHORT)
            y = await _open_funded(alice, bob, ctx, SHORT)
            z = await _open_funded(alice, bob, ctx, LONG)
            for cid in (x, y, z):
                await alice.pay(cid, ETH, ETHER // 10)
                for _ in range(3):
                    await bob.pay(cid, ETH, ETHER // 40)
            await alice.update(
                y,
                lambda tip: Update(
                    allocations=tip.allocations, app_data=tip.app_data, is_final=True
                ),
            )
            stale = next(s for v, st, s in bob.store.signed_states(z) if v == 1 and st == COSIGNED)
            latest = {cid: alice.latest(cid) for cid in (x, y, z)}
            params = {cid: alice.params(cid) for cid in (x, y, z)}
    return {
        "url": url,
        "a": a,
        "b": b,
        "address": address,
        "block": block,
        "chain_id": chain_id,
        "x": x,
        "y": y,
        "z": z,
        "stale_z": stale,
        "latest": latest,
        "params": params,
        "store_a": str(tmp / "a.sqlite"),
        "store_b": str(tmp / "b.sqlite"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cli")
    with run_anvil() as node:
        yield trio.run(_build, node.url, tmp)


def _env(signer: Signer) -> dict[str, str]:
    return {keystore.PRIVATE_KEY_ENV: signer.secret_bytes().hex()}


def _args(w: dict[str, Any], cmd: str, store: str, cid: bytes) -> list[str]:
    return [
        cmd,
        "--rpc",
        w["url"],
        "--store",
        w[store],
        "--from-block",
        str(w["block"]),
        "--poll-interval",
        "0.05",
        cid.hex()[:12],
    ]


def _run(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str]
) -> tuple[int, str, str]:
    code = main(argv, env=env)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optichannel: error: ")
    assert "Traceback" not in err
    return lines[0]


def _latest(w: dict[str, Any], cid: bytes) -> SignedState:
    s = w["latest"][cid]
    assert isinstance(s, SignedState)
    return s


def _channels(capsys: pytest.CaptureFixture[str], w: dict[str, Any]) -> dict[str, Any]:
    argv = ["channels", "--store", w["store_a"], "--rpc", w["url"], "--json"]
    code, out, err = _run(capsys, [*argv, "--from-block", str(w["block"])], {})
    assert code == 0, err
    return {row["channel_id"]: row for row in json.loads(out)}


# ----------------------------------------------------------------- commands


def test_deploy_prints_a_live_adjudicator_and_its_block(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`deploy` puts the Adjudicator on chain and prints its address and block as JSON."""
    code, out, err = _run(capsys, ["deploy", "--rpc", world["url"]], _env(world["a"]))
    assert code == 0, err
    result = json.loads(out)
    address = bytes.fromhex(result["adjudicator"][2:])
    assert result["block"] > world["block"] and result["chain_id"] == world["chain_id"]
    assert _chain(world["url"], lambda be: be.code(address))


def test_channels_lists_local_state_and_onchain_holdings(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`channels` needs no key; it shows each channel's version and our balance, and with
    --rpc the channel's holdings on chain; the table names every channel."""
    rows = _channels(capsys, world)
    z = "0x" + world["z"].hex()
    assert set(rows) == {"0x" + world[k].hex() for k in "xyz"}
    latest = _latest(world, world["z"])
    row = rows[z]
    assert row["version"] == latest.state.version
    assert row["peer"] == "0x" + world["b"].address.hex()
    eth = "0x" + ETH.hex()
    assert row["balances"][eth]["ours"] == latest.state.allocations[0].balances[0]
    assert row["onchain"]["holdings"][eth] == ETHER + ETHER // 2
    assert row["onchain"]["dispute"]["status"] in ("none", "open")

    code, out, _ = _run(capsys, ["channels", "--store", world["store_a"]], {})
    assert code == 0
    for k in "xyz":
        assert "0x" + world[k].hex()[:16] in out


def test_dispute_registers_latest_and_settle_waits_for_the_window_then_pays(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`dispute` registers our latest co-signed state; `settle` before the deadline fails
    with one line naming the open window; after it, `settle` pays both sides exactly what
    the latest state says and empties the channel."""
    w, cid = world, world["x"]
    latest = _latest(w, cid)
    code, out, err = _run(capsys, _args(w, "dispute", "store_a", cid), _env(w["a"]))
    assert code == 0, err
    assert json.loads(out)["version"] == latest.state.version
    assert _channels(capsys, w)["0x" + cid.hex()]["onchain"]["dispute"]["status"] == "open"

    code, out, err = _run(capsys, _args(w, "settle", "store_a", cid), _env(w["a"]))
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert "WindowOpen" in line and "the challenge window is open until" in line

    async def travel(be: JsonRpcBackend) -> int:
        control = DevNodeControl(be)
        await control.increase_time(SHORT + 1)
        await control.mine()
        return await be.balance(w["b"].address)

    before_b = _chain(w["url"], travel)
    code, out, err = _run(capsys, _args(w, "settle", "store_a", cid), _env(w["a"]))
    assert code == 0, err
    a_gets, b_gets = latest.state.allocations[0].balances
    assert json.loads(out)["payouts"]["0x" + ETH.hex()] == {"to_a": a_gets, "to_b": b_gets}
    assert _chain(w["url"], lambda be: be.balance(w["b"].address)) - before_b == b_gets
    row = _channels(capsys, w)["0x" + cid.hex()]
    assert row["onchain"]["holdings"]["0x" + ETH.hex()] == 0
    assert row["onchain"]["dispute"]["status"] == "none" and row["status"] == "closed"


def test_close_with_a_final_state_pays_both(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`close` with a co-signed final state in the store pays both parties at once (Bob
    sends it; Alice, who sends nothing, receives her balance to the wei)."""
    w, cid = world, world["y"]
    latest = _latest(w, cid)
    assert latest.state.is_final
    before_a = _chain(w["url"], lambda be: be.balance(w["a"].address))
    code, out, err = _run(capsys, _args(w, "close", "store_b", cid), _env(w["b"]))
    assert code == 0, err
    a_gets, b_gets = latest.state.allocations[0].balances
    assert json.loads(out)["payouts"]["0x" + ETH.hex()] == {"to_a": a_gets, "to_b": b_gets}
    assert _chain(w["url"], lambda be: be.balance(w["a"].address)) - before_a == a_gets


def test_close_without_a_final_state_is_refused(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`close` on a channel whose latest state is not final sends nothing and says to close
    cooperatively from the client or to use `dispute`."""
    code, out, err = _run(capsys, _args(world, "close", "store_a", world["z"]), _env(world["a"]))
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert "not final" in line and "optichannel dispute" in line


def test_stale_claim_settle_points_to_refute_and_refute_lands(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """When Bob registers a stale state, `settle` refuses and tells Alice to refute while
    the window is open; `refute` then registers Alice's latest state."""
    w, cid = world, world["z"]
    latest = _latest(w, cid)

    async def cheat(be: JsonRpcBackend) -> None:
        sub = Submitter(be, w["b"], chain_id=w["chain_id"], confirmations=1, poll_interval=0.05)
        adj = AdjudicatorClient(
            be, w["address"], chain_id=w["chain_id"], submitter=sub, from_block=w["block"]
        )
        assert (await adj.claim(w["params"][cid], w["stale_z"])).success

    _chain(w["url"], cheat)
    code, out, err = _run(capsys, _args(w, "settle", "store_a", cid), _env(w["a"]))
    assert code == 1
    line = _one_error_line(err)
    assert "optichannel refute" in line and f"v{latest.state.version}" in line

    code, out, err = _run(capsys, _args(w, "refute", "store_a", cid), _env(w["a"]))
    assert code == 0, err
    assert json.loads(out)["refuted"] == w["stale_z"].state.version
    dispute = _channels(capsys, w)["0x" + cid.hex()]["onchain"]["dispute"]
    assert dispute["status"] == "open" and dispute["version"] == latest.state.version


# ----------------------------------------------------------------- keys and errors


def test_missing_key_is_one_line_and_no_traceback(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --keystore or OPTICHANNEL_PRIVATE_KEY a transaction command fails with one
    line saying where a key comes from."""
    code, out, err = _run(capsys, _args(world, "dispute", "store_a", world["z"]), {})
    assert code == 1 and out == ""
    assert "OPTICHANNEL_PRIVATE_KEY" in _one_error_line(err)


@pytest.mark.parametrize("flag", ["--private-key", "--key", "--secret", "--priv"])
def test_no_private_key_argument_exists(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """No flag takes a private key (nor an abbreviation of one): it is a usage error (2),
    and the value is not echoed back to the terminal."""
    secret = world["a"].secret_bytes().hex()
    argv = [*_args(world, "dispute", "store_a", world["z"]), flag, secret]
    code, out, err = _run(capsys, argv, {})
    assert code == 2 and out == ""
    assert secret not in err
    _one_error_line(err)


def test_keystore_new_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keystore new` writes an encrypted keystore readable only by its owner and prints
    the address; `load_key` with the same password (from the environment or a prompt)
    returns that address's key; with no password and no terminal, or a wrong one, it
    fails with a typed error."""
    path = tmp_path / "key.json"
    env = {keystore.PASSWORD_ENV: "correct horse"}
    code, out, err = _run(capsys, ["keystore", "new", "--out", str(path)], env)
    assert code == 0, err
    address = json.loads(out)["address"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = keystore.load_key(path, env)
    assert "0x" + Signer.from_bytes(secret).address.hex() == address.lower()
    assert secret.hex() not in path.read_text()
    with pytest.raises(keystore.NoPassword):
        keystore.load_key(path, {})
    assert keystore.load_key(path, {}, prompt=lambda _: "correct horse") == secret
    with pytest.raises(keystore.WrongPassword):
        keystore.load_key(path, {}, prompt=lambda _: "wrong horse")
    code, _, err = _run(capsys, ["keystore", "new", "--out", str(path)], env)
    assert code == 1 and "exists" in _one_error_line(err)


def test_wrong_password_and_wrong_owner_are_clear_errors(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong keystore password, and a key that does not own the store, each fail with one
    line naming the problem; nothing is sent and the store is untouched."""
    path = tmp_path / "other.json"
    other = Signer.generate()
    keystore.create_keystore(other.secret_bytes(), "pw", path, kdf="pbkdf2", iterations=1000)
    argv = [*_args(world, "dispute", "store_a", world["z"]), "--keystore", str(path)]

    code, _, err = _run(capsys, argv, {keystore.PASSWORD_ENV: "not it"})
    assert code == 1 and "wrong password" in _one_error_line(err)

    code, _, err = _run(capsys, argv, {keystore.PASSWORD_ENV: "pw"})
    line = _one_error_line(err)
    assert code == 1 and "belongs to 0x" + world["a"].address.hex() in line
    assert other.address.hex() in line


def test_unknown_channel_prefix_is_a_clear_error(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A channel id prefix that matches no channel in the store is one clear line."""
    ids = [world[k].hex() for k in "xyz"]
    prefix = next(
        p for p in (f"{i:04x}" for i in range(1 << 16)) if not any(c.startswith(p) for c in ids)
    )
    argv = [*_args(world, "dispute", "store_a", world["z"])[:-1], prefix]
    code, _, err = _run(capsys, argv, _env(world["a"]))
    assert code == 1 and f"no channel in {world['store_a']} matches" in _one_error_line(err)


def test_console_script_runs_as_a_process(world: dict[str, Any]) -> None:
    """The installed `optichannel` script lists channels as JSON, and a failure is one
    line on stderr with exit status 1 — no traceback."""
    script = Path(sys.executable).parent / "optichannel"
    assert script.exists(), "pip install -e . installs the console script"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTICHANNEL_")}
    ok = subprocess.run(
        [str(script), "channels", "--store", world["store_a"], "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 3
    bad = subprocess.run(
        [str(script), *_args(world, "dispute", "store_a", world["z"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    _one_error_line(bad.stderr)
