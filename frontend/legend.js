// The color legend: the colormap from min to max (linear or log), arrows for values beyond either end,
// how the range was chosen (the tooltip), and, for unit heatmaps, the colors of +inf, NaN and dead units.
import {SPECIAL_COLORS, colorFor, cssColor, scaleValue} from "./colors.js";
import {formatValue, html, svg} from "./plot.js";

const BAR_WIDTH = 160;
const BAR_HEIGHT = 10;
const ARROW = 9;

const KIND_NOTES = {fixed: "fixed range", data: "range over all loaded steps", locked: "locked"};

function gradientBar(scale) {
  const canvas = html("canvas", "tm-legend-bar");
  canvas.width = BAR_WIDTH;
  canvas.height = 1;
  const context = canvas.getContext("2d");
  const image = context.createImageData(BAR_WIDTH, 1);
  for (let x = 0; x < BAR_WIDTH; x++) {
    image.data.set([...colorFor(scaleValue((x + 0.5) / BAR_WIDTH, scale), scale), 255], 4 * x);
  }
  context.putImageData(image, 0, 0);
  canvas.style.width = `${BAR_WIDTH}px`;
  canvas.style.height = `${BAR_HEIGHT}px`;
  return canvas;
}

/** A triangle pointing away from the bar ("over": right, "under": left) in that end's color, and its text. */
function endArrow(end, text, active) {
  const item = html("span", `tm-legend-end tm-legend-${end}${active ? " tm-active" : ""}`);
  const points = end === "over" ? `0,0 ${ARROW},${BAR_HEIGHT / 2} 0,${BAR_HEIGHT}` : `${ARROW},0 0,${BAR_HEIGHT / 2} ${ARROW},${BAR_HEIGHT}`;
  const arrow = svg("svg", {width: ARROW, height: BAR_HEIGHT, class: "tm-legend-arrow"});
  arrow.append(svg("polygon", {points, fill: cssColor(SPECIAL_COLORS[end])}));
  const label = html("span", "", text);
  item.append(...(end === "over" ? [arrow, label] : [label, arrow]));
  item.title = active ? `some values are ${end === "over" ? "above" : "below"} the range` : `no value is ${end === "over" ? "above" : "below"} the range`;
  return item;
}

function swatch(color, text) {
  const item = html("span", "tm-legend-item");
  const box = html("span", "tm-legend-swatch");
  box.style.background = cssColor(color);
  item.append(box, html("span", "", text));
  return item;
}

/**
 * Fills `container` with the legend of `scale` (scales.measureScale): label, "< min" arrow (log or locked
 * scales, or values below), min, the colormap, max, "> max" arrow, how the range was chosen; `special`
 * adds +inf, NaN and dead units. The range's rule is the legend's tooltip.
 */
export function renderLegend(container, {scale, label, special = false}) {
  const signature = JSON.stringify([scale.min, scale.max, scale.log, scale.kind, scale.over, scale.under, scale.rule, label, special]);
  if (container.tmSignature === signature) return;
  container.tmSignature = signature;
  const items = [html("span", "tm-legend-label", label)];
  if (scale.log || scale.kind === "locked" || scale.under) items.push(endArrow("under", `< ${formatValue(scale.min)}`, scale.under));
  items.push(
    html("span", "tm-legend-min", formatValue(scale.min)),
    gradientBar(scale),
    html("span", "tm-legend-max", formatValue(scale.max)),
    endArrow("over", `> ${formatValue(scale.max)}`, scale.over),
  );
  const note = html("span", "tm-muted tm-legend-kind", `${KIND_NOTES[scale.kind] || ""}${scale.log ? ", log scale" : ""}`);
  const info = html("span", "tm-legend-info", "?");
  info.title = scale.rule || "";
  items.push(note, info);
  if (special) {
    items.push(swatch(SPECIAL_COLORS.inf, "+inf (sample variance 0)"), swatch(SPECIAL_COLORS.nan, "NaN"),
      swatch(SPECIAL_COLORS.dead, "dead unit (no variance at all)"));
  }
  container.replaceChildren(...items);
  container.title = scale.rule || "";
  Object.assign(container.dataset, {
    min: String(scale.min), max: String(scale.max), log: String(Boolean(scale.log)), kind: scale.kind || "",
    over: String(Boolean(scale.over)), under: String(Boolean(scale.under)),
  });
}
