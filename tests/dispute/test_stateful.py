"""Random deposits, claims, refutes, settles and closes against the real contract: after every
step the contract's ETH and token balances equal its holdings plus withdrawable credits, and
holdings equal deposits minus payouts for every channel."""

from __future__ import annotations

from typing import Any

from adjudicator_helpers import (
    ETH,
    addr,
    advance,
    deploy_adjudicator,
    deploy_test,
    dispute_arg,
    fund,
    make_state,
    new_params,
    params_arg,
    sign,
    state_arg,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from channel.keys import Signer
from channel.state import Params, State

DURATION = 1000
N_CHANNELS = 2


class AdjudicatorMachine(RuleBasedStateMachine):
    w3: Web3

    @initialize()
    def setup(self) -> None:
        self.adj: Contract = deploy_adjudicator(self.w3)
        self.token: Contract = deploy_test(self.w3, "TestToken")
        self.sender = self.w3.eth.accounts[2]
        self.keys = (Signer.generate(), Signer.generate())
        for k in self.keys:
            fund(self.w3, k.address)
        self.tok = bytes.fromhex(self.token.address[2:])
        self._send(self.token.functions.mint(self.sender, 10**30))
        self._send(self.token.functions.approve(self.adj.address, 2**256 - 1))
        self.params: list[Params] = [
            new_params(self.adj, self.keys, duration=DURATION) for _ in range(N_CHANNELS)
        ]
        # model: holdings per (channel index, asset); the registered dispute per channel
        self.holdings: dict[tuple[int, bytes], int] = {
            (i, a): 0 for i in range(N_CHANNELS) for a in (ETH, self.tok)
        }
        self.disputes: dict[int, tuple[State, int]] = {}
        self.credits: dict[tuple[bytes, bytes], int] = {}

    # ------------------------------------------------------------ plumbing

    def _send(self, fn: Any, value: int = 0) -> Any:
        """Dry-run, then send; return the receipt, or None if it would revert."""
        try:
            fn.call({"from": self.sender, "value": value, "gas": 3_000_000})
        except Exception:
            return None
        tx = fn.transact({"from": self.sender, "value": value, "gas": 3_000_000})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        assert receipt["status"] == 1
        return receipt

    def _apply_payouts(self, i: int, receipt: Any) -> None:
        for ev in self.adj.events.Payout().process_receipt(receipt, errors=DISCARD):
            asset = bytes.fromhex(ev["args"]["asset"][2:])
            self.holdings[(i, asset)] -= ev["args"]["toA"] + ev["args"]["toB"]
            assert self.holdings[(i, asset)] >= 0
        for ev in self.adj.events.Credited().process_receipt(receipt, errors=DISCARD):
            key = (bytes.fromhex(ev["args"]["account"][2:]), bytes.fromhex(ev["args"]["asset"][2:]))
            self.credits[key] = self.credits.get(key, 0) + ev["args"]["amount"]

    def _state(
        self, i: int, version: int, eth: tuple[int, int], tok: tuple[int, int], final: bool
    ) -> State:
        return make_state(self.params[i], version, [(ETH, *eth), (self.tok, *tok)], final=final)

    def _now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    # --------------------------------------------------------------- rules

    @rule(i=st.integers(0, N_CHANNELS - 1), amount=st.integers(1, 10**18))
    def deposit_eth(self, i: int, amount: int) -> None:
        r = self._send(self.adj.functions.depositEthToChannel(self.params[i].channel_id), amount)
        assert r is not None
        self.holdings[(i, ETH)] += amount

    @rule(i=st.integers(0, N_CHANNELS - 1), amount=st.integers(1, 10**18))
    def deposit_token(self, i: int, amount: int) -> None:
        fn = self.adj.functions.deposit(self.params[i].channel_id, self.token.address, amount)
        assert self._send(fn) is not None
        self.holdings[(i, self.tok)] += amount

    @rule(
        i=st.integers(0, N_CHANNELS - 1),
        version=st.integers(0, 30),
        eth=st.tuples(st.integers(0, 2 * 10**18), st.integers(0, 2 * 10**18)),
        tok=st.tuples(st.integers(0, 2 * 10**18), st.integers(0, 2 * 10**18)),
    )
    def claim(self, i: int, version: int, eth: tuple[int, int], tok: tuple[int, int]) -> None:
        p = self.params[i]
        s = self._state(i, version, eth, tok, False)
        r = self._send(self.adj.functions.claim(params_arg(p), state_arg(s), sign(p, s, self.keys)))
        if i in self.disputes:
            assert r is None, "a second claim must not replace a registered dispute"
            return
        assert r is not None
        deadline = self.adj.events.Claimed().process_receipt(r, errors=DISCARD)[0]["args"][
            "deadline"
        ]
        self.disputes[i] = (s, deadline)

    @precondition(lambda self: bool(self.disputes))
    @rule(
        data=st.data(),
        bump=st.integers(-2, 5),
        eth=st.tuples(st.integers(0, 2 * 10**18), st.integers(0, 2 * 10**18)),
    )
    def refute(self, data: st.DataObject, bump: int, eth: tuple[int, int]) -> None:
        i = data.draw(st.sampled_from(sorted(self.disputes)))
        old, deadline = self.disputes[i]
        p = self.params[i]
        version = max(0, old.version + bump)
        s = self._state(i, version, eth, (0, 0), False)
        fn = self.adj.functions.refute(
            params_arg(p), dispute_arg(old, deadline), state_arg(s), sign(p, s, self.keys)
        )
        r = self._send(fn)
        if version <= old.version or self._now() >= deadline:
            assert r is None, "refute needs a strictly newer state inside the window"
        elif r is not None:
            self.disputes[i] = (s, deadline)
        else:
            assert self._now() + 2 >= deadline  # only the boundary may go either way

    @rule(seconds=st.sampled_from([1, 10, 300, DURATION + 1]))
    def wait(self, seconds: int) -> None:
        advance(self.w3, seconds)

    @precondition(lambda self: bool(self.disputes))
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(self.disputes)))
        s, deadline = self.disputes[i]
        r = self._send(
            self.adj.functions.settle(params_arg(self.params[i]), state_arg(s), deadline)
        )
        if r is None:
            assert self._now() < deadline + 2, "settle after the window must succeed"
            return
        assert self._now() >= deadline
        del self.disputes[i]
        self._apply_payouts(i, r)

    @rule(
        i=st.integers(0, N_CHANNELS - 1),
        eth=st.tuples(st.integers(0, 2 * 10**18), st.integers(0, 2 * 10**18)),
        tok=st.tuples(st.integers(0, 2 * 10**18), st.integers(0, 2 * 10**18)),
    )
    def close(self, i: int, eth: tuple[int, int], tok: tuple[int, int]) -> None:
        p = self.params[i]
        s = self._state(i, 100, eth, tok, True)
        r = self._send(self.adj.functions.close(params_arg(p), state_arg(s), sign(p, s, self.keys)))
        assert r is not None
        self.disputes.pop(i, None)
        self._apply_payouts(i, r)

    # ----------------------------------------------------------- invariants

    @invariant()
    def conserved(self) -> None:
        if not hasattr(self, "adj"):
            return
        eth_h = sum(v for (_, a), v in self.holdings.items() if a == ETH)
        tok_h = sum(v for (_, a), v in self.holdings.items() if a == self.tok)
        eth_c = sum(v for (_, a), v in self.credits.items() if a == ETH)
        tok_c = sum(v for (_, a), v in self.credits.items() if a == self.tok)
        assert self.w3.eth.get_balance(self.adj.address) == eth_h + eth_c
        assert self.token.functions.balanceOf(self.adj.address).call() == tok_h + tok_c
        for (i, a), v in self.holdings.items():
            assert self.adj.functions.holdings(self.params[i].channel_id, addr(a)).call() == v
        for (acct, a), v in self.credits.items():
            assert self.adj.functions.credits(addr(acct), addr(a)).call() == v


def test_conservation_under_random_operations(w3: Web3) -> None:
    """Funds are conserved per channel and asset under any sequence of operations."""
    AdjudicatorMachine.w3 = w3
    run_state_machine_as_test(
        AdjudicatorMachine,
        settings=settings(
            max_examples=10,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
