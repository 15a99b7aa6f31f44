// The color legend: the colormap from min to max and, for unit heatmaps, the special colors.
import {SPECIAL_COLORS, colorFor, cssColor} from "./colors.js";
import {formatValue, html} from "./plot.js";

const BAR_WIDTH = 160;
const BAR_HEIGHT = 10;

function gradientBar(scale) {
  const canvas = html("canvas", "tm-legend-bar");
  canvas.width = BAR_WIDTH;
  canvas.height = 1;
  const context = canvas.getContext("2d");
  const image = context.createImageData(BAR_WIDTH, 1);
  for (let x = 0; x < BAR_WIDTH; x++) {
    const value = scale.min + ((x + 0.5) / BAR_WIDTH) * (scale.max - scale.min);
    image.data.set([...colorFor(value, scale), 255], 4 * x);
  }
  context.putImageData(image, 0, 0);
  canvas.style.width = `${BAR_WIDTH}px`;
  canvas.style.height = `${BAR_HEIGHT}px`;
  return canvas;
}

function swatch(color, text) {
  const item = html("span", "tm-legend-item");
  const box = html("span", "tm-legend-swatch");
  box.style.background = cssColor(color);
  item.append(box, html("span", "", text));
  return item;
}

/** Fills `container` with the legend of `scale` ({min, max, clamped}); `special` adds +inf / NaN / dead. */
export function renderLegend(container, {scale, label, special = false}) {
  const top = scale.clamped ? `\u2265 ${formatValue(scale.max)}` : formatValue(scale.max);
  const items = [
    html("span", "tm-legend-label", label),
    html("span", "", formatValue(scale.min)),
    gradientBar(scale),
    html("span", "", top),
  ];
  if (special) {
    items.push(swatch(SPECIAL_COLORS.inf, "+inf (sample variance 0)"), swatch(SPECIAL_COLORS.nan, "NaN"),
      swatch(SPECIAL_COLORS.dead, "dead unit (no variance at all)"));
  }
  container.replaceChildren(...items);
  container.dataset.min = String(scale.min);
  container.dataset.max = String(scale.max);
}
