// Exports: the data behind the views as CSV and JSON (layer profile at the step, layer means over steps,
// units at the step), and each chart section as SVG and PNG at print resolution with its title and legend.
// The images are drawn from what is on screen: the section's SVGs (styles inlined), its canvases (the
// heatmaps repainted at print resolution when they can) and its HTML text and color swatches.
import {textWidth} from "./layers.js";
import {html} from "./plot.js";

const SVG_NS = "http://www.w3.org/2000/svg";
/** PNG resolution: 300 dots per inch at the chart's size on screen (CSS pixels are 1/96 inch). */
export const PRINT_DPI = 300;
export const PRINT_RATIO = PRINT_DPI / 96;
const PADDING = 12;
const EXCLUDED = ".tm-export, .tm-explanation, .tm-legend-info, .tm-tooltip, input, button, select, script, style";
// Presentation properties copied from the screen: inherited ones where they differ from the parent's,
// the others (with their initial values) where they differ from that.
const INHERITED_PROPERTIES = [
  "fill", "fill-opacity", "stroke", "stroke-width", "stroke-opacity", "stroke-dasharray", "stroke-linejoin",
  "stroke-linecap", "font-family", "font-size", "font-weight", "font-style", "text-anchor", "visibility",
];
const OWN_PROPERTIES = {"opacity": "1", "dominant-baseline": "auto"};

// -- data ------------------------------------------------------------------------------------------------

/** A number for CSV / JSON: float32 values with the 9 significant digits that round-trip them;
 *  "NaN", "Infinity", "-Infinity" spelled out (as the backend's JSON does). */
export function exportNumber(value) {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "Infinity";
  if (value === -Infinity) return "-Infinity";
  return Number(value.toPrecision(9));
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]|^\s|\s$/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

/** CSV text (RFC 4180: comma-separated, quoted where needed, CRLF line ends) of a header and rows. */
export function toCsv(header, rows) {
  return [header, ...rows].map((row) => row.map(csvField).join(",")).join("\r\n") + "\r\n";
}

/**
 * The layer profile: each run's layer means at the step shown. series: [{entry, step, points: [{name, index,
 * depth, value}]}]; types: run entry -> Map name -> module type. {header, rows, json}.
 */
export function profileTable(series, {measure, types}) {
  const header = ["run", "namespace", "measure", "step", "layer_index", "layer", "module_type", "depth", "mean"];
  const rows = [];
  const runs = series.map((s) => {
    const moduleType = types(s.entry);
    const layers = s.points.map((p) => ({
      index: p.index, name: p.name, module_type: moduleType.get(p.name) || "", depth: exportNumber(p.depth), mean: exportNumber(p.value),
    }));
    for (const layer of layers) {
      rows.push([s.entry.run, s.entry.namespace, measure, s.step ?? "", layer.index, layer.name, layer.module_type, layer.depth, layer.mean]);
    }
    return {run: s.entry.run, namespace: s.entry.namespace, step: s.step, layers};
  });
  return {header, rows, json: {measure, kind: "layer_profile", runs}};
}

/**
 * The layer means over steps: runs [{entry, means: {layers, steps, values}}] (the layer means route's
 * sampled steps). {header, rows, json}.
 */
export function meansTable(runs, {measure, types}) {
  const header = ["run", "namespace", "measure", "step", "layer_index", "layer", "module_type", "mean"];
  const rows = [];
  const json = runs.filter((run) => run.means).map(({entry, means}) => {
    const moduleType = types(entry);
    const index = new Map(entry.layers.map((layer) => [layer.name, layer.index]));
    means.steps.forEach((step, s) => {
      means.layers.forEach((name, l) => {
        rows.push([entry.run, entry.namespace, measure, step, index.get(name) ?? l, name, moduleType.get(name) || "", exportNumber(means.values[s][l])]);
      });
    });
    return {
      run: entry.run,
      namespace: entry.namespace,
      layers: means.layers.map((name, l) => ({index: index.get(name) ?? l, name, module_type: moduleType.get(name) || ""})),
      steps: means.steps,
      values: means.values.map((row) => Array.from(row, exportNumber)),
    };
  });
  return {header, rows, json: {measure, kind: "layer_means", runs: json}};
}

