// Accuracy vs transformation at the chosen step: one line per run over the transformations' labels.
import {categoryTicks, drawAxes, drawRunLine, formatValue, html, linearScale, niceTicks, svg} from "./plot.js";

const HEIGHT = 280;
const MARGIN = {left: 56, right: 20, top: 12, bottom: 80};

/**
 * Draws the chart into `container`. series: [{key, entry, label, color, step, labels, values}] (values:
 * accuracy per label); options: {width, tooltip}. Without series, says that no accuracy is logged.
 */
export function renderAccuracy(container, series, {width, tooltip}) {
  if (series.length === 0) {
    container.replaceChildren(
      html("p", "tm-muted", "No accuracy logged for the selected runs (it needs labels with the probe and the \"accuracy\" measure)."),
    );
    return;
  }
  const labels = [...new Set(series.flatMap((s) => s.labels))];
  const position = new Map(labels.map((label, i) => [label, i]));
  const x = linearScale([0, Math.max(labels.length - 1, 1)], [MARGIN.left, width - MARGIN.right]);
  const y = linearScale([0, 1], [HEIGHT - MARGIN.bottom, MARGIN.top]);
  const root = svg("svg", {class: "tm-chart", width, height: HEIGHT});
  drawAxes(root, {
    x,
    y,
    xTicks: categoryTicks(labels, Math.floor((width - MARGIN.left) / 18)),
    yTicks: niceTicks(0, 1, 5).map((v) => [v, `${Math.round(v * 100)}%`]),
    xLabel: "transformation",
    yLabel: "top-1 accuracy",
    rotateX: true,
  });
  for (const s of series) {
    drawRunLine(root, {
      entry: s.entry,
      color: s.color,
      points: s.labels.map((label, i) => [x(position.get(label)), y(s.values[i])]),
      tooltip,
      describe: (i) => [[s.label, "tm-tooltip-title"], s.labels[i], `accuracy = ${formatValue(s.values[i])}`, `step ${s.step}`],
    });
  }
  container.replaceChildren(root);
}
