"""The whole channel life in one process, with zero setup.

* an in-process EVM (py-evm, Cancun) with the Adjudicator deployed on it;
* Alice and Bob: real clients over loopback TCP with BOLT 8 encryption, durable SQLite
  stores in a temp dir, each with its guard watching the chain;
* they fund the channel on chain (Alice first), trade a burst of co-signed updates in
  both directions (pipelined), close cooperatively, and the chain pays both.

Run with ``./dev demo``.  Keys are generated per run (test-only, worthless).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import trio

from channel import onchain
from channel.eip712 import state_digest
from channel.keys import Signer, recover
from channel.state import ETH
from dispute.adjudicator import AdjudicatorClient, deploy
from dispute.embedded import EmbeddedBackend
from dispute.node import open_node
from dispute.submitter import Submitter

UPDATES = 2000
ETHER = 10**18


async def main() -> None:
    alice_key, bob_key = Signer.generate(), Signer.generate()
    chain = EmbeddedBackend()
    for key in (alice_key, bob_key):
        await chain.fund(key.address, 10 * ETHER)
    chain_id = await chain.chain_id()
    adjudicator, block = await deploy(chain, alice_key)
    print(f"adjudicator 0x{adjudicator.hex()} on in-process chain {chain_id}")

    def port(key: Signer) -> AdjudicatorClient:
        sub = Submitter(chain, key, chain_id=chain_id, confirmations=1, poll_interval=0.02)
        return AdjudicatorClient(
            chain, adjudicator, chain_id=chain_id, submitter=sub, from_block=block
        )

    with tempfile.TemporaryDirectory() as tmp:
        async with (
            open_node(
                alice_key, Path(tmp) / "alice.sqlite", port(alice_key), guard_poll=0.2
            ) as alice_node,
            open_node(bob_key, Path(tmp) / "bob.sqlite", port(bob_key), guard_poll=0.2) as bob_node,
        ):
            alice, bob = alice_node.client, bob_node.client
            print(f"alice  {alice.peer_address()}")
            print(f"bob    {bob.peer_address()}")
            cid = await alice.open_channel(
                bob.peer_address(),
                chain_id=chain_id,
                adjudicator=adjudicator,
                challenge_duration=3600,
                balances=[(ETH, 2 * ETHER, ETHER)],
            )
            with trio.fail_after(10):
                while bob.latest(cid) is None:  # noqa: ASYNC110 - bob's store catches up
                    await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:  # Bob deposits after Alice's lands
                nursery.start_soon(onchain.fund, alice, alice_node.chain, cid)
                nursery.start_soon(onchain.fund, bob, bob_node.chain, cid)
            held = await alice_node.chain.holdings(cid, ETH)
            print(f"channel {cid.hex()} funded on chain with {held / ETHER} ETH")

            t0 = time.perf_counter()
            for burst in range(4):  # pipelined bursts, in turn: Alice pays, then Bob
                payer, step = (alice, 7) if burst % 2 == 0 else (bob, 3)
                async with trio.open_nursery() as nursery:
                    for i in range(UPDATES // 4):
                        nursery.start_soon(payer.pay, cid, ETH, 10**12 * (1 + i % step))
            elapsed = time.perf_counter() - t0
            final_a, final_b = alice.latest(cid), bob.latest(cid)
            assert final_a is not None and final_a == final_b, "both must hold one latest state"
            print(
                f"{UPDATES} co-signed durable updates in {elapsed:.2f}s "
                f"({UPDATES / elapsed:,.0f}/s; both parties share this one process)"
            )

            before = [await chain.balance(k.address) for k in (alice_key, bob_key)]
            outcome = await onchain.close(alice, alice_node.chain, cid)
            after = [await chain.balance(k.address) for k in (alice_key, bob_key)]
            closed = alice.latest(cid)
            assert closed is not None and closed.state.is_final
            params = alice.params(cid)
            digest = state_digest(params, closed.state)
            signers = [recover(digest, s) for s in closed.signatures if s is not None]
            assert signers == list(params.participants)
            receipt = await chain.receipt(outcome.tx_hash)
            assert receipt is not None
            gas_cost = receipt.gas_used * receipt.effective_gas_price  # Alice sent the close
            print(
                json.dumps(
                    {
                        "channel_id": cid.hex(),
                        "final_version": closed.state.version,
                        "final_balances_wei": {
                            "alice": closed.state.allocations[0].balances[0],
                            "bob": closed.state.allocations[0].balances[1],
                        },
                        "paid_on_chain_wei": {
                            "alice": after[0] - before[0] + gas_cost,
                            "bob": after[1] - before[1],
                        },
                        "close_tx": "0x" + outcome.tx_hash.hex(),
                        "close_gas": outcome.gas_used,
                        "signed_by": ["0x" + s.hex() for s in signers],
                        "status": alice.status(cid),
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
