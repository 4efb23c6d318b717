"""Fixtures for the adjudicator tests: one anvil per session, a fresh channel per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adjudicator_helpers import connect, deploy_adjudicator, deploy_test, fund
from web3 import Web3
from web3.contract import Contract

from channel.keys import Signer
from dispute.anvil import Anvil, run_anvil


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    with run_anvil() as node:
        yield node


@pytest.fixture(scope="session")
def w3(anvil: Anvil) -> Web3:
    return connect(anvil.url)


@pytest.fixture(scope="session")
def adjudicator(w3: Web3) -> Contract:
    return deploy_adjudicator(w3)


@pytest.fixture(scope="session")
def token(w3: Web3) -> Contract:
    return deploy_test(w3, "TestToken")


@pytest.fixture(scope="session")
def app(w3: Web3) -> Contract:
    return deploy_test(w3, "TrivialApp")


@pytest.fixture
def signers(w3: Web3) -> tuple[Signer, Signer]:
    """Two fresh participant keys whose addresses exist on chain (1 ETH each)."""
    a, b = Signer.generate(), Signer.generate()
    fund(w3, a.address)
    fund(w3, b.address)
    return a, b


@pytest.fixture(scope="session")
def funder(w3: Web3) -> str:
    """An unlocked anvil account that sends deposits (anyone may deposit)."""
    return str(w3.eth.accounts[1])
