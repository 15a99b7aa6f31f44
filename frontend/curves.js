// Layer means over training: per run, one line per layer colored by its depth (small multiples sharing
// both axes), drawn on a canvas under an SVG of axes, a marker at the chosen step and the highlighted layer.
// TensorBoard's conventions: its smoothing (the smoothed lines over faint raw ones), a linear or log y
// axis, a value axis from 0 (no measure is negative). In the difference view each run minus the reference.
// Hovering a line names its layer and highlights it in every view; a click moves the step slider there.
import {valueAxis} from "./axes.js";
import {depthColor} from "./colors.js";
import {chartCache, drawAxes, formatValue, html, linearScale, niceTicks, svg, svgText} from "./plot.js";
import {smoothColumns} from "./smoothing.js";
import {moduleTypes} from "./layers.js";
import {layerDepth, stepAtOrBefore} from "./state.js";

const HEIGHT = 220;
const MARGIN = {left: 52, right: 12, top: 10, bottom: 40};
const RAW_ALPHA = 0.25;
const PICK_DISTANCE = 24; // pixels: farther from every line, hovering names no layer

/** A legend for the depth colors: first observed layer to last (named when the chart's layers are known). */
export function depthLegend(first = "first layer", last = "last layer") {
  const item = html("span", "tm-legend-item");
  const ramp = html("span", "tm-depth-ramp");
  for (let i = 0; i <= 10; i++) {
    const stop = html("span");
    stop.style.background = depthColor(i / 10);
    ramp.append(stop);
  }
  item.append(html("span", "", first), ramp, html("span", "", last));
  return item;
}

function layerColors(run) {
  const indexOf = new Map(run.entry.layers.map((layer) => [layer.name, layer.index]));
  return run.means.layers.map((name) => depthColor(layerDepth(run.entry, indexOf.get(name) ?? 0)));
}

/** (v) -> pixel of a scale, inlined for a linear one (the hot loop of 50 lines x 1,000 steps). */
function pixelOf(y) {
  if (y.log || y.domain[1] === y.domain[0]) return y;
  const [d0] = y.domain;
  const [r0] = y.range;
  const k = (y.range[1] - y.range[0]) / (y.domain[1] - y.domain[0]);
  return (v) => r0 + (v - d0) * k;
}

function strokeLines(context, xs, rows, colors, y) {
  const py = pixelOf(y);
  colors.forEach((color, l) => {
    context.strokeStyle = color;
    context.fillStyle = color;
    context.beginPath();
    let drawing = false;
    let points = 0;
    for (let s = 0; s < xs.length; s++) {
      const v = rows[s][l];
      const p = py(v);
      if (!Number.isFinite(v) || !Number.isFinite(p)) {
        drawing = false;
        continue;
      }
      if (drawing) context.lineTo(xs[s], p);
      else context.moveTo(xs[s], p);
      drawing = true;
      points += 1;
    }
    context.stroke();
    if (xs.length === 1 && points === 1) context.fillRect(xs[0] - 2, py(rows[0][l]) - 2, 4, 4);
  });
}

const BAND_ALPHA = 0.15;

/** Each layer mean's standard error row by step index of run.means (null where none; null without error
 *  bars or in the difference view, whose values are differences). */
function stderrRows(run, difference) {
  const stderr = run.means.stderr;
  if (!stderr || difference) return null;
  const byStep = new Map(stderr.steps.map((step, s) => [step, stderr.values[s]]));
  return run.means.steps.map((step) => byStep.get(step) || null);
}

