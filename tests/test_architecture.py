"""The import graph points one way and has no circles; no private name crosses a module.

Layers, bottom up: protocol < stages < facility, samples < analysis < analysis.studies, bench < api (the
top-level ``jacana`` package: ``jacana.core``, ``jacana.__init__``) < cli.
Every ``import jacana.X`` / ``from jacana.X import`` counts, inside functions too.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "stages", "facility", "samples", "analysis", "bench", "api", "cli")
RANK = {"protocol": 0, "stages": 1, "facility": 2, "samples": 2, "analysis": 3, "analysis.studies": 4, "bench": 4,
        "api": 5, "cli": 6}


def _local(dotted: str) -> str:
    """``jacana.X...`` as a module name here: the subpackages by folder, the rest is ``api/`` (``jacana``)."""
    rest = dotted[len("jacana"):].lstrip(".")
    return rest if rest.split(".")[0] in PACKAGES else ("api." + rest if rest else "api")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            out[".".join(p for p in f.relative_to(ROOT).with_suffix("").parts if p != "__init__")] = f
    return out


def _graph():
    mods = _modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges, private = {m: set() for m in mods}, []
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: from its own package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                node = ast.ImportFrom(module="jacana." + ".".join(up + ([node.module] if node.module else [])),
                                      names=node.names, level=0)
            if isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("jacana."):
                base = _local(node.module)
                for a in node.names:
                    target = base + "." + a.name if base + "." + a.name in mods else resolve(base)
                    if target and target != name:
                        edges[name].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append((name, target, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.name + ".").startswith("jacana.") and (t := resolve(_local(a.name))) and t != name:
                        edges[name].add(t)
    return edges, private


def _layer(module: str) -> str:
    return "analysis.studies" if module.startswith("analysis.studies") else module.split(".")[0]


def test_imports_point_down_and_name_nothing_private():
    edges, private = _graph()
    upward = sorted((a, b) for a, targets in edges.items() for b in targets if RANK[_layer(b)] > RANK[_layer(a)])
    assert upward == [], f"imports that point up a layer: {upward}"
    assert private == [], f"private names imported across modules: {private}"


def test_no_circle_of_imports():
    edges, _ = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"circle of imports: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])
