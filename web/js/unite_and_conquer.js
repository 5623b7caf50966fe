// Unite and Conquer's web extension, for ComfyUI's frontend (tested with 1.32.9 and 1.58.1):
// 1. each pack node shows its summary (the `ui.text` its run returns: the expert, the binding, the
//    rule, warnings) on the node, as plain text;
// 2. PoEBindClass's class picker lists the connected expert's own labels (GET
//    /unite_and_conquer/class_labels), never the ImageNet names of another expert.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const PACK_CATEGORY = "unite_and_conquer";
const SUMMARY = "uac_summary";
const LABELS_ROUTE = "/unite_and_conquer/class_labels";

// --- 1. summaries --------------------------------------------------------------------------------

// Summaries echo user text (prompts, labels) and workflows are shared, so they are only ever put in a
// read-only textarea's .value: the browser never parses them as HTML.
function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === SUMMARY);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.spellcheck = false;
    area.className = "uac-summary";
    area.setAttribute("aria-label", "run summary");
    Object.assign(area.style, {
      width: "100%", boxSizing: "border-box", resize: "none", fontFamily: "monospace", fontSize: "11px",
      lineHeight: "1.3", whiteSpace: "pre-wrap", overflow: "auto", padding: "4px",
      background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)",
      border: "1px solid var(--border-color, #444)", borderRadius: "4px",
    });
    widget = node.addDOMWidget(SUMMARY, "uac_summary", area, {
      serialize: false, hideOnZoom: false,
      getValue: () => area.value,
      setValue: (v) => { area.value = v == null ? "" : String(v); },
      getMinHeight: () => 64,
    });
    widget.serialize = false; // a run's result, not a setting: never saved in the workflow
  }
  widget.element.value = text;
  widget.element.rows = Math.min(8, Math.max(2, text.split("\n").length));
  const [w, h] = node.computeSize ? node.computeSize() : node.size;
  node.setSize?.([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

// --- 2. the class picker -------------------------------------------------------------------------

function link(graph, id) {
  return graph?.links?.get?.(id) ?? graph?.links?.[id] ?? null;
}

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name) ?? null;
}

function expertLoaderOf(node) {
  const input = node.inputs?.find((i) => i.name === "expert");
  if (!input || input.link == null) return null;
  const l = link(node.graph, input.link);
  const source = l && node.graph.getNodeById(l.origin_id);
  return source?.type === "PoEExpertLoader" ? source : null;
}

function labelIndex(label) {
  const m = /^(\d+)(?::|$)/.exec(String(label ?? ""));
  return m ? Number(m[1]) : -1;
}

async function refreshClassPicker(node) {
  const picker = widget(node, "class");
  const loader = expertLoaderOf(node);
  if (!picker || !loader) return;
  const token = (node.uacPickerToken = (node.uacPickerToken ?? 0) + 1);
  const query = new URLSearchParams({
    expert_name: String(widget(loader, "expert_name")?.value ?? ""),
    family: String(widget(loader, "family")?.value ?? "auto"),
  });
  let labels;
  try {
    const res = await api.fetchApi(`${LABELS_ROUTE}?${query}`);
    // A file that is not there (yet): the picker stays, and the loader names the problem when run.
    if (!res.ok) return;
    labels = (await res.json()).labels;
  } catch (err) {
    console.warn("unite_and_conquer: class labels", err);
    return;
  }
  if (token !== node.uacPickerToken || !Array.isArray(labels) || !labels.length) return;
  picker.options.values = labels;
  if (!labels.includes(picker.value)) {
    // Keep the class number across experts ("7: cock" from an old workflow becomes the digit "7").
    const i = labelIndex(picker.value);
    picker.value = labels[i >= 0 && i < labels.length ? i : 0];
  }
  node.uacClassLabels = labels;
  node.setDirtyCanvas?.(true, true);
}

function refreshPickersFedBy(loader) {
  for (const linkId of loader.outputs?.[0]?.links ?? []) {
    const l = link(loader.graph, linkId);
    const target = l && loader.graph.getNodeById(l.target_id);
    if (target?.type === "PoEBindClass") refreshClassPicker(target);
  }
}

function onWidgetChange(node, name, then) {
  const w = widget(node, name);
  if (!w) return;
  const callback = w.callback;
  w.callback = function (...args) {
    const r = callback?.apply(this, args);
    then();
    return r;
  };
}

app.registerExtension({
  name: "unite_and_conquer.ui",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.category ?? "").startsWith(PACK_CATEGORY)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      const text = output?.text;
      if (Array.isArray(text) && text.length) showSummary(this, text.map(String).join("\n"));
      return r;
    };
    if (nodeData.name === "PoEBindClass") {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (type, slot, connected, linkInfo, ioSlot) {
        const r = onConnectionsChange?.apply(this, arguments);
        if (type === LiteGraph.INPUT && this.inputs?.[slot]?.name === "expert" && connected) {
          setTimeout(() => refreshClassPicker(this), 0); // the link is in the graph once this returns
        }
        return r;
      };
    }
  },

  nodeCreated(node) {
    if (node.type === "PoEExpertLoader") {
      onWidgetChange(node, "expert_name", () => refreshPickersFedBy(node));
      onWidgetChange(node, "family", () => refreshPickersFedBy(node));
    }
  },

  loadedGraphNode(node) {
    if (node.type === "PoEBindClass") refreshClassPicker(node);
  },
});
