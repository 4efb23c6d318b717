"""The committed artifact is exactly what the pinned solc-js produces from the sources."""

from __future__ import annotations

import pytest

from dispute.compile import ARTIFACT_PATH, TOOLS_DIR, build_artifact, render


@pytest.mark.skipif(
    not (TOOLS_DIR / "node_modules" / "solc").is_dir(), reason="solc-js not installed"
)
def test_committed_artifact_matches_fresh_compile() -> None:
    """Recompiling Adjudicator.sol with the pinned solc-js reproduces the committed JSON."""
    assert ARTIFACT_PATH.read_text() == render(build_artifact()), (
        "dispute/artifacts/Adjudicator.json is stale: run python -m dispute.compile"
    )


def test_artifact_records_compiler_settings() -> None:
    """The artifact names its compiler, optimizer and EVM version, and carries both bytecodes."""
    import json

    art = json.loads(ARTIFACT_PATH.read_text())
    assert art["compiler"]["settings"]["evmVersion"] == "cancun"
    assert art["compiler"]["settings"]["optimizer"]["enabled"] is True
    assert art["bytecode"].startswith("0x60") and len(art["deployedBytecode"]) > 1000
