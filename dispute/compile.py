"""Compile the adjudicator with the pinned solc-js and write its committed artifact.

``python -m dispute.compile`` regenerates ``dispute/artifacts/Adjudicator.json``;
``python -m dispute.compile --check`` exits 1 if the committed artifact differs
from a fresh compilation.  The compiler is solc-js from ``tools/node_modules``
(pinned by ``tools/package-lock.json``), run through node with standard-JSON
input, so the runtime never needs a compiler: it loads the artifact.

Settings: optimizer on with a high ``runs`` (every transaction against the
adjudicator is paid by a channel participant, deployment happens once per chain,
so runtime gas wins), ``evmVersion`` cancun (transient storage for the guard).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
TOOLS_DIR = REPO_ROOT / "tools"
CONTRACTS_DIR = PACKAGE_DIR / "contracts"
ARTIFACT_PATH = PACKAGE_DIR / "artifacts" / "Adjudicator.json"

EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 1_000_000
CONTRACT_FILE = "Adjudicator.sol"
CONTRACT_NAME = "Adjudicator"

_NODE_SCRIPT = r"""
const solc = require('solc');
let input = '';
process.stdin.on('data', (c) => { input += c; });
process.stdin.on('end', () => {
  const output = JSON.parse(solc.compile(input));
  process.stdout.write(JSON.stringify({version: solc.version(), output}));
});
"""


class CompileError(Exception):
    """solc reported errors, or node/solc-js is missing."""


def settings(runs: int = OPTIMIZER_RUNS) -> dict[str, Any]:
    """The standard-JSON ``settings`` object (also recorded in the artifact)."""
    return {
        "optimizer": {"enabled": True, "runs": runs},
        "viaIR": True,
        "evmVersion": EVM_VERSION,
        "outputSelection": {
            "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
        },
    }


def solc_compile(sources: dict[str, str], runs: int = OPTIMIZER_RUNS) -> tuple[str, dict[str, Any]]:
    """Compile ``{file name: source}`` with solc-js; return ``(solc version, output)``.

    Raises ``CompileError`` on any solc error (warnings are ignored).
    """
    request = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": settings(runs),
    }
    if not (TOOLS_DIR / "node_modules" / "solc").is_dir():
        raise CompileError("solc-js missing: run ./dev setup (npm ci in tools/)")
    try:
        proc = subprocess.run(
            ["node", "-e", _NODE_SCRIPT],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            cwd=TOOLS_DIR,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CompileError("node not found") from exc
    if proc.returncode != 0:
        raise CompileError(f"solc-js failed: {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    output: dict[str, Any] = result["output"]
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise CompileError("\n".join(e.get("formattedMessage", str(e)) for e in errors))
    return str(result["version"]), output


def contract_sources(directory: Path = CONTRACTS_DIR) -> dict[str, str]:
    """Every ``*.sol`` in ``directory`` keyed by bare file name (imports are ``./X.sol``)."""
    return {p.name: p.read_text() for p in sorted(directory.glob("*.sol"))}


def build_artifact() -> dict[str, Any]:
    """Compile ``Adjudicator.sol`` and return the artifact dict."""
    version, output = solc_compile(contract_sources())
    contract = output["contracts"][CONTRACT_FILE][CONTRACT_NAME]
    return {
        "contractName": CONTRACT_NAME,
        "compiler": {"name": "solc-js", "version": version, "settings": settings()},
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
    }


def render(artifact: dict[str, Any]) -> str:
    """Canonical text of an artifact (stable key order, trailing newline)."""
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def load_artifact() -> dict[str, Any]:
    """The committed artifact."""
    loaded: dict[str, Any] = json.loads(ARTIFACT_PATH.read_text())
    return loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispute.compile", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed artifact is stale"
    )
    args = parser.parse_args(argv)
    try:
        text = render(build_artifact())
    except CompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        current = ARTIFACT_PATH.read_text() if ARTIFACT_PATH.exists() else ""
        if current != text:
            print(f"{ARTIFACT_PATH} is stale: run python -m dispute.compile", file=sys.stderr)
            return 1
        print(f"{ARTIFACT_PATH.name} is up to date")
        return 0
    ARTIFACT_PATH.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT_PATH.write_text(text)
    print(f"wrote {ARTIFACT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
