// "Invariance during training": per run, a layer x step heatmap of the layer means (rows: layers in network
// order, columns: logged steps), on the measure's color scale (the unit heatmaps' too), with a marker at
// the chosen step. Rows are labelled with the layers' full names and module types.
import {moduleTypes, textWidth} from "./layers.js";
import {outsideScaleNote} from "./scales.js";
import {chartCache, html, svg, svgText, svgTitle, formatValue} from "./plot.js";
import {stepAtOrBefore} from "./state.js";
import {paintStepGrid, stepTicks} from "./step_grid.js";

const AXIS = 22;
const TARGET_HEIGHT = 240;
const MIN_PLOT_WIDTH = 160;
const TICK_FONT = 11;
const LABEL_SPACING = 11;

function rowHeight(layers) {
  return Math.min(Math.max(Math.floor(TARGET_HEIGHT / Math.max(layers, 1)), 4), 16);
}

/** Paints the heatmap on `canvas` at `ratio` device pixels per CSS pixel (the screen's, or more for a
 *  print-resolution export). */
function paint(canvas, means, scale, width, height, ratio = window.devicePixelRatio || 1) {
  paintStepGrid(canvas, means.values, means.layers.length, scale, width, height, ratio);
}

/** The rows' labels, full names and module types; the width they need. */
function rowLabels(run) {
  const types = moduleTypes(run.entry);
  const labels = run.means.layers.map((name) => ({name, type: types.get(name) || ""}));
  return {labels, width: Math.ceil(Math.max(0, ...labels.map(({name, type}) => textWidth(`${name} ${type}`, TICK_FONT)))) + 12};
}

function createChart(run, {width, scale, measure, tooltip, onStep}) {
  const {means} = run;
  const {labels, width: labelWidth} = rowLabels(run);
  const plotWidth = Math.max(width - labelWidth, MIN_PLOT_WIDTH);
  width = labelWidth + plotWidth;
  const height = rowHeight(means.layers.length) * means.layers.length;
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  swatch.style.background = run.color;
  caption.append(swatch, html("span", "tm-run-name", run.label));
  const box = html("div", "tm-chart-box");
  box.style.width = `${width}px`;
  box.style.height = `${height + AXIS}px`;
  const canvas = html("canvas", "tm-chart-layer tm-training-heatmap");
  canvas.style.left = `${labelWidth}px`;
  canvas.dataset.run = run.entry.run;
  canvas.dataset.namespace = run.entry.namespace;
  Object.assign(canvas.dataset, {measure, min: String(scale.min), max: String(scale.max), log: String(Boolean(scale.log))});
  paint(canvas, means, scale, plotWidth, height);
  // the export draws the same heatmap at print resolution
  canvas.tmPaintAt = (ratio) => {
    const copy = document.createElement("canvas");
    paint(copy, means, scale, plotWidth, height, ratio);
    return copy;
  };
  const overlay = svg("svg", {class: "tm-chart tm-chart-layer tm-no-pointer", width, height: height + AXIS});
  const every = Math.max(1, Math.ceil(LABEL_SPACING / rowHeight(means.layers.length)));
  labels.forEach(({name, type}, l) => {
    if (l % every !== 0) return;
    const label = svgText(name, {x: labelWidth - 6, y: (l + 0.5) * rowHeight(means.layers.length), class: "tm-tick tm-layer-label",
      "text-anchor": "end", "dominant-baseline": "middle"});
    if (type) {
      const tspan = svg("tspan", {class: "tm-module-type"});
      tspan.textContent = ` ${type}`;
      label.append(tspan);
    }
    label.append(svgTitle(`${name} (${type})`));
    label.dataset.layer = name;
    overlay.append(label);
  });
  for (const [x, text] of stepTicks(means.steps, plotWidth)) {
    overlay.append(svgText(text, {x: labelWidth + x, y: height + 15, class: "tm-tick", "text-anchor": "middle"}));
  }
  const marker = svg("line", {class: "tm-marker", y1: 0, y2: height});
  overlay.append(marker);
  canvas.addEventListener("mousemove", (event) => {
    const s = Math.min(Math.floor((event.offsetX / plotWidth) * means.steps.length), means.steps.length - 1);
    const l = Math.min(Math.floor((event.offsetY / height) * means.layers.length), means.layers.length - 1);
    const value = means.values[s][l];
    tooltip.show(event, [[run.label, "tm-tooltip-title"], `layer ${labels[l].name} (${labels[l].type})`, `step ${means.steps[s]}`,
      `mean ${measure} = ${formatValue(value)}${outsideScaleNote(value, scale)}`]);
  });
  canvas.addEventListener("mouseleave", () => tooltip.hide());
  // linked views (app.js): a click on a column moves the step slider to its step
  canvas.addEventListener("click", (event) => {
    const s = Math.min(Math.max(Math.floor((event.offsetX / plotWidth) * means.steps.length), 0), means.steps.length - 1);
    onStep(means.steps[s]);
  });
  box.append(canvas, overlay);
  figure.append(caption, box);
  return {figure, marker, means, plotWidth, labelWidth};
}

/** The view in `container`: render(runs, options) draws the heatmaps, showStep(step) moves the markers. */
export function createTrainingHeatmaps(container, tooltip, {onStep = () => {}} = {}) {
  let charts = [];
  const cache = chartCache();
  return {
    /** runs: [{key, entry, label, color, means}]; options: {width, scale, measure}. */
    render(runs, options) {
      const withData = runs.filter((run) => run.means && run.means.steps.length && run.means.layers.length);
      cache.keepOnly(new Set(withData.map((run) => run.key)));
      const {width, measure, scale} = options;
      charts = withData.map((run) => cache.chart(run.key, [run.means, run.color, run.label, width, measure, scale.min, scale.max, scale.log],
        () => createChart(run, {...options, tooltip, onStep})));
      container.replaceChildren(...charts.map((chart) => chart.figure));
    },

    /** Moves each marker to the middle of the column of the step shown (the last at or before `step`). */
    showStep(step) {
      for (const {marker, means, plotWidth, labelWidth} of charts) {
        const shown = step === null ? means.steps.at(-1) : stepAtOrBefore(means.steps, step);
        const x = labelWidth + ((means.steps.indexOf(shown) + 0.5) / means.steps.length) * plotWidth;
        marker.setAttribute("x1", x);
        marker.setAttribute("x2", x);
      }
    },
  };
}
