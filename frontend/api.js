// The backend's routes: the only module that calls fetch. URLs are relative to the plugin's base href, so
// the tab works behind TensorBoard's --path_prefix. Non-finite numbers in JSON arrive as strings, bulk
// values (units, means, accuracy) as base64 float32; both are decoded here.

const NON_FINITE = {"Infinity": Infinity, "-Infinity": -Infinity, "NaN": NaN};

/** A number from the backend's JSON: finite numbers as they are, "Infinity" / "-Infinity" / "NaN" decoded. */
function decodeNumber(value) {
  return typeof value === "string" ? (value in NON_FINITE ? NON_FINITE[value] : Number(value)) : value;
}

/** Values sent as base64 of little-endian float32 (the byte order of every platform browsers run on). */
function decodeFloat32(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

/** A [steps, width] series: one Float32Array view per step. */
function decodeRows({shape: [rows, width], values}) {
  const flat = decodeFloat32(values);
  return Array.from({length: rows}, (_, r) => flat.subarray(r * width, (r + 1) * width));
}

function url(route, params) {
  const query = Object.entries(params)
    .filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => `${encodeURIComponent(key)}=${encodeURIComponent(value)}`)
    .join("&");
  return query ? `${route}?${query}` : route;
}

// Requests the heatmaps wait for (runs, units, config) go first: the backend answers one request at a time
// per core, so a background request (curves, accuracy) starts only while none of those is in flight.
let urgentInFlight = 0;
let backgroundWaiting = [];

function urgentDone() {
  urgentInFlight -= 1;
  if (urgentInFlight === 0) {
    const release = backgroundWaiting;
    backgroundWaiting = [];
    for (const resolve of release) resolve();
  }
}

function backgroundTurn() {
  return urgentInFlight === 0 ? Promise.resolve() : new Promise((resolve) => backgroundWaiting.push(resolve));
}

/** JSON of a route, or null when the backend answers 404 (no such data); other failures throw. */
async function getJson(route, params = {}, {background = false} = {}) {
  const address = url(route, params);
  if (background) await backgroundTurn();
  else urgentInFlight += 1;
  try {
    const response = await fetch(address);
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`${address}: HTTP ${response.status} ${(await response.text()).slice(0, 200)}`);
    return await response.json();
  } finally {
    if (!background) urgentDone();
  }
}

function layerInfo(layer) {
  return {
    name: layer.name,
    index: layer.index,
    moduleType: layer.module_type,
    unitShape: layer.unit_shape,
    numUnits: layer.num_units,
  };
}

/** Every (run, namespace) the backend knows, with its measures, layers and last step. */
export async function fetchRuns() {
  const payload = await getJson("runs");
  return (payload ? payload.runs : []).map((entry) => ({
    run: entry.run,
    namespace: entry.namespace,
    measures: entry.measures,
    layers: entry.layers.map(layerInfo),
    measureLayers: entry.measure_layers,
    accuracy: entry.accuracy,
    config: entry.config,
    maxStep: entry.max_step,
    perTransformation: entry.per_transformation || [], // ie_t / ee_t when logged
  }));
}

/** Every unit of every layer of one run at one step (latest when step is null), or null if absent. */
export async function fetchUnits(entry, measure, step) {
  const payload = await getJson("units", {run: entry.run, namespace: entry.namespace, measure, step});
  if (!payload) return null;
  return {
    step: payload.step,
    steps: payload.steps,
    meansIncludeDead: Boolean(payload.means_include_dead),
    layers: payload.layers.map((layer) => ({
      ...layerInfo(layer),
      values: decodeFloat32(layer.values),
      dead: new Set(layer.dead),
      mean: decodeNumber(layer.mean),
    })),
  };
}

/** Per-layer means of one measure at every (sampled) step: {layers, steps, values: [Float32Array per step]}. */
export async function fetchLayerMeans(entry, measure) {
  const payload = await getJson("layer_means", {run: entry.run, namespace: entry.namespace, measure}, {background: true});
  if (!payload) return null;
  const stderr = payload.stderr ? {shards: payload.stderr.shards, steps: payload.stderr.steps, values: decodeRows(payload.stderr)} : null;
  return {layers: payload.layers, steps: payload.steps, values: decodeRows(payload), stderr}; // stderr: null without error bars
}

/** A per-transformation measure (ie_t, ee_t) at one step (latest when null): {step, steps, layers,
 *  transformations: [{label, ops}], values: [layers][T], stderr: [layers][T] or null}; NaN for non-finite. */
export async function fetchPerTransformation(entry, measure, step) {
  const payload = await getJson("per_transformation", {run: entry.run, namespace: entry.namespace, measure, step}, {background: true});
  if (!payload) return null;
  const rows = (matrix) => matrix.map((row) => row.map((v) => (v === null ? NaN : decodeNumber(v))));
  return {
    step: payload.step, steps: payload.steps, layers: payload.layers, transformations: payload.transformations,
    values: rows(payload.values), stderr: payload.stderr ? rows(payload.stderr) : null,
  };
}

/** Accuracy per transformation at every (sampled) step: {labels, steps, values}, or null if not logged. */
export async function fetchAccuracy(entry) {
  const payload = await getJson("accuracy", {run: entry.run, namespace: entry.namespace}, {background: true});
  if (!payload) return null;
  return {labels: payload.labels, steps: payload.steps, values: decodeRows(payload)};
}

/** The run's configuration record (protobuf JSON: 64-bit integers arrive as strings), or null. */
export async function fetchConfig(entry) {
  const payload = await getJson("config", {run: entry.run, namespace: entry.namespace});
  return payload ? payload.config : null;
}

/** One unit's value at every step with a snapshot: {steps, values: Float32Array, dead: Set of the steps at
 *  which it was dead}, or null if the run has no such unit. */
export async function fetchUnitHistory(entry, measure, layer, unit) {
  const payload = await getJson("unit_history", {run: entry.run, namespace: entry.namespace, measure, layer, unit});
  if (!payload) return null;
  return {steps: payload.steps, values: decodeFloat32(payload.values), dead: new Set(payload.dead)};
}

/** TensorBoard's run names in its own order (its data/runs route: by start time, then name; the order it
 *  colors runs in), or null if it cannot be read. */
export async function fetchTensorBoardRuns() {
  try {
    const runs = await getJson("../../runs", {}, {background: true});
    return Array.isArray(runs) && runs.every((name) => typeof name === "string") ? runs : null;
  } catch {
    return null;
  }
}