/** Every unit at the step shown: panels [{entry, units: {step, layers: [{name, index, moduleType, values,
 *  dead}]}}]. {header, rows, json}. */
export function unitsTable(panels, {measure}) {
  const header = ["run", "namespace", "measure", "step", "layer_index", "layer", "module_type", "unit", "value", "dead"];
  const rows = [];
  const runs = panels.filter((panel) => panel.units).map(({entry, units}) => ({
    run: entry.run,
    namespace: entry.namespace,
    step: units.step,
    layers: units.layers.map((layer) => {
      const values = Array.from(layer.values, exportNumber);
      values.forEach((value, u) => {
        rows.push([entry.run, entry.namespace, measure, units.step, layer.index, layer.name, layer.moduleType || "", u, value, layer.dead.has(u) ? 1 : 0]);
      });
      return {index: layer.index, name: layer.name, module_type: layer.moduleType || "", values, dead: [...layer.dead].sort((a, b) => a - b)};
    }),
  }));
  return {header, rows, json: {measure, kind: "units", runs}};
}

/** One unit during training: runs [{entry, history: {steps, values, dead (Set of steps)}}] of the unit
 *  selection {layer, unit}; raw values (dead steps flagged, their value as logged). {header, rows, json}. */
export function unitHistoryTable(runs, {measure, selection}) {
  const header = ["run", "namespace", "measure", "layer", "unit", "step", "value", "dead"];
  const rows = [];
  const json = runs.map(({entry, history}) => {
    const values = Array.from(history.values, exportNumber);
    history.steps.forEach((step, s) => {
      rows.push([entry.run, entry.namespace, measure, selection.layer, selection.unit, step, values[s], history.dead.has(step) ? 1 : 0]);
    });
    return {run: entry.run, namespace: entry.namespace, steps: [...history.steps], values, dead: [...history.dead].sort((a, b) => a - b)};
  });
  return {header, rows, json: {measure, kind: "unit_history", layer: selection.layer, unit: selection.unit, runs: json}};
}

/** Accuracy during training: runs [{entry, accuracy: {steps, labels, values ([steps][transformations])}}].
 *  {header, rows, json}. */
export function accuracyTrainingTable(runs) {
  const header = ["run", "namespace", "step", "transformation_index", "transformation", "accuracy"];
  const rows = [];
  const json = runs.map(({entry, accuracy}) => {
    const count = accuracy.labels.length || (accuracy.values[0] ? accuracy.values[0].length : 0);
    const labels = Array.from({length: count}, (_, t) => accuracy.labels[t] ?? `transformation ${t}`);
    const values = accuracy.values.map((row) => Array.from(row, exportNumber));
    accuracy.steps.forEach((step, s) => labels.forEach((label, t) => rows.push([entry.run, entry.namespace, step, t, label, values[s][t]])));
    return {run: entry.run, namespace: entry.namespace, transformations: labels, steps: [...accuracy.steps], values};
  });
  return {header, rows, json: {measure: "accuracy", kind: "accuracy_training", runs: json}};
}

/** Error per transformation at the step shown: runs [{entry, data: {step, layers, transformations: [{label}],
 *  values ([layers][transformations]), stderr or null}}]. {header, rows, json}. */
export function perTransformationTable(runs, {measure, types}) {
  const header = ["run", "namespace", "measure", "step", "layer", "module_type", "transformation_index", "transformation", "value", "stderr"];
  const rows = [];
  const json = runs.map(({entry, data}) => {
    const moduleType = types(entry);
    const values = data.values.map((row) => Array.from(row, exportNumber));
    const stderr = data.stderr ? data.stderr.map((row) => Array.from(row, exportNumber)) : null;
    data.layers.forEach((name, l) => data.transformations.forEach((t, c) => {
      rows.push([entry.run, entry.namespace, measure, data.step, name, moduleType.get(name) || "", c, t.label, values[l][c], stderr ? stderr[l][c] : ""]);
    }));
    return {
      run: entry.run, namespace: entry.namespace, step: data.step,
      layers: data.layers.map((name) => ({name, module_type: moduleType.get(name) || ""})),
      transformations: data.transformations.map((t) => t.label), values, stderr,
    };
  });
  return {header, rows, json: {measure, kind: "per_transformation", runs: json}};
}

