"""The pack's frontend in ComfyUI's own frontend, in headless Chromium, against a real ComfyUI (COMFYUI_DIR).

Prerequisites (not in CI): the Python `playwright` package (`pip install playwright`; its browser download is not
needed) and a Chromium binary (Debian: `apt-get install chromium`; FLUX2_ACCEL_CHROMIUM names another path).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from test_comfyui_real import COMFYUI_DIR, TINY_FILES, comfyui  # noqa: F401  (comfyui is a fixture)

if not COMFYUI_DIR:  # both are prerequisites of a real-ComfyUI test; CI has neither
    pytest.skip("set COMFYUI_DIR to run the frontend in a real ComfyUI", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FLUX2_ACCEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.endswith("_api.json"))
TINY = {"Flux2AccelLoadDiffusionModel": ("model_name", "tiny_flux2_dev.safetensors"),
        "Flux2AccelLoadTextEncoder": ("text_encoder_name", "tiny_mistral.safetensors"),
        "Flux2AccelLoadVAE": ("vae_name", "tiny_flux2_vae.safetensors")}

# JavaScript helpers run in the page (window.app is ComfyUI's app).
JS_NODE = "(type) => app.graph.nodes.find((n) => n.type === type)"


@pytest.fixture(scope="module")
def page(comfyui):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set FLUX2_ACCEL_CHROMIUM)")
    url, _, _ = comfyui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        pg = context.new_page()
        pg.console_errors = []
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append((m.text, m.location.get("url", ""))))
        pg.on("pageerror", lambda e: pg.console_errors.append((str(e), "pageerror")))
        # A fresh user directory opens the templates browser over the canvas; a returning user has seen it.
        urllib.request.urlopen(urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                                      method="POST"), timeout=10).close()
        pg.goto(url)
        pg.wait_for_function("() => window.app?.graph && app.extensionManager && "
                             "window.LiteGraph?.registered_node_types?.Flux2AccelSampler", timeout=120_000)
        _close_dialogs(pg)
        yield pg
        browser.close()


def _close_dialogs(page) -> None:
    page.wait_for_timeout(1500)
    for _ in range(3):
        dialogs = page.locator(".p-dialog")
        if not dialogs.count():
            return
        close = dialogs.first.locator("button[aria-label='Close'], .p-dialog-close-button, "
                                      "button:has(i[class*='lucide--x'])")
        close.first.click() if close.count() else page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    html = page.locator(".p-dialog").first.inner_html()[:1500] if page.locator(".p-dialog").count() else ""
    assert not html, f"a dialog stays open over the canvas: {html}"


def _errors(page, since=0):
    """Console errors, less the estimate route's 400s for models this test ComfyUI does not have (the node shows
    them as its estimate text, which is their purpose)."""
    return [(text, where) for text, where in page.console_errors[since:]
            if not ("/flux2accel/estimate" in where and "400" in text)]


def _load(page, workflow: dict) -> None:
    page.evaluate("async (w) => { await app.loadGraphData(w); }", workflow)
    page.wait_for_timeout(500)


def _tiny_ui(name: str) -> dict:
    """A shipped UI workflow with the tiny models picked and a 64x48, 2-step sampler."""
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    for node in workflow["nodes"]:
        if isinstance(node.get("widgets_values"), list):  # every model file (LoRAs too) -> the fixture's stand-in
            node["widgets_values"] = [TINY_FILES.get(v, v) if isinstance(v, str) else v
                                      for v in node["widgets_values"]]
        if node["type"] in TINY:
            node["widgets_values"][0] = TINY[node["type"]][1]
        if node["type"] == "Flux2AccelSampler":
            node["widgets_values"][:3] = [64, 48, 2]
    return workflow


def _estimate_text(page, node_type: str) -> str:
    return page.evaluate(f"(t) => ({JS_NODE})(t)?.widgets?.find((w) => w.name === 'flux2_estimate')"
                         "?.element?.textContent ?? null", node_type)


def _wait_estimate(page, node_type: str, contains: str) -> str:
    deadline = time.time() + 30
    while time.time() < deadline:
        text = _estimate_text(page, node_type) or ""
        if contains in text:
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"{node_type} estimate never showed '{contains}' (last: {text!r})")


def test_every_ui_workflow_loads_without_missing_nodes_or_errors(page):
    assert UI_WORKFLOWS
    info = page.evaluate("async () => await (await fetch('/object_info')).json()")
    # Canvas notes are the frontend's own node types: never in /object_info, registered by the frontend itself.
    registered = set(page.evaluate("() => Object.keys(window.LiteGraph?.registered_node_types ?? {})"))
    known = set(info) | ({"Note", "MarkdownNote"} & registered)
    for path in UI_WORKFLOWS:
        since = len(page.console_errors)
        # With the tiny models picked: frontend 1.49 (ComfyUI 0.33) flags a loader whose file is not installed,
        # which the shipped names (FLUX.2's real files) are not here.
        _load(page, _tiny_ui(path.stem))
        types = page.evaluate("() => app.graph.nodes.map((n) => [n.type, !!n.has_errors])")
        assert types and all(t in known for t, _ in types), (path.name, [t for t, _ in types if t not in known])
        assert not any(broken for _, broken in types), (path.name, types)
        page.wait_for_timeout(1000)  # the loaders' estimate requests
        assert not _errors(page, since), (path.name, _errors(page, since))


def test_loader_estimate_follows_the_precision_and_is_never_serialized(page, comfyui):
    from flux2_accel.optim.models import layouts
    from flux2_accel.optim.models.estimate import estimate_weight_bytes, format_bytes

    _, base, _ = comfyui
    model = base / "models" / "diffusion_models" / "tiny_flux2_dev.safetensors"
    encoder = base / "models" / "text_encoders" / "tiny_mistral.safetensors"
    since = len(page.console_errors)
    _load(page, _tiny_ui("flux2_t2i"))  # the loader is saved at fp8_e4m3fn
    fp8 = format_bytes(estimate_weight_bytes(model, "fp8_e4m3fn"))
    assert _wait_estimate(page, "Flux2AccelLoadDiffusionModel", " at fp8") == f"≈{fp8} at fp8_e4m3fn"
    page.evaluate(f"""() => {{
        const w = ({JS_NODE})('Flux2AccelLoadDiffusionModel').widgets.find((w) => w.name === 'precision');
        w.value = 'nf4';
        w.callback?.(w.value);
    }}""")
    nf4 = format_bytes(estimate_weight_bytes(model, "nf4"))
    assert _wait_estimate(page, "Flux2AccelLoadDiffusionModel", " at nf4") == f"≈{nf4} at nf4"
    assert nf4 != fp8
    height = page.evaluate(f"() => ({JS_NODE})('Flux2AccelLoadDiffusionModel').widgets.find("
                           "(w) => w.name === 'flux2_estimate').element.getBoundingClientRect().height"
                           " / app.canvas.ds.scale")
    assert height >= 12  # the saved node size is grown to show it
    te = format_bytes(estimate_weight_bytes(encoder, "fp8_e4m3fn", layouts.TEXT_ENCODER))
    assert _wait_estimate(page, "Flux2AccelLoadTextEncoder", " at ") == f"≈{te} at fp8_e4m3fn"

    saved = page.evaluate(f"() => ({JS_NODE})('Flux2AccelLoadDiffusionModel').serialize().widgets_values")
    assert saved == ["tiny_flux2_dev.safetensors", "nf4", "model_cpu", "auto"]
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt["1"]["inputs"].keys() == {"model_name", "precision", "offload", "attention_backend"}
    assert prompt["1"]["inputs"]["precision"] == "nf4"
    assert not _errors(page, since)


def test_sampler_shows_stats_and_step_cache_timeline(page, comfyui, tmp_path):
    url, _, log_path = comfyui
    since = len(page.console_errors)
    _load(page, _tiny_ui("flux2_t2i_fast"))
    page.evaluate(f"() => {{ ({JS_NODE})('Flux2AccelCompile').mode = 4; }}")  # bypass: no inductor build on CPU
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    sampler_stats = f"() => ({JS_NODE})('Flux2AccelSampler').widgets.find((w) => w.name === 'flux2_stats')?.value"
    deadline = time.time() + 300
    while time.time() < deadline and not page.evaluate(sampler_stats):
        page.wait_for_timeout(500)
    stats = page.evaluate(sampler_stats)
    assert stats and "cache: method=fbcache" in stats, (stats, log_path.read_text()[-3000:])
    emitted = page.evaluate("() => document.querySelectorAll('.flux2-timeline .flux2-step').length")
    assert emitted == 2, emitted  # the real run: one cell per step of the 2-step [dev] run (one branch, no CFG)

    # The strip, from a ui message as the sampler sends it (two CFG branches).
    page.evaluate(f"() => ({JS_NODE})('Flux2AccelSampler').onExecuted("
                  "{flux2_timeline: ['cond:CCSCSSCC', 'uncond:CCSCCSCC']})")
    cells = page.evaluate("() => [...document.querySelectorAll('.flux2-timeline .flux2-timeline-row')]"
                          ".map((r) => [...r.querySelectorAll('.flux2-step')].map((c) => c.classList.contains("
                          "'skipped') ? 'S' : 'C').join(''))")
    assert cells == ["CCSCSSCC", "CCSCCSCC"]
    heights = page.evaluate("() => [...document.querySelectorAll('.flux2-timeline-row, .flux2-timeline-legend')]"
                            ".map((e) => e.getBoundingClientRect().height / app.canvas.ds.scale)")
    assert len(heights) == 3 and min(heights) >= 10, heights  # nothing clipped away (in canvas units)
    legend = page.evaluate("() => document.querySelector('.flux2-timeline-legend').textContent")
    assert legend == "step cache: 11 computed (orange), 5 skipped (blue)"
    assert page.evaluate(f"() => ({JS_NODE})('Flux2AccelSampler').serialize().widgets_values.length") == 7
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert not {"flux2_timeline", "flux2_stats"} & set(prompt["5"]["inputs"])

    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
    page.wait_for_timeout(1000)
    shot = tmp_path / "flux2_accel_ui.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert not _errors(page, since), _errors(page, since)



# The frontend's NodeHelpService (1.35.9, 1.49.6, 1.58.1): for a node whose python_module is
# "custom_nodes.<folder>", it fetches /extensions/<folder>/docs/<name>/<locale>.md, then
# /extensions/<folder>/docs/<name>.md, and drops a reply served as text/html; without a page it shows DESCRIPTION.
JS_HELP = """async () => {
  const out = {};
  for (const [name, type] of Object.entries(LiteGraph.registered_node_types)) {
    const def = type.nodeData;
    if (!name.startsWith('Flux2Accel') || !def) continue;
    const parts = (def.python_module || '').split('.');
    const folder = parts.length >= 2 && parts[0] === 'custom_nodes' ? parts[1].split('@')[0] : null;
    const url = folder ? `/extensions/${folder}/docs/${name}.md` : null;
    const reply = url ? await fetch(url) : null;
    out[name] = {module: def.python_module, description: def.description, url, status: reply?.status ?? null,
                 type: reply?.headers.get('content-type') ?? '', text: reply?.ok ? await reply.text() : ''};
  }
  return out;
}"""


def test_every_node_has_the_help_page_the_frontend_fetches(page):
    from flux2_accel import NODE_CLASS_MAPPINGS

    help_pages = page.evaluate(JS_HELP)
    assert set(help_pages) == set(NODE_CLASS_MAPPINGS)
    for name, found in help_pages.items():
        assert found["module"].startswith("custom_nodes."), (name, found["module"])
        assert found["status"] == 200 and "text/html" not in found["type"], (name, found["url"], found["status"])
        assert found["description"] == NODE_CLASS_MAPPINGS[name].DESCRIPTION, name
        assert found["description"].strip() in found["text"], (name, found["text"][:200])
        assert found["text"] == (ROOT / "web" / "docs" / f"{name}.md").read_text(), name
