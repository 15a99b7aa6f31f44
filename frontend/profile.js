// The layer profile: each run's mean measure per layer at the chosen step, against layer index or depth %
// (the comparison plot of the invariance papers), with the spread of each layer's live units as a band
// (SPREAD quantiles, when the run's unit snapshot of that step is loaded). In the difference view: each run
// minus the reference run. One SVG path per run, data-run / data-namespace on it; dots carry data-layer.
import {valueAxis} from "./axes.js";
import {deadUnitsText, layerStats, nonFiniteText, SPREAD, spreadText} from "./layer_stats.js";
import {moduleTypes, textWidth} from "./layers.js";
import {bandPath, drawAxes, drawRunLine, formatValue, linearScale, niceTicks, svg, svgText, svgTitle} from "./plot.js";

const HEIGHT = 300;
const MARGIN = {left: 56, right: 20, top: 12};
// layer names under the x axis: rotated by ANGLE degrees, at least MIN_GAP px apart along the axis so that
// neighbours (parallel lines of text MIN_GAP * sin(ANGLE) px apart) never overlap
const ANGLE = 35;
const TICK_FONT = 11;
const MIN_GAP = Math.ceil((TICK_FONT + 1) / Math.sin((ANGLE * Math.PI) / 180));
const MIN_PLOT_HEIGHT = 200;

/** The layer names to write under the axis: [[px, name]], left to right, each at least MIN_GAP px from the
 *  previous one (the first, then every next one that fits). */
function layerTicks(points, px) {
  const kept = [];
  for (const p of points) {
    const at = px(p);
    if (!kept.length || at - kept.at(-1)[0] >= MIN_GAP) kept.push([at, p.name]);
  }
  return kept;
}

/** How far rotated labels reach below where they start. */
function labelDepth(names) {
  const radians = (ANGLE * Math.PI) / 180;
  return Math.ceil(Math.max(0, ...names.map((name) => textWidth(name, TICK_FONT))) * Math.sin(radians) + TICK_FONT * Math.cos(radians));
}

function xPosition(point, xAxis) {
  return xAxis === "depth" ? point.depth * 100 : point.index;
}

function sharedNames(series) {
  const names = series[0].points.map((p) => p.name);
  const first = series[0].points;
  const same = series.every((s) => s.points.length === names.length
    && s.points.every((p, i) => p.name === names[i] && p.index === first[i].index && p.depth === first[i].depth));
  return same ? names : null;
}

function describe(s, p, {measure, difference, type}) {
  const lines = [[s.label, "tm-tooltip-title"], type ? `layer ${p.name} (${type})` : `layer ${p.name}`];
  if (difference) {
    lines.push(`${measure} \u2212 ${difference.label}: ${formatValue(p.value)}`,
      `${s.label}: ${formatValue(p.own)} (step ${s.step})`,
      `${difference.label}: ${formatValue(p.reference)} (step ${s.referenceStep})`);
    if (Number.isFinite(p.combinedSe)) {
      lines.push(`combined standard error ${formatValue(p.combinedSe)}: ${p.significant ? "larger than" : "within"} 2 \u00d7 it`);
    }
    if (s.byDepth) lines.push(`another architecture: ${difference.label}'s profile at ${Math.round(p.depth * 100)} % depth`);
    return lines;
  }
  lines.push(`mean ${measure} = ${formatValue(p.value)}${Number.isFinite(p.se) ? ` \u00b1 ${formatValue(p.se)} (${s.shards} shards)` : ""}`);
  if (p.layer) {
    for (const text of [spreadText(p.layer, formatValue), deadUnitsText(p.layer, s.meansIncludeDead), nonFiniteText(p.layer)]) {
      if (text) lines.push(text);
    }
  }
  lines.push(`step ${s.step}`);
  return lines;
}

/**
 * The profile view in `container`. handlers: {onLayerHover(name or null)}. Returns {render(series, options),
 * highlight(name)}: series [{key, entry, label, color, step, meansIncludeDead, points: [{name, index, depth,
 * value, layer (the snapshot's layer, for its spread and dead units; absent without the snapshot)}]}] (in
 * the difference view: differenceProfile's); options {xAxis: "layer" | "depth", measure, width, tooltip,
 * difference: null or {label} of the reference run}.
 */