// -- downloads -------------------------------------------------------------------------------------------

/** Saves `blob` as `filename` through the browser's download. */
export function download(blob, filename) {
  const address = URL.createObjectURL(blob);
  const link = html("a");
  link.href = address;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(address), 60000);
}

/** Downloads a table as `<name>.csv` or `<name>.json`. */
export function downloadTable(table, name, format) {
  if (format === "csv") download(new Blob([toCsv(table.header, table.rows)], {type: "text/csv;charset=utf-8"}), `${name}.csv`);
  else download(new Blob([JSON.stringify(table.json, null, 1)], {type: "application/json"}), `${name}.json`);
}

/** A file name part from free text (measure names, steps): letters, digits, dot, dash and underscore. */
export function fileSafe(text) {
  return String(text).replace(/[^\w.-]+/g, "_");
}

// -- images ----------------------------------------------------------------------------------------------

function node(tag, attributes = {}) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

function visible(element) {
  return element.checkVisibility ? element.checkVisibility({opacityProperty: false, visibilityProperty: true}) : element.getClientRects().length > 0;
}

function transparent(color) {
  return !color || color === "transparent" || /rgba\(.*,\s*0\)$/.test(color);
}

/** A copy of an on-screen SVG with its computed styles inlined (the export has no stylesheet), hidden
 *  elements and class names dropped. */
function inlinedSvg(original) {
  const copy = original.cloneNode(true);
  const sources = [original, ...original.querySelectorAll("*")];
  const targets = [copy, ...copy.querySelectorAll("*")];
  const dropped = [];
  const styles = new Map();
  sources.forEach((source, i) => {
    const target = targets[i];
    const style = getComputedStyle(source);
    styles.set(source, style);
    if (style.display === "none") {
      dropped.push(target);
      return;
    }
    const parent = i > 0 ? styles.get(source.parentElement) : null;
    const declarations = [
      ...INHERITED_PROPERTIES.filter((name) => !parent || parent.getPropertyValue(name) !== style.getPropertyValue(name)),
      ...Object.keys(OWN_PROPERTIES).filter((name) => style.getPropertyValue(name) !== OWN_PROPERTIES[name]),
    ].map((name) => `${name}:${style.getPropertyValue(name)}`);
    if (declarations.length) target.setAttribute("style", declarations.join(";"));
    else target.removeAttribute("style");
    target.removeAttribute("class");
    for (const name of Object.keys(target.dataset || {})) delete target.dataset[name];
  });
  for (const target of dropped) target.remove();
  copy.setAttribute("overflow", "visible");
  return copy;
}

/** The union of rectangles {left, top, right, bottom}. */
function union(rects) {
  return rects.reduce((a, b) => ({
    left: Math.min(a.left, b.left), top: Math.min(a.top, b.top), right: Math.max(a.right, b.right), bottom: Math.max(a.bottom, b.bottom),
  }));
}

/** The text nodes of `root` outside SVGs and excluded parts, with their rectangles and styles. */
function textItems(root) {
  const items = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode(text) {
      const parent = text.parentElement;
      if (!parent || !text.data.trim() || parent.closest(EXCLUDED) || parent.closest("svg") || !visible(parent)) return NodeFilter.FILTER_REJECT;
      return NodeFilter.FILTER_ACCEPT;
    },
  });
  const range = document.createRange();
  for (let text = walker.nextNode(); text; text = walker.nextNode()) {
    range.selectNodeContents(text);
    const rect = range.getBoundingClientRect();
    if (!rect.width) continue;
    const style = getComputedStyle(text.parentElement);
    items.push({text: text.data.replace(/\s+/g, " ").trim(), rect, style});
  }
  return items;
}

