// flux2-accel frontend extension.
// - Every pack node: each run's statistics (cache skips, compile, LoRA) in a read-only text box.
// - The sampler: the step cache's timeline, one cell per transformer call, computed or skipped (ui "flux2_timeline").
// - The loaders: the chosen file's weight memory at the chosen precision, from GET /flux2accel/estimate (the server
//   reads the file's header; nothing is loaded).
// None of these is saved into the workflow or sent in the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATS_WIDGET = "flux2_stats";
const TIMELINE = "flux2_timeline"; // ui key and widget name
const ESTIMATE = "flux2_estimate"; // widget name
// Loader node -> the estimate's kind and the widget that names the file.
const LOADERS = {
  Flux2AccelLoadDiffusionModel: { kind: "diffusion_model", file: "model_name" },
  Flux2AccelLoadTextEncoder: { kind: "text_encoder", file: "text_encoder_name" },
};

let ComfyWidgets;

function noSerialize(widget) {
  widget.serialize = false; // run output and derived facts are never saved into the workflow...
  (widget.options ??= {}).serialize = false; // ...nor sent in the prompt (it would change the node's cache key)
  return widget;
}

function showStats(node, lines) {
  let widget = node.widgets?.find((w) => w.name === STATS_WIDGET);
  if (!widget) {
    const made = ComfyWidgets["STRING"](node, STATS_WIDGET, ["STRING", { multiline: true }], app);
    widget = noSerialize(made.widget);
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.7;
  }
  widget.value = lines.length ? lines.join("\n") : "(no statistics for this run)";
  fitNode(node);
  node.setDirtyCanvas(true, true);
}

// A DOM widget holding `element`, `height` px tall, carrying no value.
function infoWidget(node, name, element, height) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (widget) return widget;
  widget = node.addDOMWidget(name, name, element, {
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => height,
    getMaxHeight: () => height,
    hideOnZoom: false,
    margin: 2, // the default (10 a side) would leave a 20 px line no room at all
    serialize: false,
  });
  noSerialize(widget);
  fitNode(node);
  return widget;
}

// Grow the node (never shrink it) so that every widget, the pack's display widgets included, has its room: a
// workflow saved before they existed restores a smaller size.
function fitNode(node) {
  const [w, h] = node.computeSize();
  if (node.size[0] < w || node.size[1] < h) node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
}

// ---------------------------------------------------------------- step-cache timeline

// ui "flux2_timeline": a list of rows, one per CFG branch. A row is a string of C (computed) / S (skipped), with an
// optional "branch:" label ("cond:CCSCS"), or a list of 0/1 skip flags (1 = skipped).
export function parseTimeline(rows) {
  if (!Array.isArray(rows) || !rows.length) return [];
  if (rows.every((v) => typeof v === "number" || typeof v === "boolean")) rows = [rows];
  return rows
    .map((row) => {
      if (Array.isArray(row)) return { label: "", cells: row.map((v) => (v ? "S" : "C")) };
      const text = String(row);
      const colon = text.lastIndexOf(":");
      const label = colon >= 0 ? text.slice(0, colon) : "";
      const cells = [...text.slice(colon + 1).toUpperCase()].filter((c) => c === "C" || c === "S");
      return { label, cells };
    })
    .filter((row) => row.cells.length);
}

function showTimeline(node, raw) {
  const rows = parseTimeline(raw);
  const element = document.createElement("div");
  element.className = "flux2-timeline";
  Object.assign(element.style, { display: "flex", flexDirection: "column", gap: "2px", padding: "2px 4px",
                                 font: "10px sans-serif", color: "#aaa", overflow: "hidden" });
  const height = 24 + 14 * Math.max(1, rows.length);
  const widget = infoWidget(node, TIMELINE, element, height);
  widget.options.getMinHeight = widget.options.getMaxHeight = () => height; // CFG adds a row
  const root = widget.element ?? element;
  root.replaceChildren();
  let computed = 0, skipped = 0;
  for (const row of rows) {
    const line = document.createElement("div");
    line.className = "flux2-timeline-row";
    Object.assign(line.style, { display: "flex", gap: "1px", height: "12px", flex: "none", alignItems: "stretch" });
    if (row.label) {
      const label = document.createElement("span");
      label.textContent = row.label;
      Object.assign(label.style, { width: "44px", flex: "none", lineHeight: "12px" });
      line.append(label);
    }
    row.cells.forEach((c, i) => {
      const cell = document.createElement("div");
      cell.className = "flux2-step " + (c === "S" ? "skipped" : "computed");
      cell.title = `${row.label ? row.label + " " : ""}call ${i + 1}: ${c === "S" ? "skipped (cached)" : "computed"}`;
      Object.assign(cell.style, { flex: "1 1 0", minWidth: "2px",
                                  background: c === "S" ? "#3a6ea5" : "#e0a030" });
      line.append(cell);
      c === "S" ? skipped++ : computed++;
    });
    root.append(line);
  }
  const legend = document.createElement("div");
  legend.className = "flux2-timeline-legend";
  legend.textContent = rows.length
    ? `step cache: ${computed} computed (orange), ${skipped} skipped (blue)`
    : "step cache: no timeline for this run";
  root.append(legend);
  fitNode(node);
  node.setDirtyCanvas(true, true);
}

// ---------------------------------------------------------------- loader weight estimate

function setupEstimate(node, spec) {
  const element = document.createElement("div");
  element.className = "flux2-estimate";
  Object.assign(element.style, { font: "12px sans-serif", color: "#bbb", padding: "2px 6px",
                                 whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
  const widget = infoWidget(node, ESTIMATE, element, 22);
  let request = 0;
  const refresh = async () => {
    const file = node.widgets?.find((w) => w.name === spec.file)?.value;
    const precision = node.widgets?.find((w) => w.name === "precision")?.value;
    const mine = ++request; // a slower earlier reply must not overwrite a later choice
    const show = (text, error) => {
      if (mine !== request) return;
      const el = widget.element ?? element;
      el.textContent = text;
      el.title = text;
      el.dataset.state = error ? "error" : "ok";
      el.style.color = error ? "#e07070" : "#bbb";
      node.setDirtyCanvas(true, true);
    };
    if (!file || !precision) return show("", false);
    show("estimating weight memory…", false);
    try {
      const q = new URLSearchParams({ kind: spec.kind, name: file, precision });
      const reply = await api.fetchApi(`/flux2accel/estimate?${q}`);
      const body = await reply.json();
      reply.ok ? show(body.text, false) : show(body.error ?? `estimate failed (HTTP ${reply.status})`, true);
    } catch (e) {
      show(`estimate unavailable: ${e.message ?? e}`, true);
    }
  };
  for (const name of [spec.file, "precision"]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function () {
      const result = callback?.apply(this, arguments);
      refresh();
      return result;
    };
  }
  node.flux2RefreshEstimate = refresh;
  refresh();
}

app.registerExtension({
  name: "flux2accel.stats",
  async setup() {
    ({ ComfyWidgets } = await import("../../scripts/widgets.js"));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("Flux2Accel")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.[STATS_WIDGET]) showStats(this, message[STATS_WIDGET]);
      if (message?.[TIMELINE]) showTimeline(this, message[TIMELINE]);
    };
    const spec = LOADERS[nodeData.name];
    if (!spec) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      setupEstimate(this, spec);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.flux2RefreshEstimate?.(); // a loaded workflow sets the widgets after the node was created
      fitNode(this); // ...and its saved size
      return result;
    };
  },
});
