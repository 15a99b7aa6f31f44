// Color scales: the value colormap (viridis) with its special colors, run colors and layer-depth colors.

// Viridis at 10 evenly spaced stops (0 = invariant end, 1 = the scale's maximum).
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];

/** Colors of values the colormap cannot show, also used by the legend. */
export const SPECIAL_COLORS = {
  dead: [0, 0, 0],
  nan: [150, 150, 150],
  inf: [228, 26, 28],
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

/** The [r, g, b] of a value on the scale {min, max}; dead units, NaN and +inf get their own colors. */
export function colorFor(value, {min, max, dead = false}) {
  if (dead) return SPECIAL_COLORS.dead;
  if (Number.isNaN(value)) return SPECIAL_COLORS.nan;
  if (value === Infinity) return SPECIAL_COLORS.inf;
  return viridis(max > min ? (value - min) / (max - min) : 0);
}

const TABLE_SIZE = 1024;

function pack([r, g, b]) {
  return ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
}

/**
 * A fast (value, dead) -> opaque RGBA pixel as a little-endian Uint32 (for ImageData), equal to colorFor
 * on `scale` within one unit per channel (the colormap is tabulated at 1024 levels).
 */
export function pixelColors({min, max}) {
  const table = Uint32Array.from({length: TABLE_SIZE + 1}, (_, i) => pack(viridis(i / TABLE_SIZE)));
  const perUnit = max > min ? TABLE_SIZE / (max - min) : 0;
  const [dead, nan, inf] = [SPECIAL_COLORS.dead, SPECIAL_COLORS.nan, SPECIAL_COLORS.inf].map(pack);
  return (value, isDead = false) => {
    if (isDead) return dead;
    if (Number.isNaN(value)) return nan;
    if (value === Infinity) return inf;
    const index = Math.round((value - min) * perUnit);
    return table[index > 0 ? (index < TABLE_SIZE ? index : TABLE_SIZE) : 0];
  };
}

/** "rgb(r, g, b)" for CSS and canvas strokes. */
export function cssColor([r, g, b]) {
  return `rgb(${r}, ${g}, ${b})`;
}

/** Rounds up to two significant digits, so scale ends read cleanly (1.034 -> 1.1). */
function niceCeil(value) {
  if (value <= 0) return value;
  const unit = 10 ** (Math.floor(Math.log10(value)) - 1);
  return Math.ceil(value / unit - 1e-9) * unit;
}

const SUMMARY_SAMPLE = 1024;

/** The finite values of several arrays in brief: {lowest, highest, sample} (an even, sorted subsample). */
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

/**
 * The color scale {min, max, clamped} shared by the values of several summaries: min is 0 (or the
 * smallest value if negative), max the 99th percentile rounded up, so a few outliers do not wash out the
 * rest; clamped tells whether some values lie above max.
 */
export function sharedScale(summaries) {
  const sample = summaries.flatMap((summary) => summary.sample).sort((a, b) => a - b);
  if (sample.length === 0) return {min: 0, max: 1, clamped: false};
  const lowest = Math.min(...summaries.map((summary) => summary.lowest));
  const highest = Math.max(...summaries.map((summary) => summary.highest));
  const min = Math.min(0, lowest);
  let max = niceCeil(sample[Math.floor(0.99 * (sample.length - 1))]);
  if (!(max > min)) max = highest > min ? niceCeil(highest) : min + 1;
  return {min, max, clamped: highest > max};
}

const RUN_PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

/** The color of the n-th run (Tableau 10, then hues spaced by the golden angle). */
export function runColor(n) {
  if (n < RUN_PALETTE.length) return RUN_PALETTE[n];
  return `hsl(${Math.round((n * 137.508) % 360)}, 65%, 45%)`;
}

/** The color of a layer at relative depth t in [0, 1]: light blue (first layer) to dark red (last). */
export function depthColor(t) {
  const s = Math.min(Math.max(t, 0), 1);
  return `hsl(${Math.round(200 - 200 * s)}, 75%, ${Math.round(55 - 15 * s)}%)`;
}
