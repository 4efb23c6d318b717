"""The README's demo command works and tells the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_channel_life() -> None:
    """`python -m examples.demo` funds, trades, closes cooperatively, and the chain pays
    exactly the final co-signed balances."""
    out = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out[out.index("{") :])
    assert report["status"] == "closed"
    assert report["final_version"] == 2001
    assert report["paid_on_chain_wei"] == report["final_balances_wei"]
    assert sum(report["final_balances_wei"].values()) == 3 * 10**18
    assert len(report["signed_by"]) == 2
