// One unit during training: after a click on a unit heatmap's cell, that unit's value at every logged step
// of every selected run that has it (the same layer name and unit index), one line per run in the run's
// color, with TensorBoard's smoothing and the curves' y axis. Steps at which the unit is dead (no variance
// at all: its ratio is 0 / 0) are gaps. A click moves the step slider; a marker shows the chosen step.
import {valueAxis} from "./axes.js";
import {drawAxes, formatValue, html, linearScale, niceTicks, svg} from "./plot.js";
import {smooth} from "./smoothing.js";
import {stepAtOrBefore} from "./state.js";

const HEIGHT = 240;
const MARGIN = {left: 56, right: 16, top: 12, bottom: 40};

function pathOf(steps, values, x, y) {
  let d = "";
  let pen = "M";
  for (let s = 0; s < steps.length; s++) {
    const py = y(values[s]);
    if (Number.isFinite(values[s]) && Number.isFinite(py)) {
      d += `${pen}${x(steps[s]).toFixed(1)},${py.toFixed(1)}`;
      pen = "L";
    } else {
      pen = "M";
    }
  }
  return d;
}

/** The history's values with dead steps as NaN (gaps), and smoothed; computed once per (history, weight). */
const prepared = new WeakMap();
function shownValues(history, smoothing) {
  if (!prepared.has(history)) prepared.set(history, new Map());
  const cache = prepared.get(history);
  if (!cache.has(smoothing)) {
    const raw = Float64Array.from(history.values, (v, s) => (history.dead.has(history.steps[s]) ? NaN : v));
    cache.set(smoothing, {raw, smoothed: smoothing > 0 ? smooth(raw, smoothing) : raw});
  }
  return cache.get(smoothing);
}

/**
 * The view in `container`. handlers: {onStep(step), onClose()}. Returns {render(selection, runs, options),
 * showStep(step)}: selection null or {layer, unit}; runs [{key, entry, label, color, record (the store's
 * record of the unit's history) or absent: why the run has no such unit}]; options {width, measure,
 * smoothing, log}.
 */
