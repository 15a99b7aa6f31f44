// Layer means over training: per run, one line per layer colored by its depth (small multiples sharing
// both axes), drawn on a canvas under an SVG of axes and a marker at the chosen step.
import {depthColor} from "./colors.js";
import {chartCache, drawAxes, finiteExtent, formatValue, html, linearScale, niceDomain, niceTicks, svg} from "./plot.js";
import {layerDepth, stepAtOrBefore} from "./state.js";

const HEIGHT = 220;
const MARGIN = {left: 52, right: 12, top: 10, bottom: 40};

/** A legend for the depth colors: first observed layer to last. */
export function depthLegend() {
  const item = html("span", "tm-legend-item");
  const ramp = html("span", "tm-depth-ramp");
  for (let i = 0; i <= 10; i++) {
    const stop = html("span");
    stop.style.background = depthColor(i / 10);
    ramp.append(stop);
  }
  item.append(html("span", "", "first layer"), ramp, html("span", "", "last layer"));
  return item;
}

function layerColors(run) {
  const indexOf = new Map(run.entry.layers.map((layer) => [layer.name, layer.index]));
  return run.means.layers.map((name) => depthColor(layerDepth(run.entry, indexOf.get(name) ?? 0)));
}

function drawLines(canvas, run, x, y, width) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(HEIGHT * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${HEIGHT}px`;
  const context = canvas.getContext("2d");
  context.scale(ratio, ratio);
  context.lineWidth = 1.25;
  const {steps, values} = run.means;
  layerColors(run).forEach((color, l) => {
    context.strokeStyle = color;
    context.fillStyle = color;
    context.beginPath();
    let drawing = false;
    steps.forEach((step, s) => {
      const value = values[s][l];
      if (!Number.isFinite(value)) {
        drawing = false;
        return;
      }
      if (drawing) context.lineTo(x(step), y(value));
      else context.moveTo(x(step), y(value));
      drawing = true;
    });
    context.stroke();
    if (steps.length === 1 && Number.isFinite(values[0][l])) context.fillRect(x(steps[0]) - 2, y(values[0][l]) - 2, 4, 4);
  });
}

function nearestLayer(run, s, value) {
  let best = -1;
  run.means.values[s].forEach((v, l) => {
    if (Number.isFinite(v) && (best < 0 || Math.abs(v - value) < Math.abs(run.means.values[s][best] - value))) best = l;
  });
  return best;
}

function createChart(run, {x, y, width, measure, tooltip, yTicks}) {
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  swatch.style.background = run.color;
  caption.append(swatch, html("span", "tm-run-name", run.label));
  const box = html("div", "tm-chart-box");
  box.style.width = `${width}px`;
  box.style.height = `${HEIGHT}px`;
  const canvas = html("canvas", "tm-chart-layer");
  drawLines(canvas, run, x, y, width);
  const overlay = svg("svg", {class: "tm-chart tm-chart-layer", width, height: HEIGHT});
  drawAxes(overlay, {
    x,
    y,
    xTicks: niceTicks(x.domain[0], x.domain[1], 4).map((v) => [v, String(v)]),
    yTicks: yTicks.map((v) => [v, formatValue(v)]),
    xLabel: "step",
    yLabel: `mean ${measure}`,
  });
  const marker = svg("line", {class: "tm-marker", y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom});
  overlay.append(marker);
  overlay.addEventListener("mousemove", (event) => {
    const {steps} = run.means;
    const s = steps.indexOf(stepAtOrBefore(steps, x.invert(event.offsetX)));
    const l = s < 0 ? -1 : nearestLayer(run, s, y.invert(event.offsetY));
    if (l < 0) return tooltip.hide();
    tooltip.show(event, [[run.label, "tm-tooltip-title"], `layer ${run.means.layers[l]}`, `step ${steps[s]}`,
      `mean ${measure} = ${formatValue(run.means.values[s][l])}`]);
  });
  overlay.addEventListener("mouseleave", () => tooltip.hide());
  box.append(canvas, overlay);
  figure.append(caption, box);
  return {figure, marker, run};
}

/** The curves view in `container`: render(runs, options) draws the charts, showStep(step) moves the markers. */
export function createCurves(container, tooltip) {
  let charts = [];
  let xScale = null;
  const cache = chartCache();

  return {
    /** runs: [{key, entry, label, color, means}]; options: {width, measure}. */
    render(runs, {width, measure}) {
      const withData = runs.filter((run) => run.means && run.means.steps.length);
      const steps = withData.flatMap((run) => [run.means.steps[0], run.means.steps.at(-1)]);
      const [lo, hi] = finiteExtent(withData.flatMap((run) => run.means.values)) || [0, 1];
      const pad = Math.max((hi - lo) * 0.05, Math.abs(hi) * 0.01, 1e-6);
      const {domain, ticks: yTicks} = niceDomain(lo - pad, hi + pad, 4);
      const x = linearScale([Math.min(...steps), Math.max(...steps)], [MARGIN.left, width - MARGIN.right]);
      const y = linearScale(domain, [HEIGHT - MARGIN.bottom, MARGIN.top]);
      xScale = x;
      cache.keepOnly(new Set(withData.map((run) => run.key)));
      charts = withData.map((run) => cache.chart(run.key, [run.means, run.color, run.label, width, measure, ...x.domain, ...y.domain],
        () => createChart(run, {x, y, width, measure, tooltip, yTicks})));
      container.replaceChildren(...charts.map((chart) => chart.figure));
    },

    /** Moves each chart's marker to the step it shows (its last step at or before `step`). */
    showStep(step) {
      for (const {marker, run} of charts) {
        const shown = step === null ? run.means.steps.at(-1) : stepAtOrBefore(run.means.steps, step);
        marker.setAttribute("x1", xScale(shown));
        marker.setAttribute("x2", xScale(shown));
      }
    },
  };
}
