// The tab's UI state (one plain object, passed to the views) and the helpers that read it.
import {runColor} from "./colors.js";

const DEFAULT_MEASURE = "nvi";
const DEFAULT_SELECTION = 4;

/** A fresh state: no runs yet, measure nvi, following the latest step, x axis by layer index. */
export function createState() {
  return {
    catalog: [],
    selected: new Set(),
    colors: new Map(),
    measure: DEFAULT_MEASURE,
    step: null,
    xAxis: "layer",
  };
}

/** The identity of a run entry: the (run, namespace) pair as one string. */
export function runKey(entry) {
  return JSON.stringify([entry.run, entry.namespace]);
}

/** How a run entry is shown: the run name, plus the namespace when it is not the default one. */
export function runLabel(entry) {
  return entry.namespace === "invariance" ? entry.run : `${entry.run} \u00b7 ${entry.namespace}`;
}

/** The run entry's color, the same in every view. */
export function colorOf(state, entry) {
  return state.colors.get(runKey(entry));
}

/** Installs a new catalog of runs: keeps colors and selection of known runs, selects a few if none is. */
export function setCatalog(state, catalog) {
  const keys = new Set(catalog.map(runKey));
  state.catalog = catalog;
  for (const key of catalog.map(runKey)) {
    if (!state.colors.has(key)) state.colors.set(key, runColor(state.colors.size));
  }
  state.selected = new Set([...state.selected].filter((key) => keys.has(key)));
  if (state.selected.size === 0) {
    for (const entry of catalog.slice(0, DEFAULT_SELECTION)) state.selected.add(runKey(entry));
  }
  const measures = availableMeasures(state);
  if (measures.length && !measures.includes(state.measure)) {
    state.measure = measures.includes(DEFAULT_MEASURE) ? DEFAULT_MEASURE : measures[0];
  }
}

/** The selected run entries, in catalog order. */
export function selectedEntries(state) {
  return state.catalog.filter((entry) => state.selected.has(runKey(entry)));
}

/** The measures any selected run has, in the backend's order (measure groups, each run's in turn). */
export function availableMeasures(state) {
  return [...new Set(selectedEntries(state).flatMap((entry) => entry.measures))];
}

/** The largest of the sorted steps that is <= step (the first one if none is), or null if there are none. */
export function stepAtOrBefore(steps, step) {
  if (!steps || steps.length === 0) return null;
  let lo = 0;
  let hi = steps.length - 1;
  if (step < steps[0]) return steps[0];
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (steps[mid] <= step) lo = mid;
    else hi = mid - 1;
  }
  return steps[lo];
}

/** The sorted union of several sorted step lists. */
export function unionSteps(lists) {
  return [...new Set(lists.flat())].sort((a, b) => a - b);
}

/** A layer's relative depth in its run, 0 (first observed layer) to 1 (last). */
export function layerDepth(entry, layerIndex) {
  return entry.layers.length > 1 ? layerIndex / (entry.layers.length - 1) : 0;
}
