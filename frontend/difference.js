// The difference view: every run minus a reference run, in the layer profile, the curves over training and
// the unit heatmaps. Runs of the same architecture as the reference (the same layers, by name and in
// order, with the same unit counts) are compared layer by layer and unit by unit; other runs by depth %
// (the reference's value interpolated linearly at each layer's relative depth), which has no meaning for
// single units. Everything is computed from data already loaded, once per pair of payloads.
import {SPECIAL_COLORS, cssColor, niceCeil} from "./colors.js";
import {formatValue, html} from "./plot.js";
import {runKey, runLabel} from "./state.js";

// ColorBrewer's RdBu, from blue (below the reference) through white (equal) to red (above).
const RED_BLUE = [
  [5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240], [247, 247, 247],
  [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43], [103, 0, 31],
];

/** The diverging colormap at t in [0, 1] (clamped): 0 = -max (blue), 0.5 = 0 (white), 1 = +max (red). */
export function divergingColor(t) {
  const position = (t > 0 ? (t < 1 ? t : 1) : 0) * (RED_BLUE.length - 1);
  const low = Math.min(Math.floor(position), RED_BLUE.length - 2);
  const f = position - low;
  return RED_BLUE[low].map((c, i) => Math.round(c + f * (RED_BLUE[low + 1][i] - c)));
}

// -- the reference control --------------------------------------------------------------------------------

/**
 * A "Difference to" field in the toolbar `container`: none, or one of the selected runs.
 * onChange(key or null). Returns {update(state, entries)}.
 */
export function createReferenceControl(container, onChange) {
  const group = html("div", "tm-field");
  const select = html("select");
  select.id = "tm-reference";
  select.title = "Shows every other run minus this run in the unit heatmaps, the layer profile and the layer "
    + "means during training: unit by unit and layer by layer for runs of the same architecture, by depth % "
    + "for others.";
  group.append(html("span", "tm-field-label", "Difference to"), select);
  container.append(group);
  let signature = "";
  select.addEventListener("change", () => onChange(select.value || null));
  return {
    update(state, entries) {
      if (!group.isConnected) container.append(group); // the toolbar was rebuilt
      const options = [["", "none (values)"], ...entries.map((entry) => [runKey(entry), runLabel(entry)])];
      const next = JSON.stringify(options);
      if (next !== signature) {
        signature = next;
        select.replaceChildren(...options.map(([value, text]) => {
          const option = html("option", "", text);
          option.value = value;
          return option;
        }));
      }
      select.value = activeReference(state) || "";
    },
  };
}

/** The reference run's key when the difference view is on (the reference is one of the selected runs). */
export function activeReference(state) {
  return state.reference !== null && state.selected.has(state.reference) ? state.reference : null;
}

// -- architecture ---------------------------------------------------------------------------------------

/** Whether two run entries have the same architecture for `measure`: its layers by name and in order, each
 *  with the same number of units. */
export function sameArchitecture(entry, reference, measure) {
  const names = (entry.measureLayers || {})[measure];
  const referenceNames = (reference.measureLayers || {})[measure];
  if (!names || !referenceNames || names.length !== referenceNames.length) return false;
  const units = new Map(entry.layers.map((layer) => [layer.name, layer.numUnits]));
  const referenceUnits = new Map(reference.layers.map((layer) => [layer.name, layer.numUnits]));
  return names.every((name, i) => name === referenceNames[i] && units.get(name) === referenceUnits.get(name));
}

/** The value at `depth` of points [{depth, value}] sorted by depth, linear between the two nearest finite
 *  ones, the nearest one's beyond the ends; NaN without finite points. */
export function interpolateAtDepth(points, depth) {
  let before = null;
  let after = null;
  for (const point of points) {
    if (!Number.isFinite(point.value)) continue;
    if (point.depth <= depth) before = point;
    else if (after === null) after = point;
  }
  if (before && after) {
    const span = after.depth - before.depth;
    return span > 0 ? before.value + ((depth - before.depth) / span) * (after.value - before.value) : before.value;
  }
  return before ? before.value : after ? after.value : NaN;
}

