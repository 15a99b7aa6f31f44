// The layer profile: each run's mean measure per layer at the chosen step, against layer index or depth %
// (the comparison plot of the invariance papers). One SVG path per run, data-run / data-namespace on it.
import {categoryTicks, drawAxes, drawRunLine, finiteExtent, formatValue, linearScale, niceTicks, svg} from "./plot.js";

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

/**
 * Draws the profile into `container`. series: [{key, entry, label, color, step, points: [{name, index,
 * depth, value}]}]; options: {xAxis: "layer" | "depth", measure, width, tooltip}.
 */
export function renderProfile(container, series, {xAxis, measure, width, tooltip}) {
  const drawn = series.filter((s) => s.points.length);
  const extent = finiteExtent(drawn.map((s) => s.points.map((p) => p.value)), [0]) || [0, 1];
  const names = xAxis === "layer" && drawn.length ? sharedNames(drawn) : null;
  const rotate = Boolean(names) && names.some((name) => name.length > 3);
  const bottom = rotate ? 70 : 44;
  const lastIndex = Math.max(1, ...drawn.flatMap((s) => s.points.map((p) => p.index)));
  const x = linearScale(xAxis === "depth" ? [0, 100] : [0, lastIndex], [MARGIN.left, width - MARGIN.right]);
  const yTicks = niceTicks(extent[0], extent[1], 5);
  const y = linearScale([Math.min(extent[0], yTicks[0]), Math.max(extent[1], yTicks.at(-1))], [HEIGHT - bottom, MARGIN.top]);
  const root = svg("svg", {class: "tm-chart", width, height: HEIGHT});
  let xTicks;
  if (xAxis === "depth") xTicks = [0, 25, 50, 75, 100].map((v) => [v, `${v}%`]);
  else if (names) xTicks = categoryTicks(names, Math.floor((width - MARGIN.left) / 16));
  else xTicks = niceTicks(0, lastIndex, 8).filter(Number.isInteger).map((v) => [v, String(v)]);
  drawAxes(root, {
    x,
    y,
    xTicks,
    yTicks: yTicks.map((v) => [v, formatValue(v)]),
    xLabel: xAxis === "depth" ? "depth (% of observed layers)" : "layer (network order)",
    yLabel: `mean ${measure}`,
    rotateX: rotate,
  });
  for (const s of drawn) {
    drawRunLine(root, {
      entry: s.entry,
      color: s.color,
      points: s.points.map((p) => [x(xPosition(p, xAxis)), y(p.value)]),
      tooltip,
      describe: (i) => [[s.label, "tm-tooltip-title"], `layer ${s.points[i].name}`,
        `mean ${measure} = ${formatValue(s.points[i].value)}`, `step ${s.step}`],
    });
  }
  container.replaceChildren(root);
}
