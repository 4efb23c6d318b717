"""The channel core does no I/O: its pure modules import no trio, sockets, sqlite or web3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = ROOT / "channel"

PURE = [
    "channel.state",
    "channel.codec",
    "channel.machine",
    "channel.resync",
    "channel.responder",
    "channel.events",
    "channel.eip712",
    "channel.keys",
    "channel.hashing",
    "channel.errors",
    "channel.limits",
    "channel.chain",
    "dispute.policy",
]
FORBIDDEN_TOP = {"trio", "socket", "sqlite3", "web3", "httpx"}
FORBIDDEN_CHANNEL = {"channel.store", "channel.transport", "channel.client"}


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                mod = node.module or ""
            out.add(mod)
            # ``from channel import codec`` imports the submodule channel.codec
            for alias in node.names:
                if module_path(f"{mod}.{alias.name}") is not None:
                    out.add(f"{mod}.{alias.name}")
    return out


def closure(start: str) -> dict[str, set[str]]:
    """Imports of ``start`` and, transitively, of every ``channel`` module it reaches."""
    seen: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_path(name)
        if path is None:
            seen[name] = set()
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        seen[name] = imports_of(path, package)
        todo.extend(m for m in seen[name] if m == "channel" or m.startswith("channel."))
    return seen


def violations(start: str) -> list[str]:
    bad = []
    for mod, imps in closure(start).items():
        for imp in sorted(imps):
            if imp.split(".")[0] in FORBIDDEN_TOP or imp in FORBIDDEN_CHANNEL:
                bad.append(f"{mod} imports {imp}")
    return bad


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    """A pure core module, and every channel module it imports, imports no trio, socket,
    sqlite3, web3, httpx, nor the store, transport or client."""
    assert module_path(module) is not None, f"{module} is missing"
    assert violations(module) == []


def test_checker_flags_impure_modules() -> None:
    """The checker does flag the modules that do I/O (a control)."""
    assert any("sqlite3" in v for v in violations("channel.store"))
    assert any("trio" in v for v in violations("channel.transport"))
    assert closure("channel.store")["channel.store"] >= {"channel.codec", "channel.machine"}


def test_relative_and_submodule_imports_are_resolved(tmp_path: Path) -> None:
    """``from channel import store`` and ``from . import store`` both count as channel.store."""
    f = tmp_path / "m.py"
    f.write_text("from channel import store\nfrom . import transport\nimport trio.lowlevel\n")
    imps = imports_of(f, "channel")
    assert {"channel.store", "channel.transport", "trio.lowlevel"} <= imps


def test_channel_never_imports_dispute_or_watchtower() -> None:
    """No file in channel/ imports the dispute or watchtower packages (they build on it)."""
    bad = []
    for path in sorted(CHANNEL.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        package = ".".join(rel.parts[:-1])
        for imp in imports_of(path, package):
            if imp.split(".")[0] in {"dispute", "watchtower"}:
                bad.append(f"{rel} imports {imp}")
    assert bad == []


@pytest.mark.parametrize("module", PURE)
def test_pure_module_has_no_dynamic_imports(module: str) -> None:
    """A pure module does not sidestep the import check with __import__ or importlib."""
    path = module_path(module)
    assert path is not None
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs_ = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "__import__" not in names
    assert "import_module" not in names | attrs_
