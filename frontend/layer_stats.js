// What a unit snapshot says about each layer beyond its mean: the spread of its live units (the layer
// profile's band) and how many of its units are dead or not finite (the tooltips). Computed once per
// layer of a payload (payloads never change).

/** The quantiles of the band drawn around each layer's mean in the profile. */
export const SPREAD = [0.1, 0.9];

/** The q-quantile of ascending `sorted` values, linear between the two nearest ranks (numpy's default). */
export function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const position = q * (sorted.length - 1);
  const below = Math.floor(position);
  const above = Math.min(below + 1, sorted.length - 1);
  return sorted[below] + (position - below) * (sorted[above] - sorted[below]);
}

const computed = new WeakMap(); // layer -> stats

/**
 * {low, high, live, dead, nonFinite, units} of a layer of a unit snapshot (api.fetchUnits): the SPREAD
 * quantiles of its live finite units (NaN without any), how many those are, how many units are dead (no
 * variance at all), how many live units are +inf / NaN, and how many units it has.
 */
export function layerStats(layer) {
  let stats = computed.get(layer);
  if (!stats) {
    const live = [];
    let nonFinite = 0;
    for (let u = 0; u < layer.values.length; u++) {
      if (layer.dead.has(u)) continue;
      if (Number.isFinite(layer.values[u])) live.push(layer.values[u]);
      else nonFinite += 1;
    }
    const sorted = Float64Array.from(live).sort();
    stats = {
      low: quantile(sorted, SPREAD[0]),
      high: quantile(sorted, SPREAD[1]),
      live: sorted.length,
      dead: layer.dead.size,
      nonFinite,
      units: layer.values.length,
    };
    computed.set(layer, stats);
  }
  return stats;
}

/** "3 of 64 units dead, left out of the mean" (or "counted in the mean" for a run logged with
 *  means_include_dead). */
export function deadUnitsText(layer, meansIncludeDead = false) {
  const {dead, units} = layerStats(layer);
  if (dead === 0) return `0 of ${units} units dead`;
  return `${dead} of ${units} units dead, ${meansIncludeDead ? "counted in" : "left out of"} the mean`;
}

/** "2 units +inf or NaN, left out of the mean" when a layer's live units are not all finite, else "". */
export function nonFiniteText(layer) {
  const {nonFinite} = layerStats(layer);
  if (nonFinite === 0) return "";
  return `${nonFinite} unit${nonFinite === 1 ? "" : "s"} +inf or NaN, left out of the mean`;
}

/** "10–90 % of the 61 live units: 0.12 – 0.48" with `format` for the numbers; "" without live units. */
export function spreadText(layer, format) {
  const {low, high, live} = layerStats(layer);
  if (live === 0) return "";
  return `${SPREAD[0] * 100}\u2013${SPREAD[1] * 100} % of the ${live} live unit${live === 1 ? "" : "s"}: ${format(low)} \u2013 ${format(high)}`;
}
