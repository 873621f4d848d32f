// flux2-accel frontend extension: shows each run's statistics (cache skips, compile, LoRA) on the node that ran.
import { app } from "../../scripts/app.js";

const STATS_WIDGET = "flux2_stats";

function showStats(node, lines) {
  let widget = node.widgets?.find((w) => w.name === STATS_WIDGET);
  if (!widget) {
    const made = ComfyWidgets["STRING"](node, STATS_WIDGET, ["STRING", { multiline: true }], app);
    widget = made.widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.7;
    widget.serialize = false; // statistics are run output, never saved into the workflow
    (widget.options ??= {}).serialize = false; // ...nor sent in the prompt (it would change the node's cache key)
  }
  widget.value = lines.length ? lines.join("\n") : "(no statistics for this run)";
  node.setDirtyCanvas(true, true);
}

let ComfyWidgets;

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
    };
  },
});
