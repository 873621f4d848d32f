"""The engine's import graph: imports run down the layers, no cycles, no private names across modules, ComfyUI never,
the test models only where they belong. Imports are read with `ast`, function-level (lazy) imports included."""

from __future__ import annotations

import ast
from pathlib import Path


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
    assert edges[f"{PACKAGE}.optim.run.engine"] >= {f"{PACKAGE}.optim.run.store", f"{PACKAGE}.optim.run.sampling"}
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
    # models.demo places them for `generate --demo` and `serve --demo`
    allowed = {f"{PACKAGE}.optim.models.demo"} | {m for m in modules("optim") if m.startswith(f"{PACKAGE}.optim.bench")}
    importers = set()
    for folder in ("optim", "nodes"):
        mods = modules(folder)
        known = set(mods) | {f"{PACKAGE}.optim.models.tiny"}
        for name, path in mods.items():
            if any(target == f"{PACKAGE}.optim.models.tiny" for target, _, _ in imports(name, path, known)):
                importers.add(name)
    assert importers and importers <= allowed, importers - allowed


def test_sampler_node_holds_no_device_offload_or_decode_logic():
    source = (ROOT / "nodes" / "sampler.py").read_text()
    for word in ("offload", ".to(", "decode", "import torch", "STORE.vae", "prepared", "sample("):
        assert word not in source, word


# The layers, bottom up: a module imports only its own folder and the layers below it. native and serve sit side by
# side: neither imports the other. A folder's subfolders (features/caching) belong to it.
LAYERS = {
    "optim": 0,  # the base: errors, handle, options, images, devices, library_warnings
    "optim.models": 1,
    "optim.features": 2,
    "optim.run": 3,
    "optim.native": 4,
    "optim.parallel": 4,
    "optim.serve": 5,  # the servers run the engine, and Ray Serve's replicas the parallel group
    "optim.bench": 6,
    "optim.cli": 7,
    "nodes": 8,
    "": 9,  # the ComfyUI entry, the pack's root __init__
}


def layer_of(module: str) -> tuple[str, int]:
    """(folder, layer) of a pack module: the longest LAYERS key its dotted name starts with."""
    inner = module.removeprefix(PACKAGE).removeprefix(".")
    for key in sorted(LAYERS, key=len, reverse=True):
        if key and (inner == key or inner.startswith(key + ".")):
            return key, LAYERS[key]
    return "", LAYERS[""]


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that runs up the layers, or sideways into another folder of the same layer."""
    found = []
    for source, targets in edges.items():
        source_folder, source_layer = layer_of(source)
        for target in targets:
            folder, layer = layer_of(target)
            if layer > source_layer or (layer == source_layer and folder != source_folder):
                found.append(f"{source} -> {target}")
    return sorted(found)


def test_the_layer_checker_finds_an_upward_and_a_sideways_import():
    p = PACKAGE
    assert layer_of(f"{p}.optim.errors") == ("optim", 0)
    assert layer_of(f"{p}.optim.features.caching.fbcache") == ("optim.features", 2)
    assert layer_of(f"{p}.nodes.sampler") == ("nodes", 8)
    assert layer_of(p) == ("", 9)
    edges = {f"{p}.optim.features.attention": {f"{p}.optim.run.offload", f"{p}.optim.devices"},  # up, down
             f"{p}.optim.native.forward": {f"{p}.optim.serve.queue_client"},  # sideways
             f"{p}.optim.run.engine": {f"{p}.optim.run.store", f"{p}.optim.features.api"},  # own folder, down
             f"{p}.nodes.cache": {f"{p}.optim.features.caching"}}
    assert layer_violations(edges) == [f"{p}.optim.features.attention -> {p}.optim.run.offload",
                                       f"{p}.optim.native.forward -> {p}.optim.serve.queue_client"]


def test_every_import_runs_down_the_layers():
    edges, _ = graph("optim", "nodes")
    assert {layer_of(m)[0] for m in edges} == set(LAYERS) - {""}  # every layer has modules
    assert layer_violations(edges) == []