function byPair(cache, a, b, make) {
  if (!cache.has(a)) cache.set(a, new WeakMap());
  const inner = cache.get(a);
  if (!inner.has(b)) inner.set(b, make());
  return inner.get(b);
}

// -- layer profile --------------------------------------------------------------------------------------

/**
 * A profile series (app.profileSeries: {points: [{name, index, depth, value}], ...}) minus the reference's:
 * by layer name when `same` (the architecture is the same), else by depth. Points get `value` (the
 * difference), `own` and `reference` (the two values); the band of the units' spread is dropped.
 */
export function differenceProfile(series, reference, same) {
  const byName = new Map(reference.points.map((p) => [p.name, p.value]));
  const seByName = new Map(reference.points.map((p) => [p.name, p.se]));
  const sorted = [...reference.points].sort((a, b) => a.depth - b.depth);
  const points = series.points.map((p) => {
    const other = same ? (byName.has(p.name) ? byName.get(p.name) : NaN) : interpolateAtDepth(sorted, p.depth);
    const value = Number.isFinite(p.value) && Number.isFinite(other) ? p.value - other : NaN;
    const point = {name: p.name, index: p.index, depth: p.depth, value, own: p.value, reference: other};
    // both runs with standard errors (same architecture): is the difference larger than 2 sqrt(se_a² + se_b²)?
    const otherSe = same && seByName.has(p.name) ? seByName.get(p.name) : NaN;
    if (Number.isFinite(p.se) && Number.isFinite(otherSe) && Number.isFinite(value)) {
      point.combinedSe = Math.sqrt(p.se * p.se + otherSe * otherSe);
      point.significant = Math.abs(value) > 2 * point.combinedSe;
    }
    return point;
  });
  return {...series, points, referenceStep: reference.step, byDepth: !same};
}

// -- layer means over training -----------------------------------------------------------------------------

const meansCache = new WeakMap();

/**
 * Layer means (api.fetchLayerMeans, possibly filtered: {layers, steps, values}) minus the reference's at the
 * same step (its last step at or before; none before its first step: NaN). Same architecture: layer by
 * layer (by name); else at each layer's depth (depthOf(name), referenceDepthOf(name): relative depths).
 * The same object for the same pair of payloads.
 */
export function differenceMeans(means, reference, {same, depthOf, referenceDepthOf}) {
  return byPair(meansCache, means, reference, () => {
    const width = means.layers.length;
    // per layer: the reference's column (same architecture), or its two neighbours by depth and the weight
    const columns = new Map(reference.layers.map((name, l) => [name, l]));
    const column = Int32Array.from(means.layers, (name) => (columns.has(name) ? columns.get(name) : -1));
    const order = reference.layers.map((name, l) => ({l, depth: referenceDepthOf(name)})).sort((a, b) => a.depth - b.depth);
    const depths = means.layers.map(depthOf);
    const rowAt = referenceRows(means.steps, reference);
    const buffer = new Float32Array(means.steps.length * width).fill(NaN); // one allocation for every step
    const values = means.steps.map((step, s) => {
      const out = buffer.subarray(s * width, (s + 1) * width);
      const row = rowAt[s];
      if (!row) return out;
      const points = same ? null : order.map(({l, depth}) => ({depth, value: row[l]}));
      for (let l = 0; l < width; l++) {
        const other = same ? (column[l] >= 0 ? row[column[l]] : NaN) : interpolateAtDepth(points, depths[l]);
        const own = means.values[s][l];
        out[l] = Number.isFinite(own) && Number.isFinite(other) ? own - other : NaN;
      }
      return out;
    });
    return {...means, values, byDepth: !same};
  });
}

/** For each of `steps` (sorted), the reference's row at its last step at or before it (null before its first). */
function referenceRows(steps, reference) {
  const rows = [];
  let r = -1;
  for (const step of steps) {
    while (r + 1 < reference.steps.length && reference.steps[r + 1] <= step) r += 1;
    rows.push(r >= 0 ? reference.values[r] : null);
  }
  return rows;
}

// -- unit heatmaps -----------------------------------------------------------------------------------------

const unitsCache = new WeakMap();

