"""The import table of docs/architecture.md, enforced by walking every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"bus", "node", "gateway", "tui", "webui", "trainer", "judge", "chatbus"}

# package -> project packages and heavy libraries it must never import
NEVER = {
    "bus": PROJECT - {"bus"} | {"torch", "transformers", "starlette", "textual", "nicegui"},
    "node": {"gateway", "tui", "webui", "judge", "trainer", "chatbus", "starlette", "textual", "nicegui"},
    "gateway": {"node", "tui", "webui", "trainer", "judge", "torch", "transformers"},
    "tui": {"node", "gateway", "webui", "trainer", "judge", "torch", "transformers"},
    "webui": {"node", "gateway", "tui", "trainer", "judge", "torch", "transformers"},
    "trainer": {"gateway", "tui", "webui", "judge"},  # it may reuse node's model loading
    "judge": {"node", "gateway", "tui", "webui", "trainer", "torch", "transformers"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(NEVER))
def test_package_respects_the_import_table(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        forbidden = imports_of(path) & NEVER[package]
        if forbidden:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(forbidden)}")
    assert not bad, "\n".join(bad)