/** ±1 standard error bands around each layer's (raw) means, in the run's color; returns how many. */
function fillBands(context, xs, rows, seRows, color, y) {
  const py = pixelOf(y);
  context.fillStyle = color;
  context.globalAlpha = BAND_ALPHA;
  let count = 0;
  for (let l = 0; l < (rows[0] || []).length; l++) {
    let segment = [];
    const flush = () => {
      if (segment.length > 1) {
        context.beginPath();
        segment.forEach(([px, , high], i) => (i ? context.lineTo(px, high) : context.moveTo(px, high)));
        for (let i = segment.length - 1; i >= 0; i--) context.lineTo(segment[i][0], segment[i][1]);
        context.closePath();
        context.fill();
        count += 1;
      }
      segment = [];
    };
    for (let s = 0; s < xs.length; s++) {
      const v = rows[s][l];
      const se = seRows[s] ? seRows[s][l] : NaN;
      const low = py(Math.max(0, v - se));
      const high = py(v + se);
      if (Number.isFinite(v) && Number.isFinite(se) && Number.isFinite(low) && Number.isFinite(high)) segment.push([xs[s], low, high]);
      else flush();
    }
    flush();
  }
  context.globalAlpha = 1;
  return count;
}

function drawLines(canvas, run, shownRows, x, y, width, seRows = null) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(HEIGHT * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${HEIGHT}px`;
  const context = canvas.getContext("2d");
  context.scale(ratio, ratio);
  context.lineWidth = 1 / ratio; // one device pixel: Skia draws hairlines far faster than wider strokes
  const colors = layerColors(run);
  const xs = Float64Array.from(run.means.steps, x);
  canvas.dataset.bands = seRows ? String(fillBands(context, xs, run.means.values, seRows, run.color, y)) : "0";
  if (shownRows !== run.means.values) {
    context.globalAlpha = RAW_ALPHA;
    strokeLines(context, xs, run.means.values, colors, y);
    context.globalAlpha = 1;
  }
  strokeLines(context, xs, shownRows, colors, y);
}

/** The index of the layer whose line passes nearest (in pixels) to py at step index s, or -1. */
function nearestLayer(rows, s, py, y) {
  let best = -1;
  let distance = PICK_DISTANCE;
  rows[s].forEach((v, l) => {
    const d = Math.abs(y(v) - py);
    if (Number.isFinite(v) && d < distance) {
      best = l;
      distance = d;
    }
  });
  return best;
}

// Stroking 50 layers x 1,000 steps (twice with smoothing) costs Skia ~15 ms of CPU per chart when the canvas
// flushes at the end of the task: in the difference view's switch, three charts took ~45 ms before the next
// frame although the section is usually below the fold (issue 14). Charts created while the view is off
// screen are stroked after that frame, when the main thread is idle; canvas.tmDrawPending() strokes one at
// once (the export calls it).
const pendingDraws = new Set();
let pendingCallback = null;

function drawPending() {
  pendingCallback = null;
  for (const canvas of [...pendingDraws]) canvas.tmDrawPending();
}

function paintLines(canvas, draw, offscreen) {
  canvas.tmDrawPending = () => {
    if (!pendingDraws.delete(canvas)) return;
    draw();
  };
  pendingDraws.add(canvas);
  if (!offscreen) {
    canvas.tmDrawPending();
    return;
  }
  if (pendingCallback === null) {
    pendingCallback = typeof requestIdleCallback === "function" ? requestIdleCallback(drawPending, {timeout: 250})
      : setTimeout(drawPending, 50);
  }
}

function linePath(steps, rows, l, x, y) {
  let d = "";
  let pen = "M";
  for (let s = 0; s < steps.length; s++) {
    const py = y(rows[s][l]);
    if (Number.isFinite(rows[s][l]) && Number.isFinite(py)) {
      d += `${pen}${x(steps[s]).toFixed(1)},${py.toFixed(1)}`;
      pen = "L";
    } else {
      pen = "M";
    }
  }
  return d;
}

function createChart(run, {x, y, yTicks, width, measure, tooltip, smoothing, difference, handlers, offscreen}) {
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  swatch.style.background = run.color;
  caption.append(swatch, html("span", "tm-run-name", run.label));
  const box = html("div", "tm-chart-box");
  box.style.width = `${width}px`;
  box.style.height = `${HEIGHT}px`;
  const canvas = html("canvas", "tm-chart-layer tm-curves-canvas");
  canvas.dataset.run = run.entry.run;
  canvas.dataset.namespace = run.entry.namespace;
  const {steps, layers} = run.means;
  const types = moduleTypes(run.entry);
  const shown = smoothColumns(run.means.values, smoothing);
  const seRows = stderrRows(run, difference);
  paintLines(canvas, () => drawLines(canvas, run, shown, x, y, width, seRows), offscreen);
  const overlay = svg("svg", {class: "tm-chart tm-chart-layer tm-curves-overlay", width, height: HEIGHT});
  overlay.dataset.run = run.entry.run;
  overlay.dataset.namespace = run.entry.namespace;
  drawAxes(overlay, {
    x,
    y,
    xTicks: niceTicks(x.domain[0], x.domain[1], 4).map((v) => [v, String(v)]),
    yTicks,
    xLabel: "step",
    yLabel: difference ? `${measure} \u2212 reference` : `mean ${measure}`,
  });
  if (difference && !y.log) overlay.append(svg("line", {class: "tm-zero-line", x1: x(x.domain[0]), x2: x(x.domain[1]), y1: y(0), y2: y(0)}));
  const marker = svg("line", {class: "tm-marker", y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom});
  const highlightPath = svg("path", {class: "tm-curve-highlight"});
  const highlightLabel = svgText("", {class: "tm-curve-label", x: MARGIN.left + 6, y: MARGIN.top + 12});
  overlay.append(marker, highlightPath, highlightLabel);

  function stepIndexAt(px) {
    const step = stepAtOrBefore(steps, x.invert(px));
    const s = steps.indexOf(step);
    const next = s + 1 < steps.length ? s + 1 : s;
    return Math.abs(x(steps[next]) - px) < Math.abs(x(steps[s]) - px) ? next : s;
  }

  // pointer position in the chart (offsetX of an SVG child would be relative to that child)
  const local = (event) => {
    const box = overlay.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  };
  overlay.addEventListener("mousemove", (event) => {
    const [px, py] = local(event);
    const s = stepIndexAt(px);
    const l = s < 0 ? -1 : nearestLayer(shown, s, py, y);
    if (l < 0) {
      tooltip.hide();
      handlers.onLayerHover(null);
      return;
    }
    const name = layers[l];
    const type = types.get(name);
    const lines = [[run.label, "tm-tooltip-title"], type ? `layer ${name} (${type})` : `layer ${name}`, `step ${steps[s]}`];
    const what = difference ? `${measure} \u2212 ${difference.label}` : `mean ${measure}`;
    if (shown !== run.means.values) {
      lines.push(`${what} = ${formatValue(shown[s][l])} (smoothed ${smoothing})`, `value ${formatValue(run.means.values[s][l])}`);
    } else {
      lines.push(`${what} = ${formatValue(run.means.values[s][l])}`);
    }
    const se = seRows && seRows[s] ? seRows[s][l] : NaN;
    if (Number.isFinite(se)) {
      lines.push(`mean ${formatValue(run.means.values[s][l])} \u00b1 ${formatValue(se)} (${run.means.stderr.shards} shards)`);
    }
    tooltip.show(event, lines, {layer: name, step: String(steps[s]), run: run.entry.run});
    handlers.onLayerHover(name);
  });
  overlay.addEventListener("mouseleave", () => {
    tooltip.hide();
    handlers.onLayerHover(null);
  });
  overlay.addEventListener("click", (event) => {
    const s = stepIndexAt(local(event)[0]);
    if (s >= 0) handlers.onStep(steps[s]);
  });
  box.append(canvas, overlay);
  figure.append(caption, box);

  function highlight(name) {
    const l = name === null ? -1 : layers.indexOf(name);
    highlightPath.setAttribute("d", l < 0 ? "" : linePath(steps, shown, l, x, y));
    highlightPath.setAttribute("stroke", l < 0 ? "none" : layerColors(run)[l]);
    highlightLabel.textContent = l < 0 ? "" : `layer ${name}`;
    overlay.dataset.highlight = l < 0 ? "" : name;
  }

  return {figure, marker, run, highlight};
}

function messageChart(run, text) {
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  swatch.style.background = run.color;
  caption.append(swatch, html("span", "tm-run-name", run.label));
  figure.append(caption, html("div", "tm-message", text));
  return {figure, marker: null, run, highlight() {}};
}

/**
 * The curves view in `container`. handlers: {onLayerHover(name or null), onStep(step)}. Returns
 * {render(runs, options), showStep(step), highlight(name)}.
 */
export function createCurves(container, tooltip, handlers = {}) {
  const on = {onLayerHover: () => {}, onStep: () => {}, ...handlers};
  let charts = [];
  let xScale = null;
  let highlighted = null;
  // one cache per mode: switching the difference view on and off shows charts already drawn
  const caches = {values: chartCache(), difference: chartCache()};
  // whether the charts are (near) the viewport; unknown until the observer first reports: drawn at once
  let offscreen = false;
  if (typeof IntersectionObserver === "function") {
    new IntersectionObserver((entries) => {
      offscreen = !entries.at(-1).isIntersecting;
      if (!offscreen && pendingDraws.size) drawPending(); // scrolled into view before the idle callback ran
    }, {rootMargin: "200px"}).observe(container);
  }

  return {
    /**
     * runs: [{key, entry, label, color, means, message}] (means in the difference view: minus the
     * reference; message: shown instead of a chart); options: {width, measure, smoothing (TensorBoard's
     * weight, 0 = none), log (y axis), difference: null or {label} of the reference run}.
     */
    render(runs, {width, measure, smoothing = 0, log = false, difference = null}) {
      const withData = runs.filter((run) => run.message || (run.means && run.means.steps.length));
      const plotted = withData.filter((run) => !run.message);
      const steps = plotted.flatMap((run) => [run.means.steps[0], run.means.steps.at(-1)]);
      const x = linearScale(steps.length ? [Math.min(...steps), Math.max(...steps)] : [0, 1], [MARGIN.left, width - MARGIN.right]);
      const axis = valueAxis(plotted.flatMap((run) => run.means.values), {
        measure, difference: Boolean(difference), log, bottom: HEIGHT - MARGIN.bottom, top: MARGIN.top, count: 4,
      });
      const y = axis.scale;
      xScale = x;
      const cache = difference ? caches.difference : caches.values;
      cache.keepOnly(new Set(withData.map((run) => run.key)));
      charts = withData.map((run) => cache.chart(run.key,
        [run.means, run.message, run.color, run.label, width, measure, ...x.domain, ...y.domain, axis.log, smoothing, difference && difference.label],
        () => (run.message ? messageChart(run, run.message)
          : createChart(run, {x, y, yTicks: axis.ticks, width, measure, tooltip, smoothing, difference, handlers: on, offscreen}))));
      container.replaceChildren(...charts.map((chart) => chart.figure));
      container.dataset.axis = axis.kind;
      for (const chart of charts) chart.highlight(highlighted);
    },

    /** Moves each chart's marker to the step it shows (its last step at or before `step`). */
    showStep(step) {
      for (const {marker, run} of charts) {
        if (!marker) continue;
        const shown = step === null ? run.means.steps.at(-1) : stepAtOrBefore(run.means.steps, step);
        marker.setAttribute("x1", xScale(shown));
        marker.setAttribute("x2", xScale(shown));
      }
    },

    /** Draws layer `name`'s line over the others in every chart and names it (null: none). */
    highlight(name) {
      highlighted = name;
      for (const chart of charts) chart.highlight(name);
    },
  };
}
