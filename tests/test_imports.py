"""The engine's import graph: no cycles, no private names across modules, ComfyUI never, the test models only where
they belong. Imports are read with `ast`, function-level (lazy) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flux2_accel"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def modules(folder: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a pack module in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # every level: lazy imports inside functions count
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve(name, path.name == "__init__.py", node.level, node.module)
            elif (node.module or "").startswith(PACKAGE):
                target = node.module
            else:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # `from . import blocks`: the module itself
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def graph(*folders: str) -> tuple[dict[str, set[str]], list[str]]:
    mods = {name: path for folder in folders for name, path in modules(folder).items()}
    known = set(modules("optim")) | set(modules("nodes")) | {PACKAGE}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for target, imported, line in imports(name, path, known):
            if target in mods and target != name:
                edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {imported} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
            if len(component) > 1 or v in edges[v]:
                result.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return result


def test_the_checker_finds_a_cycle_and_a_private_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "optim" / "x.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from .y import _hidden, shown\n")
    assert imports("flux2_accel.optim.x", source, set()) == [("flux2_accel.optim.y", "_hidden", 2),
                                                            ("flux2_accel.optim.y", "shown", 2)]


def test_import_graph_has_no_cycle():
    edges, _ = graph("optim", "nodes")
    assert edges[f"{PACKAGE}.optim.engine"] >= {f"{PACKAGE}.optim.store", f"{PACKAGE}.optim.sampling"}  # read
    assert cycles(edges) == []


def test_no_module_imports_a_private_name_of_another():
    assert graph("optim", "nodes")[1] == []


def test_engine_never_imports_comfyui():
    for name, path in modules("optim").items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("comfy", "folder_paths", "comfy_extras", "server") for n in names), name


def test_test_models_are_imported_only_by_the_demo_and_the_bench():
    allowed = {f"{PACKAGE}.optim.cli_models"} | {m for m in modules("optim") if m.startswith(f"{PACKAGE}.optim.bench")}
    importers = set()
    for folder in ("optim", "nodes"):
        mods = modules(folder)
        known = set(mods) | {f"{PACKAGE}.optim.tiny"}
        for name, path in mods.items():
            if any(target == f"{PACKAGE}.optim.tiny" for target, _, _ in imports(name, path, known)):
                importers.add(name)
    assert importers and importers <= allowed, importers - allowed


def test_sampler_node_holds_no_device_offload_or_decode_logic():
    source = (ROOT / "nodes" / "sampler.py").read_text()
    for word in ("offload", ".to(", "decode", "import torch", "STORE.vae", "prepared", "sample("):
        assert word not in source, word
