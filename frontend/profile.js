// The layer profile: each run's mean measure per layer at the chosen step, against layer index or depth %
// (the comparison plot of the invariance papers), with the spread of each layer's live units as a band
// (SPREAD quantiles, when the run's unit snapshot of that step is loaded). In the difference view: each run
// minus the reference run. One SVG path per run, data-run / data-namespace on it; dots carry data-layer.
import {valueAxis} from "./axes.js";
import {deadUnitsText, layerStats, nonFiniteText, SPREAD, spreadText} from "./layer_stats.js";
import {bandPath, categoryTicks, drawAxes, drawRunLine, formatValue, linearScale, niceTicks, svg, svgText} from "./plot.js";

const HEIGHT = 300;
const MARGIN = {left: 56, right: 20, top: 12};

function xPosition(point, xAxis) {
  return xAxis === "depth" ? point.depth * 100 : point.index;
}

function sharedNames(series) {
  const names = series[0].points.map((p) => p.name);
  const same = series.every((s) => s.points.length === names.length && s.points.every((p, i) => p.name === names[i] && p.index === i));
  return same ? names : null;
}

function describe(s, p, {measure, difference}) {
  const lines = [[s.label, "tm-tooltip-title"], `layer ${p.name}`];
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
    const names = xAxis === "layer" && drawn.length ? sharedNames(drawn) : null;
    const rotate = Boolean(names) && names.some((name) => name.length > 3);
    const bottom = rotate ? 70 : 44;
    const lastIndex = Math.max(1, ...drawn.flatMap((s) => s.points.map((p) => p.index)));
    const x = linearScale(xAxis === "depth" ? [0, 100] : [0, lastIndex], [MARGIN.left, width - MARGIN.right]);
    const band = (p) => (p.layer ? layerStats(p.layer) : null);
    const seBand = (p) => (Number.isFinite(p.se) && Number.isFinite(p.value) ? [Math.max(0, p.value - p.se), p.value + p.se] : null);
    const axis = valueAxis([
      ...drawn.map((s) => s.points.map((p) => p.value)),
      ...banded.map((s) => s.points.flatMap((p) => seBand(p) || [])),
      ...banded.map((s) => s.points.flatMap((p) => (band(p) ? [band(p).low, band(p).high] : []))),
    ], {measure, difference: Boolean(difference), bottom: HEIGHT - bottom, top: MARGIN.top});
    const y = axis.scale;
    root = svg("svg", {class: "tm-chart", width, height: HEIGHT});
    root.dataset.axis = axis.kind;
    let xTicks;
    if (xAxis === "depth") xTicks = [0, 25, 50, 75, 100].map((v) => [v, `${v}%`]);
    else if (names) xTicks = categoryTicks(names, Math.floor((width - MARGIN.left) / 16));
    else xTicks = niceTicks(0, lastIndex, 8).filter(Number.isInteger).map((v) => [v, String(v)]);
    drawAxes(root, {
      x,
      y,
      xTicks,
      yTicks: axis.ticks,
      xLabel: xAxis === "depth" ? "depth (% of observed layers)" : "layer (network order)",
      yLabel: difference ? `${measure} \u2212 reference` : `mean ${measure}`,
      rotateX: rotate,
    });
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
      const line = drawRunLine(root, {
        entry: s.entry,
        color: s.color,
        points: s.points.map((p) => [x(xPosition(p, xAxis)), y(p.value)]),
        names: s.points.map((p) => p.name),
        tooltip,
        describe: (i) => describe(s, s.points[i], {measure, difference}),
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
