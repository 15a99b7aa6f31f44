// The tab's UI state (one plain object, passed to the views), the helpers that read it, and its copy in
// the URL (readUrlState / writeUrlState), so that a reload or a shared link shows the same view.
import {runColor} from "./colors.js";
import {DEFAULT_SMOOTHING, MAX_SMOOTHING} from "./smoothing.js";

const DEFAULT_MEASURE = "nvi";
const DEFAULT_SELECTION = 4;
const DEFAULT_NAMESPACE = "invariance";

/**
 * A fresh state: no runs yet, measure nvi, following the latest step, x axis by layer index, every layer
 * shown, the measure's own color scale. reference: the run key another view compares the others with
 * (null: none); lock: {measure, min, max} while the color scale is locked; log: log color scale (for
 * measures without a natural range).
 */
export function createState() {
  return {
    catalog: [],
    selected: new Set(),
    colors: new Map(),
    measure: DEFAULT_MEASURE,
    step: null,
    xAxis: "layer",
    reference: null,
    lock: null,
    log: false,
    layerFilter: "",
    hideActivations: false,
    smoothing: DEFAULT_SMOOTHING, // the curves over training: TensorBoard's smoothing weight
    logY: false, // the curves over training: log y axis
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
  if (state.reference !== null && !keys.has(state.reference)) state.reference = null;
  if (state.selected.size === 0) {
    for (const entry of catalog.slice(0, DEFAULT_SELECTION)) state.selected.add(runKey(entry));
  }
  const measures = availableMeasures(state);
  if (measures.length && !measures.includes(state.measure)) {
    state.measure = measures.includes(DEFAULT_MEASURE) ? DEFAULT_MEASURE : measures[0];
  }
  if (state.lock && state.lock.measure !== state.measure) state.lock = null;
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

// -- the state in the URL ---------------------------------------------------------------------------------
// TensorBoard's way: keys "p.<plugin>.<key>" in the hash of TensorBoard's page, next to its own "#<plugin>"
// token (the format its plugin API getURLPluginData reads). TensorBoard has no API to write them, and in
// 2.21 getURLPluginData answers {} until the page's first hashchange (its hash dictionary is read before
// it switches to hash mode), so the tab reads and writes TensorBoard's hash itself: the plugin's iframe is
// served from TensorBoard's origin. history.replaceState changes the address without a history entry and
// without a hashchange, so TensorBoard does not react; it keeps foreign keys when it rewrites its hash.
// Outside TensorBoard's page (the iframe opened on its own, or a parent of another origin) the iframe's
// own hash holds the same keys.

const PLUGIN = "tm_invariance";
const PREFIX = `p.${PLUGIN}.`;
const URL_WRITE_DELAY_MS = 150;

/** A run key as written in the URL: its name, or [name, namespace] outside the default namespace. */
function runRef(key) {
  const [run, namespace] = JSON.parse(key);
  return namespace === DEFAULT_NAMESPACE ? run : [run, namespace];
}

/** The run key of a runRef; null if `ref` is neither a string nor a [string, string] pair. */
function keyOfRef(ref) {
  if (typeof ref === "string") return runKey({run: ref, namespace: DEFAULT_NAMESPACE});
  if (Array.isArray(ref) && ref.length === 2 && ref.every((part) => typeof part === "string")) {
    return runKey({run: ref[0], namespace: ref[1]});
  }
  return null;
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The URL keys (without prefix) of the state's shareable parts: {key: string}; defaults are left out. */
export function stateToParams(state) {
  const params = {measure: state.measure, runs: JSON.stringify([...state.selected].map(runRef))};
  if (state.step !== null) params.step = String(state.step);
  if (state.xAxis !== "layer") params.axis = state.xAxis;
  if (state.reference !== null) params.reference = JSON.stringify(runRef(state.reference));
  if (state.lock) params.lock = `${state.lock.min},${state.lock.max}`;
  if (state.log) params.log = "1";
  if (state.layerFilter) params.filter = state.layerFilter;
  if (state.hideActivations) params.hide = "1";
  if (state.smoothing !== DEFAULT_SMOOTHING) params.smoothing = String(state.smoothing);
  if (state.logY) params.ylog = "1";
  return params;
}

/** Sets the state's parts found in `params` (as stateToParams writes them); malformed values are ignored. */
export function applyParams(state, params) {
  if (typeof params.measure === "string" && params.measure) state.measure = params.measure;
  const runs = parseJson(params.runs);
  if (Array.isArray(runs)) {
    const keys = runs.map(keyOfRef).filter(Boolean);
    if (keys.length) state.selected = new Set(keys);
  }
  if (params.step !== undefined && /^-?\d+$/.test(params.step)) state.step = Number(params.step);
  if (params.axis === "depth" || params.axis === "layer") state.xAxis = params.axis;
  if (params.reference !== undefined) state.reference = keyOfRef(parseJson(params.reference));
  state.log = params.log === "1";
  const lock = (params.lock || "").split(",").map(Number);
  state.lock = lock.length === 2 && lock.every(Number.isFinite) && lock[1] > lock[0] && !(state.log && lock[0] <= 0)
    ? {measure: state.measure, min: lock[0], max: lock[1]} : null;
  if (typeof params.filter === "string") state.layerFilter = params.filter;
  state.hideActivations = params.hide === "1";
  const smoothing = params.smoothing === undefined ? NaN : Number(params.smoothing);
  if (smoothing >= 0 && smoothing <= MAX_SMOOTHING) state.smoothing = smoothing;
  state.logY = params.ylog === "1";
}

/** TensorBoard's hash format: "tab&key=value&...", keys and values URI-encoded; {tab, params: Map}. */
export function parseHash(hash) {
  const params = new Map();
  let tab = "";
  for (const part of hash.replace(/^#/, "").split("&")) {
    const pieces = part.split("=");
    if (pieces.length === 1) tab = pieces[0];
    else if (pieces.length === 2) {
      try {
        params.set(decodeURIComponent(pieces[0]), decodeURIComponent(pieces[1]));
      } catch {
        // a malformed escape: not ours to fix, left out
      }
    }
  }
  return {tab, params};
}

/** The hash of parseHash's {tab, params}. */
export function formatHash({tab, params}) {
  const pairs = [...params].map(([key, value]) => `${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
  return [tab, ...pairs].filter((part, i) => i > 0 || part !== "" || pairs.length === 0).join("&");
}

/** The window whose URL holds the state: TensorBoard's page when the iframe can reach it, else the iframe. */
function urlWindow() {
  try {
    if (window.parent !== window && window.parent.location.href) return window.parent;
  } catch {
    // a parent of another origin
  }
  return window;
}

/** The state's keys in the URL (without prefix) and where they were found: {params, where: "tensorboard"
 *  | "iframe"}. */
export function readUrlState() {
  const host = urlWindow();
  const {params} = parseHash(host.location.hash);
  const ours = {};
  for (const [key, value] of params) if (key.startsWith(PREFIX)) ours[key.slice(PREFIX.length)] = value;
  return {params: ours, where: host === window ? "iframe" : "tensorboard"};
}

/** Replaces the state's keys in the URL with those of `state` at once (no history entry). Nothing is
 *  written while TensorBoard shows another tab. */
export function writeUrlStateNow(state) {
  const host = urlWindow();
  const {tab, params} = parseHash(host.location.hash);
  if (host !== window && tab && tab !== PLUGIN) return;
  for (const key of [...params.keys()]) if (key.startsWith(PREFIX)) params.delete(key);
  for (const [key, value] of Object.entries(stateToParams(state))) params.set(PREFIX + key, value);
  const address = new URL(host.location.href);
  address.hash = formatHash({tab: host === window ? tab : tab || PLUGIN, params});
  if (address.href !== host.location.href) host.history.replaceState(host.history.state, "", address.href);
}

let pendingWrite = null;

/** writeUrlStateNow after a short pause (a dragged slider writes once it rests). */
export function writeUrlState(state) {
  clearTimeout(pendingWrite);
  pendingWrite = setTimeout(() => writeUrlStateNow(state), URL_WRITE_DELAY_MS);
}
