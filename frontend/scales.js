// The color scale of a measure: one scale per measure, shared by every view that colors its values (unit
// heatmaps, layer x step heatmap, legends, exports) and by every run. Measures with a natural range keep
// it whatever the data; the others get a range computed from data the tab has already fetched (never a
// request of its own); a locked scale keeps the range it had when it was locked.
import {niceCeil} from "./colors.js";
import {formatValue} from "./plot.js";

// Ratio-like measures: 0 = invariant / equivariant, ~1 = varies as much as across samples; values a
// little above 1 are common, so the range ends a little above 1.
const RATIO_RANGE = [0, 1.2];
const FIXED_RANGES = {
  nvi: RATIO_RANGE,
  nvse: RATIO_RANGE,
  ee: RATIO_RANGE,
  ee_t: RATIO_RANGE,
  ie_t: RATIO_RANGE,
  gfl: [0, 1], // firing rates: fractions of inputs
  gfg: [0, 1],
  gf: [0, 2], // local / global firing rate: 1 = fires as often on transformed inputs
  anova: [0, 1], // fraction of units
  accuracy: [0, 1],
};

const HIGH_PERCENTILE = 0.99;
const LOW_PERCENTILE = 0.01;

/** The natural [min, max] of a measure, or null when it has none (tvi, svi, tvse, svse, anova_f, ...). */
export function fixedRange(measure) {
  if (Object.hasOwn(FIXED_RANGES, measure)) return FIXED_RANGES[measure];
  return measure.startsWith("lie_") ? RATIO_RANGE : null;
}

/** Whether the measure may be shown on a log scale: those without a natural range (unbounded, >= 0). */
export function logAllowed(measure) {
  return fixedRange(measure) === null;
}

/** The q-quantile of sorted values, interpolated linearly between the two nearest ranks. */
function quantile(sorted, q) {
  const position = q * (sorted.length - 1);
  const below = Math.floor(position);
  const above = Math.min(below + 1, sorted.length - 1);
  return sorted[below] + (position - below) * (sorted[above] - sorted[below]);
}

function powerOfTenBelow(value) {
  return 10 ** Math.floor(Math.log10(value) + 1e-9);
}

const unitInputs = new WeakMap(); // summary -> {high, low, lowPositive} of a unit snapshot

/** A unit snapshot's part in the data range (its percentiles), computed once per summary. */
function unitRangeInputs(summary) {
  if (!unitInputs.has(summary)) {
    const positive = summary.sample.filter((v) => v > 0);
    unitInputs.set(summary, {
      high: quantile(summary.sample, HIGH_PERCENTILE),
      low: quantile(summary.sample, LOW_PERCENTILE),
      lowPositive: positive.length ? quantile(positive, LOW_PERCENTILE) : Infinity,
    });
  }
  return unitInputs.get(summary);
}

/**
 * The data range of a measure without a natural range, from value summaries (colors.valueSummary): `means`
 * of the layer means over steps (every value counts) and `units` of unit snapshots (their 1st to 99th
 * percentiles count, so a few outliers do not wash out the rest). Linear: min(0, lowest) to the highest,
 * rounded up to two significant digits; log: the lowest positive value (the units' 1st percentile of
 * positive values, the smallest positive mean in the summary's sample) rounded down to a power of ten,
 * to the same maximum. {min, max}; {0, 1} (log {0.001, 1}) without any finite value.
 */
export function dataRange({means = [], units = []}, log = false) {
  let high = -Infinity;
  let low = Infinity;
  let lowPositive = Infinity;
  for (const summary of means) {
    if (!summary.sample.length) continue;
    high = Math.max(high, summary.highest);
    low = Math.min(low, summary.lowest);
    const positive = summary.sample.find((v) => v > 0);
    if (positive !== undefined) lowPositive = Math.min(lowPositive, positive);
  }
  for (const summary of units) {
    if (!summary.sample.length) continue;
    const inputs = unitRangeInputs(summary);
    high = Math.max(high, inputs.high);
    low = Math.min(low, inputs.low);
    lowPositive = Math.min(lowPositive, inputs.lowPositive);
  }
  if (log) {
    if (!(lowPositive < Infinity)) return {min: 1e-3, max: 1};
    const min = powerOfTenBelow(lowPositive);
    const max = high > min ? niceCeil(high) : min * 10;
    return {min, max: max > min ? max : min * 10};
  }
  if (!(high >= low)) return {min: 0, max: 1};
  const min = Math.min(0, low);
  const max = high > min ? niceCeil(high) : min + 1;
  return {min, max: max > min ? max : min + 1};
}