/**
 * An SVG image of `section` as on screen: {svg (text), width, height} in CSS pixels. Canvases become
 * embedded PNGs, drawn at `ratio` device pixels per CSS pixel by canvases that can repaint (canvas.tmPaintAt)
 * and as they are otherwise; runs [{label, color}] adds a legend of run colors under the section (for
 * charts whose lines are told apart by run color only).
 */
export function sectionSvg(section, {ratio = PRINT_RATIO, runs = []} = {}) {
  const origin = section.getBoundingClientRect();
  const parts = [];
  const rects = [];
  const place = (rect) => ({x: rect.left - origin.left, y: rect.top - origin.top, width: rect.width, height: rect.height});

  for (const element of section.querySelectorAll("*")) {
    if (element.closest(EXCLUDED) || !visible(element)) continue;
    if (element instanceof SVGSVGElement) {
      if (element.parentElement.closest("svg")) continue;
      const rect = element.getBoundingClientRect();
      const copy = inlinedSvg(element);
      const at = place(rect);
      copy.setAttribute("x", at.x);
      copy.setAttribute("y", at.y);
      copy.setAttribute("width", at.width);
      copy.setAttribute("height", at.height);
      parts.push(copy);
      rects.push(rect, ...[...element.querySelectorAll("text")].filter(visible).map((text) => text.getBoundingClientRect()));
    } else if (element instanceof HTMLCanvasElement) {
      if (typeof element.tmDrawPending === "function") element.tmDrawPending(); // curves.js: stroked when idle
      const rect = element.getBoundingClientRect();
      if (!rect.width || !rect.height) continue;
      const source = typeof element.tmPaintAt === "function" ? element.tmPaintAt(ratio) : element;
      const at = place(rect);
      parts.push(node("image", {
        x: at.x, y: at.y, width: at.width, height: at.height, preserveAspectRatio: "none", href: source.toDataURL("image/png"),
        style: "image-rendering:pixelated",
      }));
      rects.push(rect);
    } else if (!(element instanceof SVGElement)) {
      const style = getComputedStyle(element);
      if (transparent(style.backgroundColor)) continue;
      const rect = element.getBoundingClientRect();
      if (!rect.width || !rect.height) continue;
      const at = place(rect);
      parts.push(node("rect", {x: at.x, y: at.y, width: at.width, height: at.height, fill: style.backgroundColor}));
      rects.push(rect);
    }
  }
  for (const {text, rect, style} of textItems(section)) {
    const at = place(rect);
    const label = node("text", {
      x: at.x, y: at.y + at.height / 2, "dominant-baseline": "central",
      style: `fill:${style.color};font-family:${style.fontFamily};font-size:${style.fontSize};font-weight:${style.fontWeight}`,
    });
    label.textContent = text;
    parts.push(label);
    rects.push(rect);
  }

  const body = getComputedStyle(document.body);
  let bounds = rects.length ? union(rects.map((r) => ({left: r.left, top: r.top, right: r.right, bottom: r.bottom})))
    : {left: origin.left, top: origin.top, right: origin.right, bottom: origin.bottom};
  bounds = {left: bounds.left - origin.left, top: bounds.top - origin.top, right: bounds.right - origin.left, bottom: bounds.bottom - origin.top};
  if (runs.length) {
    let x = bounds.left;
    const y = bounds.bottom + 10;
    for (const run of runs) {
      parts.push(node("rect", {x, y, width: 12, height: 12, rx: 2, fill: run.color}));
      const label = node("text", {x: x + 17, y: y + 6, "dominant-baseline": "central",
        style: `fill:${body.color};font-family:${body.fontFamily};font-size:12px`});
      label.textContent = run.label;
      parts.push(label);
      x += 17 + Math.ceil(textWidth(run.label, 12)) + 18;
    }
    bounds.right = Math.max(bounds.right, x);
    bounds.bottom = y + 14;
  }
  const width = Math.ceil(bounds.right - bounds.left + 2 * PADDING);
  const height = Math.ceil(bounds.bottom - bounds.top + 2 * PADDING);
  const root = node("svg", {xmlns: SVG_NS, width, height, viewBox: `0 0 ${width} ${height}`});
  root.style.cssText = `font-family:${body.fontFamily};color:${body.color}`;
  const background = transparent(body.backgroundColor) ? "#ffffff" : body.backgroundColor;
  root.append(node("rect", {width, height, fill: background}));
  const content = node("g", {transform: `translate(${PADDING - bounds.left},${PADDING - bounds.top})`});
  content.append(...parts);
  root.append(content);
  return {svg: new XMLSerializer().serializeToString(root), width, height};
}

