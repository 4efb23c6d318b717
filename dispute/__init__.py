"""Everything on-chain: the Solidity adjudicator, its compiled artifact, and tooling.

``dispute.compile`` builds ``dispute/artifacts/Adjudicator.json`` with the pinned
solc-js; ``dispute.anvil`` runs a throwaway anvil node for tests and benchmarks.
"""