/** Whether some of the summarized values lie above / below the range (log: at or below 0 too). */
function beyond(summaries, {min, max, log}) {
  const lowest = Math.min(...summaries.map((s) => s.lowest));
  const highest = Math.max(...summaries.map((s) => s.highest));
  return {over: highest > max, under: lowest < min || (log && lowest <= 0)};
}

/** The text of the legend's tooltip: how the range of `scale` was chosen. */
export function scaleRule(scale) {
  const range = `${formatValue(scale.min)} to ${formatValue(scale.max)}${scale.log ? " (log)" : ""}`;
  const ends = `Values above ${formatValue(scale.max)} are orange, below ${formatValue(scale.min)} light blue; dead units `
    + "(no variance at all) magenta, NaN grey, +inf red.";
  if (scale.kind === "locked") {
    return `${scale.measure}: locked at ${range}, the range it had when it was locked, for every step, run and view `
      + `until it is unlocked. ${ends}`;
  }
  if (scale.kind === "fixed") {
    return `${scale.measure}: fixed range ${range}, its natural range, the same for every step, run and view. ${ends}`;
  }
  const lower = scale.log
    ? "from the lowest of each loaded unit snapshot's 1st percentile of positive values and the smallest positive "
      + "layer mean, rounded down to a power of ten,"
    : "from 0 (lower only if a layer mean or a unit snapshot's 1st percentile is negative)";
  return `${scale.measure} has no natural range: ${range}, ${lower} to the largest of (a) every selected run's `
    + "layer means at every logged step (the data of the layer means during training, fetched once when the "
    + "tab opens) and (b) the 99th percentile of the live units of every unit snapshot of the selected runs "
    + "loaded so far (the latest step when the tab opened, then each step shown), rounded up to two significant "
    + "digits. Unit heatmaps and the layer x step heatmap share it. It only grows as more steps are shown; "
    + `lock it to freeze it. ${ends}`;
}

/**
 * The scale of `measure`: {measure, min, max, log, kind: "fixed" | "data" | "locked", over, under, rule}.
 * lock: {measure, min, max} or null (a lock of another measure, or with min <= 0 on a log scale, is
 * ignored); log: the log scale asked for (ignored for measures with a natural range); summaries: {means, units} value summaries of what is
 * loaded for the selected runs (the data range's input, and whether values fall outside the range).
 */
export function measureScale({measure, log = false, lock = null, summaries = {means: [], units: []}}) {
  let scale;
  const useLog = Boolean(log) && logAllowed(measure);
  if (lock && lock.measure === measure && lock.max > lock.min && !(useLog && lock.min <= 0)) {
    scale = {measure, min: lock.min, max: lock.max, log: useLog, kind: "locked"};
  } else if (fixedRange(measure)) {
    const [min, max] = fixedRange(measure);
    scale = {measure, min, max, log: false, kind: "fixed"};
  } else {
    scale = {measure, ...dataRange(summaries, useLog), log: useLog, kind: "data"};
  }
  const all = [...summaries.means, ...summaries.units].filter((s) => s.sample.length);
  scale = {...scale, ...(all.length ? beyond(all, scale) : {over: false, under: false})};
  return {...scale, rule: scaleRule(scale)};
}

/**
 * Remembers the value summary of every unit snapshot shown, per (run, measure) and step, for the data
 * range: steps already shown keep counting when the slider moves on, so the range does not jump back.
 */
export function createRangeTracker() {
  const seen = new Map(); // JSON [run key, measure] -> Map(step -> summary)
  return {
    /** Records the summary of the units a run has at `step` for `measure`. */
    note(key, measure, step, summary) {
      const id = JSON.stringify([key, measure]);
      if (!seen.has(id)) seen.set(id, new Map());
      seen.get(id).set(step, summary);
    },
    /** The summaries recorded for the runs `keys` and `measure`. */
    summaries(keys, measure) {
      return keys.flatMap((key) => [...(seen.get(JSON.stringify([key, measure]))?.values() || [])]);
    },
  };
}

/** " (above the color scale's max)" / " (below ...)" for a finite value outside the scale, else "". */
export function outsideScaleNote(value, scale) {
  if (value > scale.max && value !== Infinity) return ` (above the color scale's ${formatValue(scale.max)})`;
  if (value < scale.min || (scale.log && value <= 0)) return ` (below the color scale's ${formatValue(scale.min)})`;
  return "";
}
