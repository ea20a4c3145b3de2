"""The import graph DESIGN promises, read from the source with `ast` (nothing is imported):
no private name used across modules, no entry point imported from below, no cycle, and the
layers model <- sampling <- rollout <- runtime <- entry points import only downward."""

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "tspo_jax"
ENTRY_POINTS = {f"{PKG}.{m}" for m in ("train", "evaluate", "generate", "compare", "plan", "benchmark", "export")}
# An entry point that drives another one as a whole: a comparison is several training runs.
ENTRY_TO_ENTRY = {(f"{PKG}.compare", f"{PKG}.train")}
# Each layer may not import the layers listed after it.
LAYERS = [f"{PKG}.model", f"{PKG}.sampling", f"{PKG}.rollout", f"{PKG}.runtime"]


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours `name` is or lies in (its longest prefix that is a module)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].endswith("__init__.py")
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _scan(module: str):
    """(imported modules, [problems with private names]) of one module."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read(), MODULES[module])
    imports, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target:
                    imports.add(target)
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(module, node)
            if not src.startswith(PKG):
                continue
            for a in node.names:
                full = f"{src}.{a.name}"
                target = full if full in MODULES else _resolve(src)
                if target:
                    imports.add(target)
                if full in MODULES:
                    aliases[a.asname or a.name] = full
                if a.name.startswith("_") and _resolve(src) != module:
                    private.append(f"{module}:{node.lineno} imports the private {a.name} from {src}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            # a.b._c: the dotted prefix must be one of our modules, reached through an import alias
            parts, value = [], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                target = ".".join([aliases[value.id], *reversed(parts)])
                if target in MODULES and target != module:
                    private.append(f"{module}:{node.lineno} uses the private {target}.{node.attr}")
    imports.discard(module)
    return imports, private


GRAPH, PRIVATE = {}, []
for _m in MODULES:
    GRAPH[_m], _p = _scan(_m)
    PRIVATE += _p


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_the_scan_sees_the_package():
    # Guards the test itself: it must find the modules and the edges we know exist.
    assert f"{PKG}.runtime" in MODULES and f"{PKG}.model.qwen2" in MODULES
    assert f"{PKG}.runtime" in GRAPH[f"{PKG}.train"]
    assert f"{PKG}.model.qwen2" in GRAPH[f"{PKG}.sampling"]


def test_no_private_name_crosses_a_module():
    assert not PRIVATE, "\n".join(PRIVATE)


def test_no_entry_point_is_imported_from_below():
    bad = [f"{m} imports the entry point {t}" for m, ts in GRAPH.items() for t in ts
           if t in ENTRY_POINTS and (m not in ENTRY_POINTS or (m, t) not in ENTRY_TO_ENTRY)]
    assert not bad, "\n".join(bad)


def test_layers_import_only_downward():
    bad = []
    for i, layer in enumerate(LAYERS):
        above = LAYERS[i + 1 :] + sorted(ENTRY_POINTS)
        for m, ts in GRAPH.items():
            if _in(m, layer):
                bad += [f"{m} (layer {layer}) imports {t}" for t in ts if any(_in(t, a) for a in above)]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    assert not _cycles(GRAPH), _cycles(GRAPH)


@pytest.mark.parametrize("graph,expect", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expect):
    assert _cycles(graph) == expect


def test_private_use_is_caught(tmp_path, monkeypatch):
    # The scanner must flag both forms on a module of ours.
    fake = tmp_path / "fake.py"
    fake.write_text("from tspo_jax.train import _x\nfrom tspo_jax import sharding\nsharding._is_var(1)\n")
    monkeypatch.setitem(MODULES, f"{PKG}.fake", str(fake))
    _, private = _scan(f"{PKG}.fake")
    assert len(private) == 2, private


def test_graph_has_no_edges_to_unknown_modules():
    edges = defaultdict(list)
    for m, ts in GRAPH.items():
        for t in ts:
            if t not in MODULES:
                edges[m].append(t)
    assert not edges
