"""Run a throwaway anvil node from the project-local npm package.

``@foundry-rs/anvil`` ships the real binary in a per-platform package
(``tools/node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil``); we spawn it
directly with ``--port 0`` and read the port it chose from its log, which goes
to a temporary file (a pipe nobody drains would eventually block anvil).

    with run_anvil() as node:
        w3 = Web3(HTTPProvider(node.url))
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import attrs

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"
_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class AnvilError(Exception):
    """The anvil binary is missing, or it did not start listening in time."""


@attrs.frozen(kw_only=True)
class Anvil:
    """A running anvil: its JSON-RPC URL and the process (ours to stop)."""

    url: str
    port: int
    chain_id: int
    process: subprocess.Popen[bytes] = attrs.field(repr=False, eq=False)


def anvil_binary() -> Path:
    """Path of the platform's anvil binary; raises ``AnvilError`` if it is not installed."""
    override = os.environ.get("OPTICHANNEL_ANVIL")
    if override:
        return Path(override)
    system = platform.system().lower()
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    name = "anvil.exe" if system == "windows" else "anvil"
    path = TOOLS_DIR / "node_modules" / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / name
    if not path.is_file():
        raise AnvilError(f"anvil not found at {path}: run ./dev setup (npm ci in tools/)")
    return path


def anvil_available() -> bool:
    try:
        anvil_binary()
    except AnvilError:
        return False
    return True


@contextmanager
def run_anvil(
    *, chain_id: int = 31337, args: Sequence[str] = (), timeout: float = 20.0
) -> Iterator[Anvil]:
    """Start anvil on a free port; yield an ``Anvil``; kill it on exit.

    Raises ``AnvilError`` if it does not report a listening port within ``timeout`` s.
    """
    binary = anvil_binary()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(binary), "--port", "0", "--chain-id", str(chain_id), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            port = _wait_for_port(proc, log, timeout)
            yield Anvil(url=f"http://127.0.0.1:{port}", port=port, chain_id=chain_id, process=proc)
        finally:
            proc.kill()
            proc.wait()


def _wait_for_port(proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    fd = log.fileno()
    while time.monotonic() < deadline:
        text = os.pread(fd, 1 << 16, 0)
        match = _LISTENING.search(text)
        if match:
            return int(match.group(2))
        if proc.poll() is not None:
            raise AnvilError(f"anvil exited with {proc.returncode}: {text[-500:]!r}")
        time.sleep(0.02)
    raise AnvilError(f"anvil did not start listening within {timeout} s")
