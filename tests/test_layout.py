"""The architecture holds: the layers of docs/ARCHITECTURE.md, no import cycle inside a package, no module over 400 lines.

Every import counts, at any depth of a module (function-level and type-checking-only ones included): an import
that only a type checker runs still ties the two modules together for a reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["p2p", "dht", "averaging", "peer"]          # each may import only itself and those to its left
#: inside peer/: a module may import from lower ranks, and from its own subpackage; never across a rank
#: (``python -m peer`` and ``python -m peer.swarm`` are entry points on top of app)
PEER_RANKS = {"peer.config": 0, "peer.checkpoint": 0, "peer.moe": 1, "peer.hosting": 2, "peer.training": 2,
              "peer.swarm_state": 2, "peer.contributions": 2, "peer.inference": 3, "peer.app": 4, "peer.swarm": 5, "peer.__main__": 5,
              "peer": 5}
MAX_LINES = 400


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


MODULES = {module_name(f): f for top in LAYERS for f in (ROOT / top).rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` names module ``a.b.c`` if there is one, else ``a.b``."""
    path, found = MODULES[name], set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def peer_rank(name: str) -> tuple[int, str]:
    """(rank, group) of a peer module: its subpackage or top-level module in PEER_RANKS."""
    for prefix in sorted(PEER_RANKS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return PEER_RANKS[prefix], prefix
    raise AssertionError(f"{name} is in no layer of peer/: add it to PEER_RANKS and docs/ARCHITECTURE.md")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_a_package():
    # a package's __init__ re-exporting its modules is not a cycle of its own: only cycles through two or more
    # real modules count
    cycles = [c for c in strongly_connected(GRAPH)
              if sum(1 for m in c if MODULES[m].name != "__init__.py") > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_follow_the_layer_order():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets
              if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])]
    assert not upward, f"imports against p2p <- dht <- averaging <- peer: {upward}"


def test_peer_subpackages_follow_their_layers():
    wrong = []
    for a, targets in GRAPH.items():
        if not a.startswith("peer"):
            continue
        rank_a, group_a = peer_rank(a)
        for b in targets:
            if b.startswith("peer"):
                rank_b, group_b = peer_rank(b)
                if group_a != group_b and rank_b >= rank_a:
                    wrong.append(f"{a} -> {b}")
    assert not wrong, ("config/checkpoint <- moe <- {hosting, training, swarm_state} <- inference <- app, and hosting "
                       "and training "
                       f"never import each other: {wrong}")


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up graph with a cycle and an upward edge is caught."""
    assert strongly_connected({"a.x": {"a.y"}, "a.y": {"a.x"}, "a.z": set()}) == [["a.x", "a.y"]]
    assert peer_rank("peer.hosting.server") == (2, "peer.hosting") and peer_rank("peer.app.cli")[0] == 4
    assert "peer.moe.gating" in GRAPH["peer.moe.remote"]                # relative and absolute imports resolve
    assert "averaging.group" in GRAPH["averaging.allreduce"]


def test_no_script_folder_shadows_a_package():
    """Scripts run as ``python bench/x.py`` put their folder first on sys.path: a module there named like a package
    (``dht.py``, ``dns.py``) would be imported instead of it, in that script and every library it loads."""
    import importlib.util
    import sys
    shadowing = [str(f.relative_to(ROOT)) for folder in ("bench", "testbed", "docker") for f in (ROOT / folder).glob("*.py")
                 if f.stem != "__init__" and (f.stem in MODULES or f.stem in sys.stdlib_module_names
                                              or importlib.util.find_spec(f.stem) is not None)]
    assert not shadowing, f"script modules named like importable packages: {shadowing}"


@pytest.mark.parametrize("folder", [*LAYERS, "bench", "testbed", "tests", "docker"])
def test_no_module_over_400_lines(folder):
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / folder).rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