/** Whether two unit snapshots (api.fetchUnits, possibly filtered) have the same layers and unit counts. */
export function sameUnits(units, reference) {
  return units.layers.length === reference.layers.length
    && units.layers.every((layer, l) => layer.name === reference.layers[l].name && layer.values.length === reference.layers[l].values.length);
}

/**
 * Units minus the reference's, unit by unit (null if the layers or unit counts differ): a unit dead in
 * either run is dead; +inf or NaN in either is NaN. Layer means are the difference of the means. The same
 * object for the same pair of payloads.
 */
export function differenceUnits(units, reference) {
  if (!sameUnits(units, reference)) return null;
  return byPair(unitsCache, units, reference, () => ({
    ...units,
    referenceStep: reference.step,
    layers: units.layers.map((layer, l) => {
      const other = reference.layers[l];
      const values = new Float32Array(layer.values.length);
      for (let u = 0; u < values.length; u++) {
        const a = layer.values[u];
        const b = other.values[u];
        values[u] = Number.isFinite(a) && Number.isFinite(b) ? a - b : NaN;
      }
      return {...layer, values, dead: new Set([...layer.dead, ...other.dead]), mean: layer.mean - other.mean};
    }),
  }));
}

/** The largest |value| of live units of difference snapshots (0 if none). */
function largestDifference(unitsList) {
  let largest = 0;
  for (const units of unitsList) {
    for (const layer of units.layers) {
      for (let u = 0; u < layer.values.length; u++) {
        const v = Math.abs(layer.values[u]);
        if (v > largest && !layer.dead.has(u)) largest = v;
      }
    }
  }
  return largest;
}

/**
 * The heatmaps' diverging scale: symmetric about 0, to the largest difference shown rounded up to two
 * significant digits (no difference is beyond it); {measure, min, max, log, kind, over, under, rule,
 * colormap, diverging}.
 */
export function differenceScale(unitsList, measure, referenceName) {
  const largest = niceCeil(largestDifference(unitsList)) || 1;
  return {
    measure,
    min: -largest,
    max: largest,
    log: false,
    kind: "difference",
    over: false,
    under: false,
    diverging: true,
    colormap: divergingColor,
    rule: `${measure} of each run minus ${measure} of ${referenceName}, unit by unit at each run's step shown: blue where `
      + `the run's value is lower, red where it is higher, white where they are equal; symmetric about 0, up to the `
      + `largest difference of the live units shown, rounded up. Units dead in either run are magenta, units +inf or `
      + "NaN in either run grey.",
  };
}

/** The unit heatmaps' legend in difference mode: label, -max, the diverging ramp, +max, dead and NaN. */
export function renderDifferenceLegend(container, scale, label) {
  const signature = JSON.stringify(["difference", scale.min, scale.max, label]);
  if (container.tmSignature === signature) return;
  container.tmSignature = signature; // legend.js's renderLegend redraws once its own signature differs
  const bar = html("canvas", "tm-legend-bar");
  bar.width = 160;
  bar.height = 1;
  const context = bar.getContext("2d");
  const image = context.createImageData(bar.width, 1);
  for (let x = 0; x < bar.width; x++) image.data.set([...divergingColor((x + 0.5) / bar.width), 255], 4 * x);
  context.putImageData(image, 0, 0);
  bar.style.width = "160px";
  bar.style.height = "10px";
  const swatch = (color, text) => {
    const item = html("span", "tm-legend-item");
    const box = html("span", "tm-legend-swatch");
    box.style.background = cssColor(color);
    item.append(box, html("span", "", text));
    return item;
  };
  container.replaceChildren(
    html("span", "tm-legend-label", label),
    html("span", "tm-legend-min", formatValue(scale.min)),
    bar,
    html("span", "tm-legend-max", formatValue(scale.max)),
    swatch(SPECIAL_COLORS.dead, "dead in either run"),
    swatch(SPECIAL_COLORS.nan, "+inf or NaN in either run"),
  );
  container.title = scale.rule;
  Object.assign(container.dataset, {min: String(scale.min), max: String(scale.max), log: "false", kind: "difference",
    over: "false", under: "false"});
}
