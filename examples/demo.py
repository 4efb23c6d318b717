"""Two parties, one process, real loopback TCP with BOLT 8, durable temp stores.

Alice opens a channel to Bob with ETH and a token, they trade a burst of
co-signed updates (pipelined), and the final co-signed state is printed.
Run with ``./dev demo``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import trio

from channel.client import open_client
from channel.eip712 import state_digest
from channel.keys import Signer, recover
from channel.state import ETH

TOKEN = bytes.fromhex("00000000000000000000000000000000000000a1")  # demo ERC-20 address
ADJUDICATOR = bytes.fromhex("00000000000000000000000000000000000000ad")  # not deployed yet
UPDATES = 2000


async def main() -> None:
    alice_key, bob_key = Signer.generate(), Signer.generate()  # throwaway demo keys
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            open_client(alice_key, Path(tmp) / "alice.sqlite") as alice,
            open_client(bob_key, Path(tmp) / "bob.sqlite") as bob,
        ):
            print(f"alice  {alice.peer_address()}")
            print(f"bob    {bob.peer_address()}")
            cid = await alice.open_channel(
                bob.peer_address(),
                chain_id=31337,
                adjudicator=ADJUDICATOR,
                challenge_duration=3600,
                balances=[(ETH, 10**18, 10**18), (TOKEN, 5_000_000, 5_000_000)],
            )
            print(f"channel {cid.hex()} open")
            t0 = time.perf_counter()
            # Bursts in turn: Alice pays ETH, then Bob pays tokens; each burst pipelined.
            for burst in range(4):
                payer, asset = (alice, ETH) if burst % 2 == 0 else (bob, TOKEN)
                async with trio.open_nursery() as nursery:
                    for i in range(UPDATES // 4):
                        nursery.start_soon(payer.pay, cid, asset, 1000 + i)
            elapsed = time.perf_counter() - t0
            final_a, final_b = alice.latest(cid), bob.latest(cid)
            assert final_a is not None and final_b is not None
            assert final_a == final_b, "both parties must hold the same latest co-signed state"
            params = alice.params(cid)
            digest = state_digest(params, final_a.state)
            signers = [recover(digest, s) for s in final_a.signatures if s is not None]
            assert signers == list(params.participants)
            print(
                f"{UPDATES} co-signed durable updates in {elapsed:.2f}s "
                f"({UPDATES / elapsed:,.0f}/s, both parties in this one process)"
            )
            print(
                json.dumps(
                    {
                        "channel_id": cid.hex(),
                        "version": final_a.state.version,
                        "allocations": [
                            {
                                "asset": "0x" + a.asset.hex(),
                                "alice": a.balances[0],
                                "bob": a.balances[1],
                            }
                            for a in final_a.state.allocations
                        ],
                        "signed_by": ["0x" + s.hex() for s in signers],
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