export function createProfile(container, tooltip, {onLayerHover = () => {}} = {}) {
  let root = null;
  let highlighted = null;

  function highlight(name) {
    highlighted = name;
    if (!root) return;
    for (const dot of root.querySelectorAll(".tm-dot.tm-highlight")) dot.classList.remove("tm-highlight");
    if (name === null) return;
    for (const dot of root.querySelectorAll(".tm-dot")) if (dot.dataset.layer === name) dot.classList.add("tm-highlight");
  }

  function render(series, {xAxis, measure, width, difference = null}) {
    const drawn = series.filter((s) => s.points.length);
    const banded = difference ? [] : drawn;
    // the layer names on the x axis (by index or at their depth %) when every run has the same layers
    const names = drawn.length ? sharedNames(drawn) : null;
    const lastIndex = Math.max(1, ...drawn.flatMap((s) => s.points.map((p) => p.index)));
    const x = linearScale(xAxis === "depth" ? [0, 100] : [0, lastIndex], [MARGIN.left, width - MARGIN.right]);
    const nameTicks = names ? layerTicks(drawn[0].points, (p) => x(xPosition(p, xAxis))) : [];
    // depth: the percentages, then the names under them; index: the names instead of numbers
    const namesTop = xAxis === "depth" ? 26 : 8;
    const depth = nameTicks.length ? labelDepth(nameTicks.map(([, name]) => name)) : 0;
    const bottom = nameTicks.length ? Math.max(xAxis === "depth" ? 44 : 70, namesTop + depth + 24) : 44;
    const height = Math.max(HEIGHT, MARGIN.top + MIN_PLOT_HEIGHT + bottom);
    const band = (p) => (p.layer ? layerStats(p.layer) : null);
    const seBand = (p) => (Number.isFinite(p.se) && Number.isFinite(p.value) ? [Math.max(0, p.value - p.se), p.value + p.se] : null);
    const axis = valueAxis([
      ...drawn.map((s) => s.points.map((p) => p.value)),
      ...banded.map((s) => s.points.flatMap((p) => seBand(p) || [])),
      ...banded.map((s) => s.points.flatMap((p) => (band(p) ? [band(p).low, band(p).high] : []))),
    ], {measure, difference: Boolean(difference), bottom: height - bottom, top: MARGIN.top});
    const y = axis.scale;
    root = svg("svg", {class: "tm-chart", width, height});
    root.dataset.axis = axis.kind;
    let xTicks;
    if (xAxis === "depth") xTicks = [0, 25, 50, 75, 100].map((v) => [v, `${v}%`]);
    else if (nameTicks.length) xTicks = [];
    else xTicks = niceTicks(0, lastIndex, 8).filter(Number.isInteger).map((v) => [v, String(v)]);
    const xLabel = xAxis === "depth" ? "depth (% of observed layers)" : "layer (network order)";
    drawAxes(root, {
      x,
      y,
      xTicks,
      yTicks: axis.ticks,
      xLabel: nameTicks.length ? "" : xLabel,
      yLabel: difference ? `${measure} \u2212 reference` : `mean ${measure}`,
    });
    if (nameTicks.length) {
      const y0 = height - bottom;
      const types = moduleTypes(drawn[0].entry);
      for (const [px, name] of nameTicks) {
        if (xAxis !== "depth") root.append(svg("line", {class: "tm-axis-line", x1: px, x2: px, y1: y0, y2: y0 + 4}));
        const label = svgText(name, {class: "tm-tick tm-layer-tick", "text-anchor": "end",
          transform: `translate(${px.toFixed(1)},${y0 + namesTop}) rotate(-${ANGLE})`});
        label.dataset.layer = name;
        const type = types.get(name);
        label.append(svgTitle(type ? `${name} (${type})` : name));
        root.append(label);
      }
      root.append(svgText(xLabel, {x: (x(x.domain[0]) + x(x.domain[1])) / 2, y: y0 + namesTop + depth + 16, class: "tm-axis-label", "text-anchor": "middle"}));
    }
    if (difference) {
      root.append(svg("line", {class: "tm-zero-line", x1: x(x.domain[0]), x2: x(x.domain[1]), y1: y(0), y2: y(0)}));
    }
    for (const s of banded) {
      const d = bandPath(s.points.map((p) => [x(xPosition(p, xAxis)), band(p) ? y(band(p).low) : NaN, band(p) ? y(band(p).high) : NaN]));
      if (!d) continue;
      const area = svg("path", {class: "tm-band", d, fill: s.color});
      area.dataset.run = s.entry.run;
      area.dataset.namespace = s.entry.namespace;
      root.append(area);
    }
    let seBands = 0;
    for (const s of banded) { // ±1 standard error of each layer mean (runs logged with error bars)
      const d = bandPath(s.points.map((p) => {
        const b = seBand(p);
        return [x(xPosition(p, xAxis)), b ? y(b[0]) : NaN, b ? y(b[1]) : NaN];
      }));
      if (!d) continue;
      const area = svg("path", {class: "tm-band tm-se-band", d, fill: s.color, "fill-opacity": 0.3});
      area.dataset.run = s.entry.run;
      area.dataset.namespace = s.entry.namespace;
      root.append(area);
      seBands += 1;
    }
    root.dataset.seBands = String(seBands);
    for (const s of drawn) {
      const types = moduleTypes(s.entry);
      const line = drawRunLine(root, {
        entry: s.entry,
        color: s.color,
        points: s.points.map((p) => [x(xPosition(p, xAxis)), y(p.value)]),
        names: s.points.map((p) => p.name),
        tooltip,
        describe: (i) => describe(s, s.points[i], {measure, difference, type: types.get(s.points[i].name)}),
        onHover: (i) => onLayerHover(i === null ? null : s.points[i].name),
      });
      // the difference view: filled where the difference exceeds 2 combined standard errors, hollow where not
      for (const dot of line.dots.querySelectorAll(".tm-dot")) {
        const p = s.points[Number(dot.dataset.index)];
        if (typeof p.significant !== "boolean") continue;
        dot.dataset.significant = String(p.significant);
        if (!p.significant) dot.setAttribute("fill-opacity", "0.15");
        dot.setAttribute("stroke", s.color);
      }
    }
    if (difference && drawn.some((s) => s.points.some((p) => typeof p.significant === "boolean"))) {
      root.append(svgText("filled: |difference| > 2 combined standard errors; hollow: within",
        {x: width - MARGIN.right, y: MARGIN.top + 4, class: "tm-chart-note", "text-anchor": "end"}));
    }
    if (banded.some((s) => s.points.some(band))) {
      root.append(svgText(`band: ${SPREAD[0] * 100}\u2013${SPREAD[1] * 100} % of each layer's live units`,
        {x: width - MARGIN.right, y: MARGIN.top + 4, class: "tm-chart-note", "text-anchor": "end"}));
    }
    container.replaceChildren(root);
    highlight(highlighted);
  }

  return {render, highlight};
}