export function createUnitHistory(container, tooltip, {onStep = () => {}, onClose = () => {}} = {}) {
  let marker = null;
  let x = null;
  let drawnSignature = null;
  let plotted = [];

  function hint() {
    container.replaceChildren(html("p", "tm-muted tm-unit-history-hint", "No unit chosen: click a cell of a unit heatmap."));
    marker = null;
    plotted = [];
  }

  function render(selection, runs, {width, measure, smoothing = 0, log = false}) {
    const signature = [selection && selection.layer, selection && selection.unit, width, measure, smoothing, log,
      ...runs.flatMap((run) => [run.key, run.color, run.record, run.record && run.record.done, run.absent])];
    if (drawnSignature && signature.length === drawnSignature.length && signature.every((v, i) => v === drawnSignature[i])) return;
    drawnSignature = signature;
    if (!selection) {
      hint();
      return;
    }
    const title = html("div", "tm-unit-history-title");
    const name = html("span", "tm-unit-history-name", `layer ${selection.layer}, unit ${selection.unit}`);
    const close = html("button", "tm-export-button tm-unit-history-close", "clear");
    close.type = "button";
    close.title = "Clears the unit shown.";
    close.addEventListener("click", () => onClose());
    title.append(name, close);
    const notes = html("div", "tm-unit-history-notes");
    plotted = [];
    for (const run of runs) {
      const note = html("div", "tm-muted tm-unit-history-note");
      const swatch = html("span", "tm-swatch");
      swatch.style.background = run.color;
      let text;
      if (run.absent) text = run.absent;
      else if (!run.record.done) text = "loading\u2026";
      else if (run.record.error) text = String(run.record.error.message || run.record.error);
      else if (!run.record.value) text = `no unit ${selection.unit} of layer ${selection.layer}`;
      else {
        const history = run.record.value;
        plotted.push({run, history, ...shownValues(history, smoothing)});
        text = `${history.steps.length} steps` + (history.dead.size ? `, dead at ${history.dead.size} of them (gaps)` : "");
      }
      note.append(swatch, html("span", "tm-run-name", run.label), html("span", "", `: ${text}`));
      notes.append(note);
    }
    if (plotted.length === 0) {
      container.replaceChildren(title, notes);
      marker = null;
      return;
    }
    const allSteps = plotted.flatMap(({history}) => [history.steps[0], history.steps.at(-1)]).filter(Number.isFinite);
    x = linearScale(allSteps.length ? [Math.min(...allSteps), Math.max(...allSteps)] : [0, 1], [MARGIN.left, width - MARGIN.right]);
    const axis = valueAxis(plotted.map(({raw}) => raw), {measure, log, bottom: HEIGHT - MARGIN.bottom, top: MARGIN.top});
    const y = axis.scale;
    const root = svg("svg", {class: "tm-chart", width, height: HEIGHT});
    root.id = "tm-unit-history-chart";
    root.dataset.axis = axis.kind;
    drawAxes(root, {
      x,
      y,
      xTicks: niceTicks(x.domain[0], x.domain[1], 6).map((v) => [v, String(v)]),
      yTicks: axis.ticks,
      xLabel: "step",
      yLabel: measure,
    });
    for (const {run, history, raw, smoothed} of plotted) {
      if (smoothed !== raw) root.append(svg("path", {class: "tm-line tm-raw-line", d: pathOf(history.steps, raw, x, y), stroke: run.color}));
      const path = svg("path", {class: "tm-line tm-unit-line", d: pathOf(history.steps, smoothed, x, y), stroke: run.color});
      path.dataset.run = run.entry.run;
      path.dataset.namespace = run.entry.namespace;
      root.append(path);
    }
    marker = svg("line", {class: "tm-marker", y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom});
    const hover = svg("rect", {class: "tm-hover-area", x: MARGIN.left, y: MARGIN.top, width: width - MARGIN.left - MARGIN.right,
      height: HEIGHT - MARGIN.top - MARGIN.bottom});
    root.append(marker, hover);
    const nearest = (px) => {
      const step = x.invert(px);
      let best = null;
      for (const {history} of plotted) {
        for (const candidate of [stepAtOrBefore(history.steps, step), history.steps.find((s) => s > step)]) {
          if (candidate !== null && candidate !== undefined && (best === null || Math.abs(candidate - step) < Math.abs(best - step))) best = candidate;
        }
      }
      return best;
    };
    const local = (event) => event.clientX - root.getBoundingClientRect().left;
    hover.addEventListener("mousemove", (event) => {
      const step = nearest(local(event));
      const lines = [[`layer ${selection.layer}, unit ${selection.unit}`, "tm-tooltip-title"], `step ${step}`];
      for (const {run, history, raw, smoothed} of plotted) {
        const s = history.steps.indexOf(step);
        if (s < 0) continue;
        const value = history.dead.has(step) ? "dead (no variance)" : formatValue(raw[s]);
        lines.push(smoothed !== raw && !history.dead.has(step)
          ? `${run.label}: ${formatValue(smoothed[s])} (smoothed), ${value}` : `${run.label}: ${value}`);
      }
      tooltip.show(event, lines, {step: String(step)});
    });
    hover.addEventListener("mouseleave", () => tooltip.hide());
    hover.addEventListener("click", (event) => onStep(nearest(local(event))));
    container.replaceChildren(title, notes, root);
  }

  return {
    render,
    /** Moves the marker to `step` (null: the latest step shown). */
    showStep(step) {
      if (!marker) return;
      const last = Math.max(...plotted.map(({history}) => history.steps.at(-1)));
      const at = step === null ? last : step;
      marker.setAttribute("x1", x(at));
      marker.setAttribute("x2", x(at));
    },
  };
}
