// The y axis of the charts of a measure's values (layer profile, layer means during training, a unit during
// training). Every measure the SDK logs is >= 0 by definition (tm_tensorboard/measures.py: stds and their
// ratios, mean squares over variances, firing rates and their ratio, F statistics, fractions), so a value
// axis starts at 0; a difference between two runs is signed and its axis is symmetric about 0; a log axis
// spans the positive values, from a power of ten to a power of ten.
import {formatValue, linearScale, logScale, logTicks, niceDomain} from "./plot.js";

// Measures whose values can be negative: none of the SDK's. A signed measure added to the SDK belongs here
// (tests/test_browser_views.py checks the SDK's measures against this list).
const SIGNED_MEASURES = new Set();

/** Whether values of `measure` can be negative (its value axis then does not start at 0). */
export function canBeNegative(measure) {
  return SIGNED_MEASURES.has(measure);
}

/** The finite [min, max] and the smallest positive value of arrays of values (null / Infinity if none). */
function extents(arrays) {
  let lo = Infinity;
  let hi = -Infinity;
  let lowPositive = Infinity;
  for (const values of arrays) {
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
      if (v > 0 && v < lowPositive) lowPositive = v;
    }
  }
  return {range: lo <= hi ? [lo, hi] : null, lowPositive, highest: hi};
}

/**
 * The y axis of `arrays` of values drawn from pixel `bottom` up to pixel `top`: {scale, ticks: [[value,
 * label]], log, kind}. kind: "log" (log: true and some value > 0; values <= 0 are not drawn), "difference"
 * (difference: true; symmetric about 0), "zero" (from 0: the measure cannot be negative) or "free".
 */
export function valueAxis(arrays, {measure, difference = false, log = false, bottom, top, count = 5}) {
  const {range, lowPositive, highest} = extents(arrays);
  if (log && !difference && lowPositive < Infinity) {
    const lo = 10 ** Math.floor(Math.log10(lowPositive) + 1e-9);
    const hi = Math.max(10 ** Math.ceil(Math.log10(highest) - 1e-9), lo * 10);
    const scale = logScale([lo, hi], [bottom, top]);
    return {scale, ticks: logTicks(lo, hi).map((v) => [v, formatValue(v)]), log: true, kind: "log"};
  }
  let kind;
  let domain;
  let ticks;
  if (difference) {
    kind = "difference";
    const reach = range ? Math.max(Math.abs(range[0]), Math.abs(range[1])) : 0;
    const half = reach > 0 ? reach * 1.05 : 1;
    ({domain, ticks} = niceDomain(-half, half, count));
    const edge = Math.max(Math.abs(domain[0]), Math.abs(domain[1]));
    domain = [-edge, edge];
    ticks = ticks.filter((v) => v >= -edge && v <= edge);
  } else if (!canBeNegative(measure) && !(range && range[0] < 0)) {
    kind = "zero";
    const hi = range && range[1] > 0 ? range[1] * 1.05 : 1;
    ({domain, ticks} = niceDomain(0, hi, count));
    domain = [0, domain[1]];
  } else {
    kind = "free";
    const [lo, hi] = range || [0, 1];
    const pad = Math.max((hi - lo) * 0.05, Math.abs(hi) * 0.01, 1e-6);
    ({domain, ticks} = niceDomain(lo - pad, hi + pad, count));
  }
  return {scale: linearScale(domain, [bottom, top]), ticks: ticks.map((v) => [v, formatValue(v)]), log: false, kind};
}
