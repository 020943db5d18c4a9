"""Static checks on the AST of protocol/ (not a regex over its text).

* Nothing that loads or runs code is reachable from a message: a call graph is built from the
  wire path (decode, handle, the server, the transports' readers) following every call and every
  reference to a protocol function (``self.m`` within the class hierarchy, ``x.m`` to every method
  named ``m``: an over-approximation); no reachable function uses pickle, marshal, shelve, dill,
  cloudpickle, ``eval``, ``exec``, ``compile``, ``__import__`` or ``allow_pickle=True``, and the
  only reachable use of ``importlib`` is :func:`~jacana.protocol.stage.load_stage`, which only the
  operator's configuration reaches (the CLI's ``--stage``, a dask task's stage reference).
* The token is compared with ``hmac.compare_digest``, never with ``==``.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

PROTOCOL_DIR = pathlib.Path(__file__).parents[1] / "protocol"

#: Where data from a peer enters: message decoding, serving, the server, the clients' readers,
#: a dask worker serving message bytes.
ENTRY_POINTS = (
    "message.decode", "message.decode_header", "rpc.handle_bytes", "rpc.handle_parts", "rpc.handle",
    "rpc.raise_if_error", "transport.read_frame", "transport.serve_task", "transport.handle_ref",
    "server.StageServer.*", "server.TcpTransport.*", "transport.SubprocessTransport.*",
)
CODE_LOADING_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
CODE_RUNNING_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
IMPORTLIB = {"importlib", "import_module"}


class ProtocolGraph:
    """Functions and methods of protocol/*.py and who references whom."""

    def __init__(self, root: pathlib.Path = PROTOCOL_DIR) -> None:
        self.trees = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(root.glob("*.py"))}
        self.funcs: dict[str, ast.AST] = {}
        self.owner: dict[str, str] = {}  # method -> class
        self.classes: dict[str, dict] = {}  # "module.Class" -> {"bases": [...], "methods": {name: qual}}
        self.methods_named: dict[str, set[str]] = defaultdict(set)
        self.names: dict[str, dict[str, str]] = defaultdict(dict)  # module -> local name -> qual
        for mod, tree in self.trees.items():
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.funcs[f"{mod}.{node.name}"] = node
                    self.names[mod][node.name] = f"{mod}.{node.name}"
                elif isinstance(node, ast.ClassDef):
                    cls = f"{mod}.{node.name}"
                    self.names[mod][node.name] = cls
                    methods = {}
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            qual = f"{cls}.{item.name}"
                            self.funcs[qual], self.owner[qual] = item, cls
                            methods[item.name] = qual
                            self.methods_named[item.name].add(qual)
                    self.classes[cls] = {"node": node, "methods": methods, "bases": []}
        for mod, tree in self.trees.items():  # imports from sibling modules, at any depth
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jacana.protocol."):
                    src = node.module.rsplit(".", 1)[1]
                    for alias in node.names:
                        if alias.name in self.names.get(src, {}):
                            self.names[mod][alias.asname or alias.name] = self.names[src][alias.name]
        for cls, info in self.classes.items():
            mod = cls.split(".")[0]
            info["bases"] = [self.names[mod][b.id] for b in info["node"].bases
                             if isinstance(b, ast.Name) and self.names[mod].get(b.id) in self.classes]

    def ancestors(self, cls: str) -> set[str]:
        out, todo = set(), [cls]
        while todo:
            c = todo.pop()
            if c not in out:
                out.add(c)
                todo.extend(self.classes[c]["bases"])
        return out

    def hierarchy(self, cls: str) -> set[str]:
        """The class, its ancestors and every class descending from any of them."""
        up = self.ancestors(cls)
        return {c for c in self.classes if self.ancestors(c) & up}

    def _class_methods(self, classes, name: str) -> set[str]:
        return {self.classes[c]["methods"][name] for c in classes if name in self.classes[c]["methods"]}

    def edges(self, qual: str) -> set[str]:
        mod, node, cls = qual.split(".")[0], self.funcs[qual], self.owner.get(qual)
        out: set[str] = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                target = self.names[mod].get(sub.id)
                if target in self.funcs:
                    out.add(target)
                elif target in self.classes:  # constructing it runs its __init__ / __post_init__
                    out |= self._class_methods(self.ancestors(target), "__init__")
                    out |= self._class_methods(self.ancestors(target), "__post_init__")
            elif isinstance(sub, ast.Attribute):
                v = sub.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls") and cls is not None:
                    out |= self._class_methods(self.hierarchy(cls), sub.attr)
                elif isinstance(v, ast.Name) and self.names[mod].get(v.id) in self.classes:
                    out |= self._class_methods(self.hierarchy(self.names[mod][v.id]), sub.attr)
                else:  # any object: every method of that name
                    out |= self.methods_named.get(sub.attr, set())
        return out

    def entry_points(self) -> set[str]:
        out = set()
        for pattern in ENTRY_POINTS:
            if pattern.endswith(".*"):
                cls = pattern[:-2]
                assert cls in self.classes, cls
                out |= set(self.classes[cls]["methods"].values())
            else:
                assert pattern in self.funcs, pattern
                out.add(pattern)
        return out

    def reachable(self) -> set[str]:
        seen, todo = set(), list(self.entry_points())
        while todo:
            q = todo.pop()
            if q not in seen:
                seen.add(q)
                todo.extend(self.edges(q) - seen)
        return seen

    def referrers(self, target: str) -> set[str]:
        return {q for q in self.funcs if target in self.edges(q) and q != target}


def code_loading_uses(node: ast.AST) -> list[str]:
    """What in ``node`` loads or runs code: imports of pickle & co, eval/exec/..., allow_pickle=True."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found += [a.name for a in sub.names if a.name.split(".")[0] in CODE_LOADING_MODULES]
        elif isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in CODE_LOADING_MODULES:
            found.append(sub.module)
        elif isinstance(sub, ast.Name) and (sub.id in CODE_RUNNING_BUILTINS or sub.id in CODE_LOADING_MODULES):
            found.append(sub.id)
        elif isinstance(sub, ast.Attribute) and sub.attr in ("__import__", "loads", "load") and \
                isinstance(sub.value, ast.Name) and sub.value.id in CODE_LOADING_MODULES | {"builtins"}:
            found.append(f"{sub.value.id}.{sub.attr}")
        elif isinstance(sub, ast.keyword) and sub.arg == "allow_pickle" and not (
                isinstance(sub.value, ast.Constant) and sub.value.value is False):
            found.append("allow_pickle")
    return found


def importlib_uses(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in IMPORTLIB or isinstance(sub, ast.Attribute) and sub.attr in IMPORTLIB:
            return True
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] == "importlib" for a in sub.names):
            return True
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] == "importlib":
            return True
    return False


def test_no_module_of_protocol_imports_pickle_or_runs_code_from_text():
    graph = ProtocolGraph()
    offenders = {mod: code_loading_uses(tree) for mod, tree in graph.trees.items()}
    assert {m: f for m, f in offenders.items() if f} == {}


def test_nothing_reachable_from_a_message_loads_or_runs_code():
    graph = ProtocolGraph()
    reach = graph.reachable()
    # the graph is not empty by accident: the wire path and the stages it serves are in it
    for q in ("message.decode", "rpc.conform", "server.StageServer._token_matches", "stage.JaxStage.apply",
              "message.encode_parts", "transport.frame_parts", "pipeline.Pipeline.apply"):
        assert q in reach, q
    offenders = {q: code_loading_uses(graph.funcs[q]) for q in sorted(reach)}
    assert {q: f for q, f in offenders.items() if f} == {}
    # importlib: only load_stage, whose stage reference comes from the operator, never a message
    assert {q for q in reach if importlib_uses(graph.funcs[q])} <= {"stage.load_stage"}
    assert graph.referrers("stage.load_stage") == {"cli.run_serve_stage", "transport._cached_stage"}
    assert graph.referrers("transport._cached_stage") == {"transport.serve_task"}
    assert "message.header_schema" not in reach


def test_the_checker_sees_what_it_must_refuse(tmp_path):
    """The checks above would catch an ``importlib``, ``__import__``, ``eval`` or ``pickle`` slipped
    into the wire path (each written into a copy of protocol/)."""
    source = {p.name: p.read_text() for p in PROTOCOL_DIR.glob("*.py")}
    anchor = '    """Serve one request with ``stage``; errors become ``error`` messages.'
    assert anchor in source["rpc.py"]
    imports = "from jacana.protocol.stage import Arrays, Stage, StageSpec, TensorSpec"
    assert imports in source["rpc.py"]
    for bad in ("importlib.import_module(req.meta['m'])", "__import__(req.meta['m'])", "eval(req.meta['e'])",
                "import pickle", "np.load(req, allow_pickle=True)", "load_stage(req.meta['stage'])"):
        root = tmp_path / f"mutant{abs(hash(bad))}"
        root.mkdir()
        for name, text in source.items():
            if name == "rpc.py":  # the line goes first into handle's body
                text = text.replace(anchor, f"    {bad}\n{anchor}", 1)
                text = text.replace(imports, imports + ", load_stage\nimport importlib", 1)
            (root / name).write_text(text)
        graph = ProtocolGraph(root)
        reach = graph.reachable()
        caught = (bool(code_loading_uses(graph.funcs["rpc.handle"]))
                  or importlib_uses(graph.funcs["rpc.handle"])
                  or graph.referrers("stage.load_stage") != {"cli.run_serve_stage", "transport._cached_stage"})
        assert "rpc.handle" in reach and caught, bad


def _mentions_token(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and "token" in n.id.lower() or isinstance(n, ast.Attribute) and "token" in n.attr.lower()
               for n in ast.walk(node))


def test_the_token_is_compared_in_constant_time():
    """No ``==``/``!=``/``in``/``is`` on anything named like the token in server.py, and the hello's
    token is checked by ``hmac.compare_digest`` against the server's. Fails with ``==`` in its place."""
    tree = ast.parse((PROTOCOL_DIR / "server.py").read_text())
    def plain_comparison(n: ast.Compare) -> bool:
        if any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in n.ops):
            return True
        is_none = any(isinstance(c, ast.Constant) and c.value is None for c in [n.left, *n.comparators])
        return any(isinstance(op, (ast.Is, ast.IsNot)) for op in n.ops) and not is_none

    plain = [ast.unparse(n) for n in ast.walk(tree)
             if isinstance(n, ast.Compare) and _mentions_token(n) and plain_comparison(n)]
    assert plain == [], f"token compared with a plain operator: {plain}"
    digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "compare_digest" and isinstance(n.func.value, ast.Name) and n.func.value.id == "hmac"]
    assert any(any(_mentions_token(a) for a in call.args) for call in digests), "no hmac.compare_digest on the token"
