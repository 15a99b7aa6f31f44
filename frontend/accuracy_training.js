// Accuracy over training: per run, a transformation x step heatmap of the top-1 accuracy (rows: the
// transformations in the run's order, labelled; columns: logged steps) on the fixed scale 0 to 1, with a
// marker at the chosen step. A click on a column moves the step slider to its step.
import {chartCache, formatValue, html, svg, svgText, svgTitle} from "./plot.js";
import {stepAtOrBefore} from "./state.js";
import {paintStepGrid, stepTicks} from "./step_grid.js";

const SCALE = {min: 0, max: 1, log: false};
const AXIS = 22;
const TARGET_HEIGHT = 200;
const MIN_PLOT_WIDTH = 160;
const LABEL_WIDTH = 110;

function rowHeight(rows) {
  return Math.min(Math.max(Math.floor(TARGET_HEIGHT / Math.max(rows, 1)), 6), 18);
}

function paint(canvas, accuracy, width, height) {
  const rows = accuracy.labels.length || (accuracy.values[0] ? accuracy.values[0].length : 0);
  paintStepGrid(canvas, accuracy.values, rows, SCALE, width, height);
}

function createChart(run, {width, tooltip, onStep}) {
  const {accuracy} = run;
  const labels = accuracy.labels.length ? accuracy.labels : accuracy.values[0].map((_, r) => `transformation ${r}`);
  const plotWidth = Math.max(width - LABEL_WIDTH, MIN_PLOT_WIDTH);
  const row = rowHeight(labels.length);
  const height = row * labels.length;
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  swatch.style.background = run.color;
  caption.append(swatch, html("span", "tm-run-name", run.label));
  const box = html("div", "tm-chart-box");
  box.style.width = `${LABEL_WIDTH + plotWidth}px`;
  box.style.height = `${height + AXIS}px`;
  const canvas = html("canvas", "tm-chart-layer tm-accuracy-heatmap");
  canvas.style.left = `${LABEL_WIDTH}px`;
  canvas.dataset.run = run.entry.run;
  canvas.dataset.namespace = run.entry.namespace;
  paint(canvas, accuracy, plotWidth, height);
  // the export draws the same heatmap at print resolution
  canvas.tmPaintAt = (ratio) => {
    const copy = document.createElement("canvas");
    paintStepGrid(copy, accuracy.values, labels.length, SCALE, plotWidth, height, ratio);
    return copy;
  };
  const overlay = svg("svg", {class: "tm-chart tm-chart-layer tm-no-pointer", width: LABEL_WIDTH + plotWidth, height: height + AXIS});
  const every = Math.max(1, Math.ceil(11 / row));
  labels.forEach((label, r) => {
    if (r % every !== 0) return;
    const text = svgText(label.length > 16 ? `${label.slice(0, 15)}\u2026` : label, {x: LABEL_WIDTH - 6, y: (r + 0.5) * row,
      class: "tm-tick", "text-anchor": "end", "dominant-baseline": "middle"});
    text.append(svgTitle(label));
    overlay.append(text);
  });
  for (const [px, text] of stepTicks(accuracy.steps, plotWidth)) {
    overlay.append(svgText(text, {x: LABEL_WIDTH + px, y: height + 15, class: "tm-tick", "text-anchor": "middle"}));
  }
  const marker = svg("line", {class: "tm-marker", y1: 0, y2: height});
  overlay.append(marker);
  const cellAt = (event) => {
    const s = Math.min(Math.max(Math.floor((event.offsetX / plotWidth) * accuracy.steps.length), 0), accuracy.steps.length - 1);
    const r = Math.min(Math.max(Math.floor((event.offsetY / height) * labels.length), 0), labels.length - 1);
    return [s, r];
  };
  canvas.addEventListener("mousemove", (event) => {
    const [s, r] = cellAt(event);
    tooltip.show(event, [[run.label, "tm-tooltip-title"], labels[r], `step ${accuracy.steps[s]}`,
      `accuracy = ${formatValue(accuracy.values[s][r])}`, ["click: show this step", "tm-tooltip-hint"]], {step: String(accuracy.steps[s]), transformation: labels[r]});
  });
  canvas.addEventListener("mouseleave", () => tooltip.hide());
  canvas.addEventListener("click", (event) => onStep(accuracy.steps[cellAt(event)[0]]));
  // the column's center of a step, for tests and the marker
  canvas.stepCenter = (step) => ((accuracy.steps.indexOf(step) + 0.5) / accuracy.steps.length) * plotWidth;
  box.append(canvas, overlay);
  figure.append(caption, box);
  return {figure, marker, accuracy, plotWidth};
}

/**
 * The view in `container`. handlers: {onStep(step)}. Returns {render(runs, {width}), showStep(step)}:
 * runs [{key, entry, label, color, accuracy: api.fetchAccuracy's payload or null}].
 */
export function createAccuracyTraining(container, tooltip, {onStep = () => {}} = {}) {
  let charts = [];
  const cache = chartCache();
  return {
    render(runs, {width}) {
      const withData = runs.filter((run) => run.accuracy && run.accuracy.steps.length);
      cache.keepOnly(new Set(withData.map((run) => run.key)));
      charts = withData.map((run) => cache.chart(run.key, [run.accuracy, run.color, run.label, width],
        () => createChart(run, {width, tooltip, onStep})));
      container.replaceChildren(...charts.map((chart) => chart.figure));
    },

    /** Moves each marker to the middle of the column of the step shown (the last at or before `step`). */
    showStep(step) {
      for (const {marker, accuracy, plotWidth} of charts) {
        const shown = step === null ? accuracy.steps.at(-1) : stepAtOrBefore(accuracy.steps, step);
        const x = LABEL_WIDTH + ((accuracy.steps.indexOf(shown) + 0.5) / accuracy.steps.length) * plotWidth;
        marker.setAttribute("x1", x);
        marker.setAttribute("x2", x);
      }
    },
  };
}