const CRC_TABLE = Array.from({length: 256}, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** PNG bytes with a pHYs chunk saying `dpi` (so that print and layout programs size the image as on
 *  screen), inserted after the header chunk. */
export function withDpi(png, dpi) {
  const perMetre = Math.round(dpi / 0.0254);
  const chunk = new Uint8Array(21);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, 9);
  chunk.set([0x70, 0x48, 0x59, 0x73], 4); // "pHYs"
  view.setUint32(8, perMetre);
  view.setUint32(12, perMetre);
  chunk[16] = 1; // unit: metre
  view.setUint32(17, crc32(chunk.subarray(4, 17)));
  const headerEnd = 8 + 8 + 13 + 4; // signature, IHDR length + type, IHDR data, CRC
  const out = new Uint8Array(png.length + chunk.length);
  out.set(png.subarray(0, headerEnd));
  out.set(chunk, headerEnd);
  out.set(png.subarray(headerEnd), headerEnd + chunk.length);
  return out;
}

/** The PNG (Blob) of an SVG image of width x height CSS pixels at `ratio` pixels per CSS pixel. */
export async function svgToPng({svg: text, width, height}, ratio = PRINT_RATIO) {
  const address = URL.createObjectURL(new Blob([text], {type: "image/svg+xml"}));
  try {
    const image = new Image();
    image.src = address;
    await image.decode();
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve, reject) => canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("PNG encoding failed"))), "image/png"));
    return new Blob([withDpi(new Uint8Array(await blob.arrayBuffer()), PRINT_DPI)], {type: "image/png"});
  } finally {
    URL.revokeObjectURL(address);
  }
}

/** Downloads `section` as `<name>.svg` or `<name>.png` (options: sectionSvg's). */
export async function downloadImage(section, name, format, options = {}) {
  const image = sectionSvg(section, options);
  if (format === "svg") download(new Blob([image.svg], {type: "image/svg+xml"}), `${name}.svg`);
  else download(await svgToPng(image), `${name}.png`);
}

// -- buttons ---------------------------------------------------------------------------------------------

/**
 * A row of export buttons for one section: `what` names it (data-export="<what>-<format>"); onData(format)
 * for "csv" / "json" (omitted: no data buttons), onImage(format) for "png" / "svg". Failures are shown on
 * the row, never thrown.
 */
export function exportButtons(what, {onData = null, onImage = null}) {
  const row = html("span", "tm-export");
  const problem = html("span", "tm-error tm-export-problem");
  const button = (format, text, title, action) => {
    const element = html("button", "tm-export-button", text);
    element.type = "button";
    element.dataset.export = `${what}-${format}`;
    element.title = title;
    element.addEventListener("click", async () => {
      problem.textContent = "";
      try {
        await action(format);
      } catch (error) {
        problem.textContent = `export failed: ${error.message || error}`;
      }
    });
    return element;
  };
  if (onData) {
    row.append(button("csv", "CSV", "Download the data shown as CSV", onData), button("json", "JSON", "Download the data shown as JSON", onData));
  }
  if (onImage) {
    row.append(
      button("png", "PNG", `Download the chart as PNG at ${PRINT_DPI} dpi, with its title and legend`, onImage),
      button("svg", "SVG", "Download the chart as SVG, with its title and legend", onImage),
    );
  }
  row.append(problem);
  return row;
}
