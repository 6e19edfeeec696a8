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


def _module_graph() -> dict[str, set[str]]:
    """Every project module → the project modules it imports (TYPE_CHECKING imports included)."""
    modules = {}
    for package in sorted(PROJECT):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                parent = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join([*parent, *([node.module] if node.module else [])])
                for alias in node.names:  # `from bus import subjects` imports the submodule
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# Known and owned elsewhere: tui's command and answer helpers type-check against the app (TYPE_CHECKING).
# Remove an entry when its circle is gone; a new circle fails the test.
KNOWN_CYCLES = [{"tui.actions", "tui.answering", "tui.app"}]


def test_the_import_graph_has_no_new_circle() -> None:
    cycles = _cycles(_module_graph())
    assert sorted(map(sorted, cycles)) == sorted(map(sorted, KNOWN_CYCLES)), cycles


CLIENTS = ["gateway", "tui", "webui", "judge", "trainer", "chatbus"]


@pytest.mark.parametrize("package", CLIENTS)
def test_clients_do_not_reach_into_the_bus_connection(package: str) -> None:
    """`client.nc` / `client.js` belong to BusClient: clients use its methods (connected, max_payload,
    bucket, read_logs, job_worker, ...)."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("nc", "js"):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if name.endswith("client"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {name}.{node.attr}")
    assert not bad, "\n".join(bad)


def _front_door() -> set[str]:
    """`bus.__all__`, read from bus/__init__.py."""
    tree = ast.parse((ROOT / "bus" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("bus/__init__.py has no __all__")


@pytest.mark.parametrize("package", CLIENTS)
def test_clients_import_the_bus_only_through_its_front_door(package: str) -> None:
    """`from bus import X` with X in `bus.__all__`; the modules behind it are not API."""
    exported = _front_door()
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                bad += [f"{where} imports {a.name}" for a in node.names if a.name.startswith("bus.")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("bus."):
                    bad.append(f"{where} imports from {node.module}")
                elif node.module == "bus":
                    bad += [
                        f"{where} imports bus.{a.name}, not exported"
                        for a in node.names
                        if a.name not in exported
                    ]
    assert not bad, "\n".join(bad)


def test_the_front_door_exports_what_it_names() -> None:
    import bus

    assert set(bus.__all__) == _front_door() and len(bus.__all__) == len(set(bus.__all__))
    assert all(hasattr(bus, name) for name in bus.__all__)
