"""The README is a front door: small, its links resolve, its set-up is CI's; every node has a help page."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from flux2_accel import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def _build_node_docs():
    spec = importlib.util.spec_from_file_location("build_node_docs", ROOT / "scripts" / "build_node_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _commands(lines) -> list[str]:
    """Shell commands, one per `&&`-part, without comments and blank lines, whitespace normalised."""
    commands = []
    for line in lines:
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        commands += [shlex.join(shlex.split(part)) for part in line.split("&&") if part.strip()]
    return commands


def _ci_section(name: str) -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index(f"# --- README: {name} ---") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("# --- ")), len(lines))
    return _commands(lines[start:end])


def _readme_blocks() -> list[list[str]]:
    development = README.read_text().split("## Development", 1)[1]
    return [_commands(block.splitlines()) for block in FENCE.findall(development)]


def test_readme_is_at_most_12_kb():
    assert len(README.read_bytes()) <= 12 * 1024


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target} points nowhere"
        if anchor:
            assert anchor in _anchors(linked), f"{path.name}: no heading for #{anchor} in {linked.name}"


def test_every_docs_page_opens_with_when_to_use_it():
    for path in DOC_FILES[1:]:
        if path.name == "benchmark.md":  # the bench's reference, linked from performance.md
            continue
        first_paragraph = path.read_text().split("\n\n")[1]
        assert first_paragraph.startswith("When to use it:"), path.name


def test_readme_setup_and_test_commands_are_ci_s():
    setup, main_job, tests = _readme_blocks()
    assert setup == _ci_section("set-up")
    assert tests == _ci_section("tests")
    assert main_job == ["flux2-accel generate --demo -o demo.png"]


def test_command_parsing_splits_and_drops_comments():
    assert _commands(["a && . b  # why", "# note", "", "c  'd e'"]) == ["a", ". b", "c 'd e'"]


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_has_a_description_and_a_current_help_page(node_id):
    node_class = NODE_CLASS_MAPPINGS[node_id]
    description = getattr(node_class, "DESCRIPTION", "")
    assert isinstance(description, str) and len(description.strip()) >= 20, node_id
    module = _build_node_docs()
    page = module.HELP_DIR / f"{node_id}.md"
    assert page.exists(), f"{page} missing: run scripts/build_node_docs.py"
    expected = module.page_text(node_id, node_class, NODE_DISPLAY_NAME_MAPPINGS[node_id])
    assert page.read_text() == expected, f"{page.name} drifted from the node class; run scripts/build_node_docs.py"
    assert description.strip() in page.read_text()
    assert (ROOT / module.TOPIC_OF_NODE[node_id]).exists()


def test_help_pages_are_where_the_frontend_fetches_them():
    """ComfyUI serves /extensions/<pack folder>/ from WEB_DIRECTORY; the frontend reads docs/<node id>.md there."""
    init = (ROOT / "__init__.py").read_text()
    web_directory = re.search(r'WEB_DIRECTORY = "([^"]+)"', init).group(1)
    assert (ROOT / web_directory / "docs").resolve() == _build_node_docs().HELP_DIR.resolve()
    stray = {p.stem for p in _build_node_docs().HELP_DIR.glob("*.md")} - set(NODE_CLASS_MAPPINGS)
    assert not stray, f"help pages for no node: {stray}"
