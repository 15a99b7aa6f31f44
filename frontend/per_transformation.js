// Per-transformation measures (ie_t: the invariance error, ee_t: the equivariance error) at the chosen step,
// one panel per selected run that logs them: the error against the transformation's parameter (one line
// per layer, colored by depth, ±1 standard error bands when the run has error bars), and a layer x
// transformation heatmap. A product set (two op kinds varying, e.g. rotation x scale) is drawn as a 2-D grid
// per layer with both parameters on the axes. Layer names and labels only ever go into text nodes.
import {valueAxis} from "./axes.js";
import {colorFor, cssColor, depthColor} from "./colors.js";
import {depthLegend} from "./curves.js";
import {bandPath, drawAxes, drawRunLine, formatValue, html, linearScale, svg, svgText, svgTitle} from "./plot.js";

const HEIGHT = 260;
const MARGIN = {left: 56, right: 16, top: 12, bottom: 44};
const CELL = 18;
const BAND_OPACITY = 0.18;

const KIND_NAMES = {rotate: "rotation", scale: "scale", translate: "translation", brightness: "brightness", contrast: "contrast"};
const UNIT_SYMBOLS = {degrees: "\u00b0", factor: "\u00d7", "fraction of size": "fraction of size", intensity: "intensity"};
// the parameter of a transformation without that op (the identity of a product set, e.g. "rotation 0°")
const NEUTRAL = {rotate: 0, scale: 1, translate: 0, brightness: 0, contrast: 1};

/** A parameter's axis label: "rotation (°)". */
function axisLabel({kind, unit}) {
  const name = KIND_NAMES[kind] || kind;
  const symbol = UNIT_SYMBOLS[unit] ?? unit;
  return symbol ? `${name} (${symbol})` : name;
}

/**
 * The parameters that vary over a transformation set: [{kind, unit, values: [per transformation]}] (the
 * first number of each op kind: degrees, sx, dx, ...), in the order the ops appear; kinds with one value
 * only are left out.
 */
export function varyingParameters(transformations) {
  const kinds = new Map();
  for (const t of transformations) {
    for (const op of t.ops || []) {
      if (!kinds.has(op.kind) && op.kind in NEUTRAL && op.values.length) kinds.set(op.kind, op.unit || "");
    }
  }
  const parameters = [];
  for (const [kind, unit] of kinds) {
    const values = transformations.map((t) => {
      const op = (t.ops || []).find((o) => o.kind === kind);
      return op && op.values.length ? Number(op.values[0]) : NEUTRAL[kind];
    });
    if (values.every(Number.isFinite) && new Set(values).size > 1) parameters.push({kind, unit, values});
  }
  return parameters;
}

function seText(se, shards) {
  return Number.isFinite(se) ? ` \u00b1 ${formatValue(se)} (${shards ? `${shards} shards` : "standard error"})` : "";
}

/** Error against the one varying parameter (or the transformation index), one line per layer; hovering a
 *  line names its layer in the chart, as in the layer-mean curves. */
function lineChart(item, data, parameter, {width, measure, tooltip}) {
  const T = data.transformations.length;
  const xs = parameter ? parameter.values : data.transformations.map((_, t) => t);
  const order = xs.map((_, t) => t).sort((a, b) => xs[a] - xs[b]);
  const lo = Math.min(...xs);
  const hi = Math.max(...xs);
  const x = linearScale(hi > lo ? [lo, hi] : [lo - 1, lo + 1], [MARGIN.left, width - MARGIN.right]);
  const highs = data.values.map((row, l) => row.map((v, t) => v + ((data.stderr && data.stderr[l][t]) || 0)));
  const axis = valueAxis([...data.values, ...highs], {measure, bottom: HEIGHT - MARGIN.bottom, top: MARGIN.top});
  const y = axis.scale;
  const root = svg("svg", {class: "tm-chart tm-pt-lines", width, height: HEIGHT});
  root.dataset.run = item.entry.run;
  const ticks = [...new Set(xs)].sort((a, b) => a - b).map((v) => [v, parameter ? formatValue(v) : data.transformations[v].label]);
  drawAxes(root, {
    x, y, xTicks: ticks, yTicks: axis.ticks, xLabel: parameter ? axisLabel(parameter) : "transformation", yLabel: measure,
    rotateX: !parameter,
  });
  const L = data.layers.length;
  const label = svgText("", {class: "tm-curve-label", x: MARGIN.left + 6, y: MARGIN.top + 12});
  let bands = 0;
  data.layers.forEach((name, l) => {
    const color = depthColor(L > 1 ? l / (L - 1) : 0);
    if (data.stderr) {
      const d = bandPath(order.map((t) => {
        const v = data.values[l][t];
        const se = data.stderr[l][t];
        return [x(xs[t]), Number.isFinite(se) ? y(Math.max(0, v - se)) : NaN, Number.isFinite(se) ? y(v + se) : NaN];
      }));
      if (d) {
        const band = svg("path", {class: "tm-se-band", d, fill: color, "fill-opacity": BAND_OPACITY, stroke: "none"});
        band.dataset.layer = name;
        root.append(band);
        bands += 1;
      }
    }
    drawRunLine(root, {
      entry: item.entry, color, points: order.map((t) => [x(xs[t]), y(data.values[l][t])]), names: order.map(() => name), tooltip,
      describe: (i) => {
        const t = order[i];
        return [[item.label, "tm-tooltip-title"], `layer ${name}`, data.transformations[t].label,
          `${measure} = ${formatValue(data.values[l][t])}${seText(data.stderr && data.stderr[l][t], item.shards)}`, `step ${data.step}`];
      },
      onHover: (i) => {
        label.textContent = i === null ? "" : `layer ${name}`;
      },
    });
  });
  root.append(label);
  root.dataset.bands = String(bands);
  if (T === 0) root.append(svgText("no transformations", {x: width / 2, y: HEIGHT / 2, class: "tm-chart-note", "text-anchor": "middle"}));
  return root;
}

