// Cache of everything fetched: each piece of data is requested once. Data that grows while a run trains
// (latest units, layer means, accuracy) is keyed by the run's max_step, so a reload that brings new steps
// fetches it again while unit snapshots of past steps stay cached.
import * as api from "./api.js";
import {runKey} from "./state.js";

const MAX_UNIT_SNAPSHOTS = 256;

/**
 * A store calling onChange() whenever a request finishes, onUnitHistory() instead for a unit's history
 * (only its chart shows it). Every getter returns a record {done, value, error}: value is null when the
 * backend has no such data.
 */
export function createStore(onChange, onUnitHistory = onChange) {
  const snapshots = new Map(); // run, measure, step -> record (least recently used first)
  const growing = new Map(); // kind, run, measure -> {maxStep, record}
  const configs = new Map(); // run -> record
  const unitSteps = new Map(); // run -> sorted steps that have units
  const lastUnits = new Map(); // run, measure -> the most recent units received

  function request(load, after = () => {}, notify = onChange) {
    const record = {done: false, value: undefined, error: null};
    load().then(
      (value) => {
        record.value = value;
        after(value);
      },
      (error) => {
        record.error = error;
      },
    ).finally(() => {
      record.done = true;
      notify();
    });
    return record;
  }

  function remember(entry, measure, units) {
    if (!units) return;
    const key = runKey(entry);
    const known = unitSteps.get(key);
    if (!known || units.steps.at(-1) >= known.at(-1)) unitSteps.set(key, units.steps);
    lastUnits.set(JSON.stringify([key, measure]), units);
  }

  function snapshotKey(entry, measure, step) {
    return JSON.stringify([runKey(entry), measure, step]);
  }

  function file(key, record) {
    snapshots.delete(key);
    snapshots.set(key, record);
    while (snapshots.size > MAX_UNIT_SNAPSHOTS) snapshots.delete(snapshots.keys().next().value);
    return record;
  }

  function current(kind, entry, measure, load, after, notify) {
    const key = JSON.stringify([kind, runKey(entry), measure]);
    const found = growing.get(key);
    if (found && found.maxStep === entry.maxStep) return found.record;
    const record = request(load, after, notify);
    growing.set(key, {maxStep: entry.maxStep, record});
    return record;
  }

  return {
    /** Units at one step (fetched if not cached). */
    units(entry, measure, step) {
      const key = snapshotKey(entry, measure, step);
      const found = snapshots.get(key);
      if (found) return file(key, found);
      return file(key, request(() => api.fetchUnits(entry, measure, step), (units) => remember(entry, measure, units)));
    },

    /** Units at one step if already requested (received or on the way), else undefined (never fetches). */
    peekUnits(entry, measure, step) {
      return snapshots.get(snapshotKey(entry, measure, step));
    },

    /** Units at the run's latest step; also filed under that step. */
    latestUnits(entry, measure) {
      return current("latest", entry, measure, () => api.fetchUnits(entry, measure, null), (units) => {
        remember(entry, measure, units);
        if (units) file(snapshotKey(entry, measure, units.step), {done: true, value: units, error: null});
      });
    },

    /** The most recent units received for the run and measure (shown while newer ones load), or undefined. */
    lastUnits(entry, measure) {
      return lastUnits.get(JSON.stringify([runKey(entry), measure]));
    },

    /** The run's steps that have units, sorted, once any units of the run arrived; else undefined. */
    unitSteps(entry) {
      return unitSteps.get(runKey(entry));
    },

    /** Per-layer means of one measure over training. */
    layerMeans(entry, measure) {
      return current("means", entry, measure, () => api.fetchLayerMeans(entry, measure));
    },

    /** A per-transformation measure at one step (null: the latest, fetched again when the run has new steps). */
    perTransformation(entry, measure, step) {
      if (step === null) return current("per-transformation", entry, measure, () => api.fetchPerTransformation(entry, measure, null));
      const key = JSON.stringify(["per-transformation", runKey(entry), measure, step]);
      const found = snapshots.get(key);
      if (found) return file(key, found);
      return file(key, request(() => api.fetchPerTransformation(entry, measure, step)));
    },

    /** Accuracy per transformation over training (value null when the run logs none). */
    accuracy(entry) {
      if (!entry.accuracy) return {done: true, value: null, error: null};
      return current("accuracy", entry, null, () => api.fetchAccuracy(entry));
    },

    /** The run's configuration record. */
    config(entry) {
      if (!entry.config) return {done: true, value: null, error: null};
      const key = runKey(entry);
      if (!configs.has(key)) configs.set(key, request(() => api.fetchConfig(entry)));
      return configs.get(key);
    },

    /** One unit's value over training (fetched again when the run has new steps). */
    unitHistory(entry, measure, layer, unit) {
      return current("history", entry, JSON.stringify([measure, layer, unit]), () => api.fetchUnitHistory(entry, measure, layer, unit),
        undefined, onUnitHistory);
    },
  };
}
