// Color scales: the value colormap (viridis) with its special colors, run colors and layer-depth colors.
// A value scale is {min, max, log}: linear from min to max, or log10 from min (> 0) to max when log is
// set. Values outside [min, max] get their own colors (never the colormap's ends), as do dead units,
// NaN and +inf, so that no special value can be read as 0 = invariant.

// Viridis at 10 evenly spaced stops (0 = invariant end, 1 = the scale's maximum).
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];

/** Colors of values the colormap cannot show, also used by the legend and the exports. Chosen off the
 *  viridis ramp and readable on light and dark backgrounds: dead units are magenta (viridis' 0 is near
 *  black), values above the scale orange (hotter than its yellow end), below it light blue. */
export const SPECIAL_COLORS = {
  dead: [230, 0, 230],
  nan: [150, 150, 150],
  inf: [228, 26, 28],
  over: [255, 136, 0],
  under: [150, 205, 255],
};

/** Viridis at t in [0, 1] (clamped), as [r, g, b] integers. */
function viridis(t) {
  const position = (t > 0 ? (t < 1 ? t : 1) : 0) * (VIRIDIS.length - 1);
  const low = Math.min(Math.floor(position), VIRIDIS.length - 2);
  const f = position - low;
  const [r0, g0, b0] = VIRIDIS[low];
  const [r1, g1, b1] = VIRIDIS[low + 1];
  return [Math.round(r0 + f * (r1 - r0)), Math.round(g0 + f * (g1 - g0)), Math.round(b0 + f * (b1 - b0))];
}

/** The position of a finite value on the scale: 0 at min, 1 at max; < 0 below, > 1 above (log: <= 0 is
 *  below). */
export function scalePosition(value, {min, max, log = false}) {
  if (log) {
    if (!(value > 0)) return -Infinity;
    const low = Math.log10(min);
    const high = Math.log10(max);
    return high > low ? (Math.log10(value) - low) / (high - low) : 0;
  }
  return max > min ? (value - min) / (max - min) : 0;
}

/** The value at position t in [0, 1] of the scale (the inverse of scalePosition). */
export function scaleValue(t, {min, max, log = false}) {
  return log ? 10 ** (Math.log10(min) + t * (Math.log10(max) - Math.log10(min))) : min + t * (max - min);
}

/** The [r, g, b] of a value on the scale {min, max, log}; dead units, NaN, +inf and values outside
 *  [min, max] get their own colors. A scale's `colormap` (t in [0, 1] -> [r, g, b]) replaces viridis
 *  (difference.js: a diverging one). */
export function colorFor(value, {min, max, log = false, dead = false, colormap = viridis}) {
  if (dead) return SPECIAL_COLORS.dead;
  if (Number.isNaN(value)) return SPECIAL_COLORS.nan;
  if (value === Infinity) return SPECIAL_COLORS.inf;
  if (value > max) return SPECIAL_COLORS.over;
  if (value < min || (log && !(value > 0))) return SPECIAL_COLORS.under;
  return colormap(scalePosition(value, {min, max, log}));
}

const TABLE_SIZE = 1024;

function pack([r, g, b]) {
  return ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
}

/**
 * A fast (value, dead) -> opaque RGBA pixel as a little-endian Uint32 (for ImageData), equal to colorFor
 * on `scale` within one unit per channel (the colormap is tabulated at 1024 levels).
 */
export function pixelColors({min, max, log = false, colormap = viridis}) {
  const table = Uint32Array.from({length: TABLE_SIZE + 1}, (_, i) => pack(colormap(i / TABLE_SIZE)));
  const [dead, nan, inf, over, under] = ["dead", "nan", "inf", "over", "under"].map((name) => pack(SPECIAL_COLORS[name]));
  const low = log ? Math.log10(min) : min;
  const high = log ? Math.log10(max) : max;
  const perUnit = high > low ? TABLE_SIZE / (high - low) : 0;
  return (value, isDead = false) => {
    if (isDead) return dead;
    if (Number.isNaN(value)) return nan;
    if (value === Infinity) return inf;
    if (value > max) return over;
    if (value < min || (log && !(value > 0))) return under;
    const index = Math.round(((log ? Math.log10(value) : value) - low) * perUnit);
    return table[index > 0 ? (index < TABLE_SIZE ? index : TABLE_SIZE) : 0];
  };
}

/** "rgb(r, g, b)" for CSS and canvas strokes. */
export function cssColor([r, g, b]) {
  return `rgb(${r}, ${g}, ${b})`;
}

/** Rounds up to two significant digits, so scale ends read cleanly (1.034 -> 1.1). */
export function niceCeil(value) {
  if (!(value > 0) || !Number.isFinite(value)) return value;
  const unit = 10 ** (Math.floor(Math.log10(value)) - 1);
  return Number((Math.ceil(value / unit - 1e-9) * unit).toPrecision(12));
}

const SUMMARY_SAMPLE = 1024;

/** The finite values of several arrays in brief: {lowest, highest, sample} (an even, sorted subsample;
 *  empty, with lowest Infinity and highest -Infinity, when no value is finite). */
export function valueSummary(arrays) {
  let count = 0;
  let lowest = Infinity;
  let highest = -Infinity;
  for (const values of arrays) {
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (Number.isFinite(v)) {
        count += 1;
        if (v < lowest) lowest = v;
        if (v > highest) highest = v;
      }
    }
  }
  const stride = Math.max(1, Math.floor(count / SUMMARY_SAMPLE));
  const sample = [];
  let index = 0;
  for (const values of arrays) {
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (Number.isFinite(v) && index++ % stride === 0) sample.push(v);
    }
  }
  return {lowest, highest, sample: sample.sort((a, b) => a - b)};
}

/** TensorBoard's run colors (2.21: its settings' default colorPalette), light and dark theme, in order. */
export const RUN_PALETTE = [
  {name: "Slate", light: "#425066", dark: "#8e98a3"},
  {name: "Cyan", light: "#12b5cb", dark: "#12b5cb"},
  {name: "Pink", light: "#e52592", dark: "#e52592"},
  {name: "Yellow", light: "#f9ab00", dark: "#f9ab00"},
  {name: "Purple", light: "#9334e6", dark: "#9334e6"},
  {name: "Light Green", light: "#7cb342", dark: "#7cb342"},
  {name: "Orange", light: "#e8710a", dark: "#e8710a"},
];

/** The color of the n-th run as TensorBoard colors it: its palette in order, again from the start after
 *  the last color (TensorBoard counts its runs in the order of its run list: run_colors.js). */
export function runColor(n, dark = false) {
  const color = RUN_PALETTE[((n % RUN_PALETTE.length) + RUN_PALETTE.length) % RUN_PALETTE.length];
  return dark ? color.dark : color.light;
}

/** The color of a layer at relative depth t in [0, 1]: light blue (first layer) to dark red (last). */
export function depthColor(t) {
  const s = Math.min(Math.max(t, 0), 1);
  return `hsl(${Math.round(200 - 200 * s)}, 75%, ${Math.round(55 - 15 * s)}%)`;
}