function cellScale(data) {
  let max = 0;
  for (const row of data.values) for (const v of row) if (Number.isFinite(v) && v > max) max = v;
  return {min: 0, max: max > 0 ? max : 1};
}

function cellTitle(item, data, l, t, measure) {
  const se = data.stderr ? data.stderr[l][t] : NaN;
  return `${data.layers[l]} \u00b7 ${data.transformations[t].label}: ${measure} = ${formatValue(data.values[l][t])}${seText(se, item.shards)}`;
}

/** The layer x transformation heatmap: one row per layer (its name), one column per transformation. */
function layerHeatmap(item, data, {measure}) {
  const names = data.layers;
  const labelWidth = Math.min(180, 12 + 6.5 * Math.max(4, ...names.map((n) => n.length)));
  const headerHeight = 90;
  const T = data.transformations.length;
  const width = labelWidth + T * CELL + 8;
  const height = headerHeight + names.length * CELL + 4;
  const scale = cellScale(data);
  const root = svg("svg", {class: "tm-chart tm-pt-heatmap", width, height});
  root.dataset.run = item.entry.run;
  data.transformations.forEach((t, c) => {
    const cx = labelWidth + c * CELL + CELL / 2;
    root.append(svgText(t.label, {class: "tm-tick tm-pt-column", "text-anchor": "start",
      transform: `translate(${cx + 3},${headerHeight - 4}) rotate(-60)`}));
  });
  names.forEach((name, l) => {
    const row = svg("g", {class: "tm-pt-row"});
    row.dataset.layer = name;
    row.append(svgText(name, {x: labelWidth - 6, y: headerHeight + l * CELL + CELL / 2, class: "tm-tick tm-pt-layer",
      "text-anchor": "end", "dominant-baseline": "middle"}));
    for (let t = 0; t < T; t++) {
      const rect = svg("rect", {x: labelWidth + t * CELL, y: headerHeight + l * CELL, width: CELL - 1, height: CELL - 1,
        fill: cssColor(colorFor(data.values[l][t], scale))});
      rect.append(svgTitle(cellTitle(item, data, l, t, measure)));
      row.append(rect);
    }
    root.append(row);
  });
  return root;
}

/** A product set: one small heatmap per layer (or the layer chosen), the two parameters on the axes. */
function gridCharts(item, data, [first, second], {measure, layer}) {
  const xs = [...new Set(first.values)].sort((a, b) => a - b);
  const ys = [...new Set(second.values)].sort((a, b) => a - b);
  const scale = cellScale(data);
  const size = 22;
  const left = 58;
  const top = 8;
  const width = left + xs.length * size + 10;
  const height = top + ys.length * size + 40;
  const box = html("div", "tm-panels tm-pt-grids");
  data.layers.forEach((name, l) => {
    if (layer && layer !== name) return;
    const figure = html("figure", "tm-panel");
    figure.append(html("figcaption", "tm-panel-title", `layer ${name}`));
    const root = svg("svg", {class: "tm-chart tm-pt-grid", width, height});
    root.dataset.layer = name;
    data.transformations.forEach((_, t) => {
      const c = xs.indexOf(first.values[t]);
      const r = ys.indexOf(second.values[t]);
      const rect = svg("rect", {x: left + c * size, y: top + (ys.length - 1 - r) * size, width: size - 1, height: size - 1,
        fill: cssColor(colorFor(data.values[l][t], scale))});
      rect.append(svgTitle(cellTitle(item, data, l, t, measure)));
      root.append(rect);
    });
    xs.forEach((v, c) => root.append(svgText(formatValue(v), {x: left + c * size + size / 2, y: top + ys.length * size + 12,
      class: "tm-tick", "text-anchor": "middle"})));
    ys.forEach((v, r) => root.append(svgText(formatValue(v), {x: left - 4, y: top + (ys.length - 1 - r) * size + size / 2,
      class: "tm-tick", "text-anchor": "end", "dominant-baseline": "middle"})));
    root.append(svgText(axisLabel(first), {x: left + (xs.length * size) / 2, y: height - 4, class: "tm-axis-label", "text-anchor": "middle"}));
    root.append(svgText(axisLabel(second), {class: "tm-axis-label", "text-anchor": "middle",
      transform: `translate(10,${top + (ys.length * size) / 2}) rotate(-90)`}));
    figure.append(root);
    box.append(figure);
  });
  return box;
}

