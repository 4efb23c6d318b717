"""Gas used by the adjudicator's operations on a fresh anvil; JSON on the last line.

    .venv/bin/python benchmarks/gas.py

Realistic calldata: random salt, real participant addresses, one ETH allocation
for the ETH cases; recipients already exist as accounts (no new-account charge).
Figures are ``gasUsed`` from the receipts (21,000 intrinsic and refunds included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dispute"))

from adjudicator_helpers import (  # noqa: E402
    ETH,
    addr,
    advance,
    connect,
    deploy_adjudicator,
    deploy_test,
    dispute_arg,
    fund,
    make_state,
    new_params,
    params_arg,
    sign,
    state_arg,
    transact,
)

from channel.keys import Signer  # noqa: E402
from dispute.anvil import run_anvil  # noqa: E402

TARGETS = {
    "deposit_eth_first": 46_000,
    "claim": 70_000,
    "refute": 50_000,
    "close_cooperative_eth": 80_000,
    "settle_eth": 70_000,
}
E = 10**18


def measure() -> dict[str, int]:
    out: dict[str, int] = {}
    with run_anvil() as node:
        w3 = connect(node.url)
        adj = deploy_adjudicator(w3)
        token = deploy_test(w3, "TestToken")
        funder = w3.eth.accounts[1]
        keys = (Signer.generate(), Signer.generate())
        for k in keys:
            fund(w3, k.address)

        # deposits: the first into a fresh channel (holding slot zero -> non-zero)
        p = new_params(adj, keys, duration=3600)
        out["deposit_eth_first"] = transact(
            adj.functions.depositEthToChannel(p.channel_id), funder, value=3 * E
        )["gasUsed"]
        transact(token.functions.mint(funder, 10**24), funder)
        transact(token.functions.approve(adj.address, 2**256 - 1), funder)
        # warm-up so the adjudicator already holds some of the token, as in steady state
        transact(adj.functions.deposit(b"\x01" * 32, token.address, 1), funder)
        out["deposit_erc20"] = transact(
            adj.functions.deposit(p.channel_id, token.address, 5 * E), funder
        )["gasUsed"]

        # cooperative close, ETH only, payouts to both
        pc = new_params(adj, keys)
        transact(adj.functions.depositEthToChannel(pc.channel_id), funder, value=2 * E)
        fin = make_state(pc, 17, [(ETH, E + 12345, E - 12345)], final=True)
        out["close_cooperative_eth"] = transact(
            adj.functions.close(params_arg(pc), state_arg(fin), sign(pc, fin, keys)), funder
        )["gasUsed"]

        # claim a stale state, refute it, settle by the newer one
        pd = new_params(adj, keys, duration=3600)
        transact(adj.functions.depositEthToChannel(pd.channel_id), funder, value=2 * E)
        old = make_state(pd, 41, [(ETH, E + 777, E - 777)])
        new = make_state(pd, 42, [(ETH, E - 5555, E + 5555)])
        r = transact(
            adj.functions.claim(params_arg(pd), state_arg(old), sign(pd, old, keys)), funder
        )
        out["claim"] = r["gasUsed"]
        deadline = adj.events.Claimed().process_receipt(r)[0]["args"]["deadline"]
        out["refute"] = transact(
            adj.functions.refute(
                params_arg(pd), dispute_arg(old, deadline), state_arg(new), sign(pd, new, keys)
            ),
            funder,
        )["gasUsed"]
        advance(w3, 3601)
        before = w3.eth.get_balance(addr(keys[0].address))
        out["settle_eth"] = transact(
            adj.functions.settle(params_arg(pd), state_arg(new), deadline), funder
        )["gasUsed"]
        assert w3.eth.get_balance(addr(keys[0].address)) - before == E - 5555
    return out


def main() -> None:
    t0 = time.monotonic()
    figures = measure()
    for name, gas in figures.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (" ok" if gas <= target else f" OVER {target}")
        print(f"{name:24s} {gas:8d}{verdict}", file=sys.stderr)
    print(f"elapsed {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
