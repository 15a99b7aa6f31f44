// "Invariance during training": per run, a layer x step heatmap of the layer means (rows: layers in network
// order, columns: logged steps), on a color scale shared by the runs, with a marker at the chosen step.
import {pixelColors} from "./colors.js";
import {chartCache, html, shorten, svg, svgText, svgTitle, formatValue} from "./plot.js";
import {stepAtOrBefore} from "./state.js";

const LABELS = 76;
const AXIS = 22;
const TARGET_HEIGHT = 240;

function rowHeight(layers) {
  return Math.min(Math.max(Math.floor(TARGET_HEIGHT / Math.max(layers, 1)), 4), 16);
}

function paint(canvas, means, scale, width, height) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.round(width * ratio);
  const h = Math.round(height * ratio);
  canvas.width = w;
  canvas.height = h;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  const pixels = new Uint32Array(image.data.buffer);
  const pixelColor = pixelColors(scale);
  const layers = means.layers.length;
  const steps = means.steps.length;
  for (let px = 0; px < w; px++) {
    const column = means.values[Math.min(Math.floor(((px + 0.5) / w) * steps), steps - 1)];
    for (let l = 0; l < layers; l++) {
      const color = pixelColor(column[l]);
      for (let py = Math.round((l * h) / layers); py < Math.round(((l + 1) * h) / layers); py++) pixels[py * w + px] = color;
    }
  }
  context.putImageData(image, 0, 0);
}

function stepTicks(steps, width) {
  const count = Math.min(steps.length, Math.max(2, Math.floor(width / 70)));
  const indices = [...new Set(Array.from({length: count}, (_, i) => Math.round((i * (steps.length - 1)) / Math.max(count - 1, 1))))];
  return indices.map((i) => [((i + 0.5) / steps.length) * width, String(steps[i])]);
}

function createChart(run, {width, scale, measure, tooltip}) {
  const {means} = run;
  const plotWidth = width - LABELS;
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
  canvas.style.left = `${LABELS}px`;
  canvas.dataset.run = run.entry.run;
  canvas.dataset.namespace = run.entry.namespace;
  paint(canvas, means, scale, plotWidth, height);
  const overlay = svg("svg", {class: "tm-chart tm-chart-layer tm-no-pointer", width, height: height + AXIS});
  const every = Math.max(1, Math.ceil(11 / rowHeight(means.layers.length)));
  means.layers.forEach((name, l) => {
    if (l % every !== 0) return;
    const label = svgText(shorten(name, 11), {x: LABELS - 6, y: (l + 0.5) * rowHeight(means.layers.length), class: "tm-tick",
      "text-anchor": "end", "dominant-baseline": "middle"});
    label.append(svgTitle(name));
    overlay.append(label);
  });
  for (const [x, text] of stepTicks(means.steps, plotWidth)) {
    overlay.append(svgText(text, {x: LABELS + x, y: height + 15, class: "tm-tick", "text-anchor": "middle"}));
  }
  const marker = svg("line", {class: "tm-marker", y1: 0, y2: height});
  overlay.append(marker);
  canvas.addEventListener("mousemove", (event) => {
    const s = Math.min(Math.floor((event.offsetX / plotWidth) * means.steps.length), means.steps.length - 1);
    const l = Math.min(Math.floor((event.offsetY / height) * means.layers.length), means.layers.length - 1);
    tooltip.show(event, [[run.label, "tm-tooltip-title"], `layer ${means.layers[l]}`, `step ${means.steps[s]}`,
      `mean ${measure} = ${formatValue(means.values[s][l])}`]);
  });
  canvas.addEventListener("mouseleave", () => tooltip.hide());
  box.append(canvas, overlay);
  figure.append(caption, box);
  return {figure, marker, means, plotWidth};
}

/** The view in `container`: render(runs, options) draws the heatmaps, showStep(step) moves the markers. */
export function createTrainingHeatmaps(container, tooltip) {
  let charts = [];
  const cache = chartCache();
  return {
    /** runs: [{key, entry, label, color, means}]; options: {width, scale, measure}. */
    render(runs, options) {
      const withData = runs.filter((run) => run.means && run.means.steps.length);
      cache.keepOnly(new Set(withData.map((run) => run.key)));
      const {width, measure, scale} = options;
      charts = withData.map((run) => cache.chart(run.key, [run.means, run.color, run.label, width, measure, scale.min, scale.max],
        () => createChart(run, {...options, tooltip})));
      container.replaceChildren(...charts.map((chart) => chart.figure));
    },

    /** Moves each marker to the middle of the column of the step shown (the last at or before `step`). */
    showStep(step) {
      for (const {marker, means, plotWidth} of charts) {
        const shown = step === null ? means.steps.at(-1) : stepAtOrBefore(means.steps, step);
        const x = LABELS + ((means.steps.indexOf(shown) + 0.5) / means.steps.length) * plotWidth;
        marker.setAttribute("x1", x);
        marker.setAttribute("x2", x);
      }
    },
  };
}
