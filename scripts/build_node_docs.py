"""Writes each node's help page from the node class itself (DESCRIPTION, INPUT_TYPES tooltips, RETURN_TYPES).

    python scripts/build_node_docs.py

web/docs/<node id>.md is where ComfyUI's frontend looks for a custom pack's node help: it fetches
/extensions/<pack folder>/docs/<node id>/<locale>.md, then /extensions/<pack folder>/docs/<node id>.md, and ComfyUI
serves /extensions/<pack folder>/ from the pack's WEB_DIRECTORY (./web). Verified in the bundled frontends 1.35.9
(pinned by ComfyUI 0.8.0), 1.49.6 (ComfyUI 0.33.0) and 1.58.1 (NodeHelpService.fetchCustomNodeHelp).

The pages are generated, never hand-edited: tests/test_docs.py fails when they drift from the node classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_DIR = ROOT / "web" / "docs"

# node category -> the docs/ page that explains the concept behind it (read in the pack's folder or its repository)
TOPIC_OF_NODE = {
    "Flux2AccelLoadDiffusionModel": "docs/precision-and-memory.md", "Flux2AccelLoadTextEncoder": "docs/precision-and-memory.md",
    "Flux2AccelLoadVAE": "docs/nodes.md", "Flux2AccelTextEncode": "docs/nodes.md", "Flux2AccelSampler": "docs/nodes.md",
    "Flux2AccelVAEDecode": "docs/nodes.md", "Flux2AccelVAEEncode": "docs/nodes.md",
    "Flux2AccelRemoteTextEncode": "docs/remote-encoding.md", "Flux2AccelStepCache": "docs/step-caching.md",
    "Flux2AccelLoraStack": "docs/lora.md", "Flux2AccelCompile": "docs/compile.md",
    "Flux2AccelToConditioning": "docs/native-graph.md", "Flux2AccelFromConditioning": "docs/native-graph.md",
    "Flux2AccelToModel": "docs/native-graph.md", "Flux2AccelNativeStepCache": "docs/native-graph.md",
    "Flux2AccelNativeCompile": "docs/native-graph.md", "Flux2AccelParallel": "docs/multi-gpu.md",
}


def _input_line(name: str, spec: tuple, optional: bool) -> str:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    kind_text = "one of " + ", ".join(f"`{c}`" for c in kind) if isinstance(kind, list) and kind else (
        "a file name" if isinstance(kind, list) else f"`{kind}`")
    default = f"; default `{options['default']}`" if "default" in options else ""
    tip = options.get("tooltip", "")
    return f"- **{name}**{' (optional)' if optional else ''}: {kind_text}{default}. {tip}".rstrip()


def page_text(node_id: str, node_class, display_name: str) -> str:
    """The help page of one node, in the markdown the frontend renders."""
    inputs = node_class.INPUT_TYPES()
    lines = [f"# {display_name}", "", node_class.DESCRIPTION.strip(), "", "## Inputs", ""]
    for section, optional in (("required", False), ("optional", True)):
        lines += [_input_line(n, s, optional) for n, s in inputs.get(section, {}).items()]
    names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
    lines += ["", "## Outputs", ""]
    lines += [f"- **{n}**: `{t}`" for n, t in zip(names, node_class.RETURN_TYPES)]
    lines += ["", f"Node id `{node_id}`. More in `{TOPIC_OF_NODE[node_id]}` in the pack's folder.", ""]
    return "\n".join(lines)


def pages() -> dict[Path, str]:
    from flux2_accel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    return {HELP_DIR / f"{node_id}.md": page_text(node_id, cls, NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id))
            for node_id, cls in NODE_CLASS_MAPPINGS.items()}


def main() -> int:
    HELP_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in pages().items():
        path.write_text(text)
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