/**
 * The per-transformation view in `container`: a measure selector (ie_t / ee_t), a layer selector for product
 * sets, then one block per run. onChange() is called when a selector changes (the caller redraws). Returns
 * {measure(), render(items, {width})}: items [{key, entry, label, color, shards, record}] where record is
 * the store's record of fetchPerTransformation (or null when the run has not this measure).
 */
export function createPerTransformation(container, tooltip, {onChange = () => {}} = {}) {
  const controls = html("div", "tm-toolbar tm-pt-controls");
  const measureSelect = html("select");
  measureSelect.id = "tm-pt-measure";
  for (const [value, text] of [["ie_t", "ie_t: invariance error"], ["ee_t", "ee_t: equivariance error"]]) {
    const option = html("option", "", text);
    option.value = value;
    measureSelect.append(option);
  }
  const layerSelect = html("select");
  layerSelect.id = "tm-pt-layer";
  const layerField = html("label", "tm-field");
  layerField.append(html("span", "tm-field-label", "Layer (product sets)"), layerSelect);
  const measureField = html("label", "tm-field");
  measureField.append(html("span", "tm-field-label", "Error"), measureSelect);
  controls.append(measureField, layerField);
  const body = html("div", "tm-panels");
  body.id = "tm-pt";
  container.append(controls, body);
  measureSelect.addEventListener("change", onChange);
  layerSelect.addEventListener("change", onChange);
  let signature = null;

  function updateLayers(layers) {
    const next = JSON.stringify(layers);
    if (next === layerSelect.dataset.options) return;
    const chosen = layerSelect.value;
    layerSelect.dataset.options = next;
    layerSelect.replaceChildren(...[["", "every layer"], ...layers.map((n) => [n, n])].map(([value, text]) => {
      const option = html("option", "", text);
      option.value = value;
      return option;
    }));
    layerSelect.value = layers.includes(chosen) ? chosen : "";
  }

  return {
    measure: () => measureSelect.value,

    render(items, {width}) {
      const measure = measureSelect.value;
      const next = [measure, layerSelect.value, width, ...items.flatMap((item) => [item.key, item.color, item.record, item.record && item.record.done])];
      if (signature && next.length === signature.length && next.every((v, i) => v === signature[i])) return;
      signature = next;
      const productLayers = new Set();
      const blocks = items.map((item) => {
        const figure = html("figure", "tm-panel tm-pt-run");
        figure.dataset.run = item.entry.run;
        const caption = html("figcaption", "tm-panel-title");
        const swatch = html("span", "tm-swatch");
        swatch.style.background = item.color;
        caption.append(swatch, html("span", "tm-run-name", item.label));
        figure.append(caption);
        const record = item.record;
        if (!record) {
          figure.append(html("div", "tm-message", `This run has no ${measure}.`));
          return figure;
        }
        if (!record.done) {
          figure.append(html("div", "tm-message", "loading\u2026"));
          return figure;
        }
        if (record.error || !record.value) {
          figure.append(html("div", "tm-message", record.error ? String(record.error.message || record.error) : `No ${measure} yet.`));
          return figure;
        }
        const data = record.value;
        caption.append(html("span", "tm-muted", ` step ${data.step}${data.stderr ? " \u00b7 \u00b11 standard error" : ""}`));
        const parameters = varyingParameters(data.transformations);
        if (parameters.length >= 2) {
          data.layers.forEach((name) => productLayers.add(name));
          figure.append(gridCharts(item, data, parameters, {measure, layer: layerSelect.value}));
        } else {
          const legend = html("div", "tm-legend tm-pt-legend");
          legend.append(depthLegend(`layer ${data.layers[0]}`, `layer ${data.layers.at(-1)}`));
          figure.append(legend, lineChart(item, data, parameters[0] || null, {width, measure, tooltip}));
        }
        figure.append(layerHeatmap(item, data, {measure}));
        return figure;
      });
      layerField.hidden = productLayers.size === 0;
      updateLayers([...productLayers]);
      body.replaceChildren(...blocks);
    },
  };
}
