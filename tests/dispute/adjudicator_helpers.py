"""Shared helpers for the adjudicator tests and the gas benchmark (web3 sync over anvil).

States are built and signed with ``channel``'s own code (``Params``, ``State``,
``state_digest``, ``Signer``), so every passing test shows the contract accepts
exactly what the off-chain core produces.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from eth_utils import keccak as eth_keccak
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError

from channel.eip712 import state_digest, state_struct_hash
from channel.hashing import ZERO_ADDRESS, to_checksum
from channel.keys import Signer
from channel.state import Address, Allocation, Params, State
from dispute.compile import contract_sources, load_artifact, solc_compile

TEST_CONTRACTS = Path(__file__).resolve().parent / "contracts"
ETH = ZERO_ADDRESS


@functools.cache
def test_contracts() -> dict[str, dict[str, Any]]:
    """Compile ``tests/dispute/contracts`` once per process: ``{name: {abi, bytecode}}``."""
    _, out = solc_compile(contract_sources(TEST_CONTRACTS))
    found: dict[str, dict[str, Any]] = {}
    for per_file in out["contracts"].values():
        for name, c in per_file.items():
            found[name] = {
                "abi": c["abi"],
                "bytecode": "0x" + c["evm"]["bytecode"]["object"],
                "runtime": "0x" + c["evm"]["deployedBytecode"]["object"],
            }
    return found


def connect(url: str) -> Web3:
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
    w3.eth.default_account = w3.eth.accounts[0]
    return w3


def rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    resp = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if "error" in resp:
        raise RuntimeError(f"{method}: {resp['error']}")
    return resp.get("result")


def deploy(w3: Web3, abi: Any, bytecode: str, sender: str | None = None) -> Contract:
    factory = w3.eth.contract(abi=abi, bytecode=bytecode)
    tx = factory.constructor().transact({"from": sender or w3.eth.accounts[0]})
    receipt = w3.eth.wait_for_transaction_receipt(tx)
    return w3.eth.contract(address=receipt["contractAddress"], abi=abi)


def deploy_adjudicator(w3: Web3, sender: str | None = None) -> Contract:
    art = load_artifact()
    return deploy(w3, art["abi"], art["bytecode"], sender)


def deploy_test(w3: Web3, name: str) -> Contract:
    c = test_contracts()[name]
    return deploy(w3, c["abi"], c["bytecode"])


def set_code(w3: Web3, address: bytes, contract_name: str) -> Contract:
    """Put a test contract's runtime code at ``address`` (a participant's EOA)."""
    c = test_contracts()[contract_name]
    rpc(w3, "anvil_setCode", [to_checksum(address), c["runtime"]])
    return w3.eth.contract(address=to_checksum(address), abi=c["abi"])


def fund(w3: Web3, address: bytes, wei: int = 10**18) -> None:
    """Make ``address`` an existing account (so payouts to it pay no new-account gas)."""
    rpc(w3, "anvil_setBalance", [to_checksum(address), hex(wei)])


def advance(w3: Web3, seconds: int) -> None:
    rpc(w3, "evm_increaseTime", [seconds])
    rpc(w3, "evm_mine", [])


def now(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


# ----------------------------------------------------------------- encoding


def params_arg(p: Params) -> tuple[Any, ...]:
    return (
        p.chain_id,
        to_checksum(p.adjudicator),
        to_checksum(p.participants[0]),
        to_checksum(p.participants[1]),
        p.salt,
        p.challenge_duration,
        to_checksum(p.app),
    )


def state_arg(s: State) -> tuple[Any, ...]:
    return (
        s.channel_id,
        s.version,
        [(to_checksum(a.asset), a.balances[0], a.balances[1], a.locked) for a in s.allocations],
        s.app_data,
        s.is_final,
    )


def sign(p: Params, s: State, signers: Sequence[Signer]) -> bytes:
    """Both signatures, A's then B's, as the 130 bytes the contract takes."""
    digest = state_digest(p, s)
    return b"".join(k.sign(digest) for k in signers)


def dispute_arg(s: State, deadline: int) -> tuple[bytes, int, int]:
    return (state_struct_hash(s), s.version, deadline)


def new_params(
    adjudicator: Contract,
    signers: Sequence[Signer],
    *,
    chain_id: int = 31337,
    duration: int = 3600,
    app: bytes = ZERO_ADDRESS,
) -> Params:
    return Params.new(
        chain_id=chain_id,
        adjudicator=bytes.fromhex(adjudicator.address[2:]),
        participants=(signers[0].address, signers[1].address),
        challenge_duration=duration,
        app=app,
        salt=os.urandom(32),
    )


def make_state(
    p: Params,
    version: int,
    allocs: Iterable[tuple[bytes, int, int] | tuple[bytes, int, int, int]],
    *,
    final: bool = False,
    app_data: bytes = b"",
) -> State:
    allocations = []
    for a in allocs:
        locked = a[3] if len(a) == 4 else 0  # type: ignore[misc]
        allocations.append(Allocation(asset=Address(a[0]), balances=(a[1], a[2]), locked=locked))
    return State(
        channel_id=p.channel_id,
        version=version,
        allocations=tuple(allocations),
        app_data=app_data,
        is_final=final,
    )


def error_selector(name: str) -> str:
    return "0x" + eth_keccak(text=name).hex()[:8]


def expect_revert(call: Callable[[], Any], error: str) -> None:
    """Assert ``call`` reverts with custom error ``error`` (e.g. ``"NotNewer()"``)."""
    want = error_selector(error)
    try:
        call()
    except (ContractCustomError, ContractLogicError) as exc:
        data = exc.data if isinstance(exc.data, str) else str(exc.data)
        assert data.startswith(want), f"expected {error} ({want}), got {data!r}: {exc}"
        return
    raise AssertionError(f"expected revert {error}, call succeeded")


def transact(fn: Any, sender: str, value: int = 0, gas: int | None = None) -> Any:
    """Send a contract call from an unlocked anvil account; return the receipt (status 1)."""
    opts: dict[str, Any] = {"from": sender, "value": value}
    if gas is not None:
        opts["gas"] = gas
    tx = fn.transact(opts)
    receipt = fn.w3.eth.wait_for_transaction_receipt(tx)
    assert receipt["status"] == 1, receipt
    return receipt


def addr(b: bytes) -> str:
    return to_checksum(b)
