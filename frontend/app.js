// The Invariance tab: builds the page, owns the state, asks the store for data and hands it to the views.
// Views that depend on the step (unit heatmaps, layer profile, accuracy) redraw on every slider move from
// cached data; the others redraw only when their inputs change.
import {fetchRuns, fetchTensorBoardRuns} from "./api.js";
import {renderAccuracy} from "./accuracy.js";
import {createAccuracyTraining} from "./accuracy_training.js";
import {valueSummary} from "./colors.js";
import {renderConfig} from "./config_view.js";
import {createControls} from "./controls.js";
import {createCurveControls} from "./curve_controls.js";
import {createCurves, depthLegend} from "./curves.js";
import {
  activeReference, createReferenceControl, differenceMeans, differenceProfile, differenceScale, differenceUnits, renderDifferenceLegend,
  sameArchitecture,
} from "./difference.js";
import {renderEmptyState} from "./empty_state.js";
import {
  accuracyTrainingTable, downloadImage, downloadTable, exportButtons, fileSafe, meansTable, perTransformationTable, profileTable,
  unitHistoryTable, unitsTable,
} from "./export.js";
import {createUnitHeatmaps, gridLayout} from "./heatmap.js";
import {listenForReloads} from "./host.js";
import {layerSelection, moduleTypes, selectMeans, selectUnits} from "./layers.js";
import {renderLegend} from "./legend.js";
import {html} from "./plot.js";
import {createPerTransformation} from "./per_transformation.js";
import {createProfile} from "./profile.js";
import {assignRunColors} from "./run_colors.js";
import {createRangeTracker, measureScale} from "./scales.js";
import {
  applyParams, colorOf, createState, layerDepth, readUrlState, runKey, runLabel, selectedEntries, setCatalog, stepAtOrBefore,
  unionSteps, writeUrlState,
} from "./state.js";
import {createStore} from "./store.js";
import {followTheme} from "./theme.js";
import {createTooltip} from "./tooltip.js";
import {createTrainingHeatmaps} from "./training_heatmap.js";
import {createUnitHistory} from "./unit_history.js";

const STEP_FETCH_DELAY_MS = 120;
const MIN_CHART_WIDTH = 360;
const MAX_CHART_WIDTH = 720;

/** Loads static/style.css (relative to the plugin's base href) and resolves once it applied or failed. */
function loadStylesheet() {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "static/style.css";
  const loaded = new Promise((resolve) => {
    link.addEventListener("load", resolve);
    link.addEventListener("error", resolve);
  });
  document.head.append(link);
  return loaded;
}

function section(id, title, explanation) {
  const element = html("section", "tm-section");
  element.id = id;
  const heading = html("h3", "", title);
  const note = html("span", "tm-muted tm-heading-note");
  heading.append(note);
  element.append(heading);
  if (explanation) element.append(html("p", "tm-muted tm-explanation", explanation));
  return {element, note};
}

function layout(root) {
  const app = html("div", "tm-app");
  const toolbar = html("div", "tm-toolbar");
  toolbar.id = "tm-toolbar";
  const status = html("div", "tm-status");
  status.id = "tm-status";
  const content = html("div", "tm-content");
  const empty = html("div");

  const units = section("tm-units", "Units",
    "One column per layer in network order, one cell per unit (channel), each column's units stretched to the full height. Hover a cell for "
    + "details, click it to see that unit during training.");
  const unitsLegend = html("div", "tm-legend");
  unitsLegend.id = "tm-units-legend";
  const heatmaps = html("div", "tm-panels");
  heatmaps.id = "tm-heatmaps";
  units.element.append(unitsLegend, heatmaps);

  const unitHistory = section("tm-unit-history-section", "Unit during training",
    "The unit clicked in a unit heatmap, at every logged step, in every selected run that has it (same layer and unit index).");
  const unitHistoryChart = html("div");
  unitHistoryChart.id = "tm-unit-history";
  unitHistory.element.append(unitHistoryChart);

  const profile = section("tm-profile-section", "Layer profile", "Mean over each layer's finite live units, one line per run; the band "
    + "spans 10 to 90 % of the layer's live units (once the step's units are loaded). Hover a point for the layer's dead units.");
  const profileChart = html("div");
  profileChart.id = "tm-profile";
  profile.element.append(profileChart);

  const perTransformation = section("tm-pt-section", "Error per transformation",
    "Each transformation's error at the chosen step (ie_t: invariance error, ee_t: equivariance error): against the transformation's "
    + "parameter, one line per layer colored by depth, with \u00b11 standard error bands when the run logged error bars; below, "
    + "one row per layer and one column per transformation.");
  const perTransformationChart = html("div");
  perTransformationChart.id = "tm-per-transformation";
  perTransformation.element.append(perTransformationChart);

  const accuracy = section("tm-accuracy-section", "Accuracy per transformation");
  const accuracyChart = html("div");
  accuracyChart.id = "tm-accuracy";
  const accuracyTraining = html("div", "tm-panels");
  accuracyTraining.id = "tm-accuracy-training";
  const accuracyTrainingTitle = html("p", "tm-muted tm-explanation",
    "During training: one row per transformation, one column per logged step (click a column to show that step).");
  const accuracyLegend = html("div", "tm-legend");
  accuracyLegend.id = "tm-accuracy-legend";
  // a part of its own, with its heading and export buttons
  const accuracyTrainingSection = html("div", "tm-subsection");
  accuracyTrainingSection.id = "tm-accuracy-training-section";
  accuracyTrainingSection.append(html("h4", "", "Accuracy during training"), accuracyTrainingTitle, accuracyLegend, accuracyTraining);
  accuracy.element.append(accuracyChart, accuracyTrainingSection);

  const curves = section("tm-curves-section", "Layer means during training",
    "One line per layer, colored by depth, smoothed as TensorBoard smooths scalars (the raw lines faint). Hover a line to name its layer, "
    + "click to show that step.");
  const curvesLegend = html("div", "tm-legend");
  curvesLegend.id = "tm-curves-legend";
  curvesLegend.append(depthLegend());
  const curvesPanels = html("div", "tm-panels");
  curvesPanels.id = "tm-curves";
  curves.element.append(curvesLegend, curvesPanels);

  const training = section("tm-training-section", "Invariance during training",
    "Layer means: one row per layer, one column per logged step (click a column to show that step).");
  const trainingLegend = html("div", "tm-legend");
  trainingLegend.id = "tm-training-legend";
  const trainingPanels = html("div", "tm-panels");
  trainingPanels.id = "tm-training";
  training.element.append(trainingLegend, trainingPanels);

  const config = section("tm-config-section", "Configuration");
  const configPanels = html("div", "tm-panels");
  configPanels.id = "tm-config";
  config.element.append(configPanels);

  content.append(units.element, unitHistory.element, profile.element, perTransformation.element, accuracy.element, curves.element, training.element, config.element);
  app.append(toolbar, status, content, empty);
  root.append(app);
  return {
    toolbar, status, content, empty, unitsNote: units.note, unitsLegend, heatmaps, profileNote: profile.note,
    profileChart, accuracyNote: accuracy.note, accuracyChart, curvesPanels, trainingLegend, trainingPanels, configPanels,
    unitHistoryChart, unitHistorySection: unitHistory.element, accuracyTraining, accuracyLegend, curvesLegend,
    perTransformationChart, perTransformationSection: perTransformation.element, perTransformationNote: perTransformation.note,
  };
}

/** True when `parts` differ from what `memo[name]` last saw (compared with ===); remembers them. */
function changed(memo, name, parts) {
  const previous = memo[name];
  memo[name] = parts;
  return !previous || previous.length !== parts.length || parts.some((part, i) => part !== previous[i]);
}

function chartWidth(total, count) {
  const perRow = Math.max(1, Math.min(count, Math.floor(total / MIN_CHART_WIDTH)));
  return Math.min(Math.floor(total / perRow) - 20, MAX_CHART_WIDTH);
}

const summaries = new WeakMap();

/** The value summary of a payload's arrays, computed once per payload (payloads never change). */
function summarized(payload, arrays) {
  if (!summaries.has(payload)) summaries.set(payload, valueSummary(arrays(payload)));
  return summaries.get(payload);
}

/** Each layer's values without its dead units (their 0 / 0 ratio says nothing about the scale). */
function liveUnitValues(units) {
  return units.layers.map((layer) => (layer.dead.size ? layer.values.filter((_, u) => !layer.dead.has(u)) : layer.values));
}

/** Starts the tab in `root` (the iframe's body). */
export async function startApp(root) {
  const stylesheet = loadStylesheet();
  document.body.classList.add("tm-body");
  followTheme(document.body, () => scheduleRender()); // run colors have a dark variant
  const state = createState();
  applyParams(state, readUrlState().params); // a reload or a shared link shows the same view
  const ranges = createRangeTracker();
  const view = layout(root);
  const tooltip = createTooltip(root);
  const memo = {};
  // what the views show last, for the exports and the scale lock
  const shown = {scale: null, selection: layerSelection(state), panels: [], profiles: [], runs: [], accuracyRuns: [],
    unitHistory: {selection: null, runs: []}, perTransformation: {measure: "ie_t", runs: []}};
  let catalogLoaded = false;
  let contentWidth = 0;
  let catalogRequest = 0;
  let pendingFrame = null;
  let pendingUnitFrame = null;
  let tensorBoardRuns = null; // TensorBoard's run order, for its run colors
  // linked views: the layer hovered in any view, and the unit clicked in a unit heatmap {layer, unit}
  let highlighted = null;
  let selectedUnit = null;

  // Unit snapshots of the step the slider shows: fetched at once after a pause (a click or a key moves
  // it), while it is dragged only once it rests for STEP_FETCH_DELAY_MS (not every step it passes).
  const wantedUnits = new Map();
  let unitTimer = null;
  let lastUnitFetch = -Infinity;

  const store = createStore(scheduleRender, scheduleUnitHistory);
  const heatmaps = createUnitHeatmaps(view.heatmaps, tooltip, {onLayerHover: highlightLayer, onCell: showUnit});
  const curves = createCurves(view.curvesPanels, tooltip, {onLayerHover: highlightLayer, onStep: goToStep});
  const training = createTrainingHeatmaps(view.trainingPanels, tooltip, {onStep: goToStep});
  const profile = createProfile(view.profileChart, tooltip, {onLayerHover: highlightLayer});
  const perTransformation = createPerTransformation(view.perTransformationChart, tooltip, {onChange: () => render()});
  const unitHistory = createUnitHistory(view.unitHistoryChart, tooltip, {
    onStep: goToStep,
    onClose() {
      selectedUnit = null;
      redrawUnitHistory();
    },
  });
  const accuracyTraining = createAccuracyTraining(view.accuracyTraining, tooltip, {onStep: goToStep});
  const curveControls = createCurveControls(view.curvesLegend, {
    onSmoothing(weight) {
      state.smoothing = weight;
      persist();
    },
    onLogY(log) {
      state.logY = log;
      persist();
    },
  });
  const controls = createControls(view.toolbar, {
    onRuns(keys) {
      state.selected = new Set(keys);
      persist();
    },
    onMeasure(measure) {
      state.measure = measure;
      state.lock = null; // a range locked for another measure means nothing for this one
      persist();
    },
    onStep(step) {
      state.step = step;
      if (unitTimer !== null) {
        clearTimeout(unitTimer);
        unitTimer = setTimeout(fetchWantedUnits, STEP_FETCH_DELAY_MS);
      }
      persist();
    },
    onXAxis(xAxis) {
      state.xAxis = xAxis;
      persist();
    },
    onLayerFilter(text) {
      state.layerFilter = text;
      persist();
    },
    onHideActivations(hide) {
      state.hideActivations = hide;
      persist();
    },
    onLock(locked) {
      state.lock = locked && shown.scale ? {measure: state.measure, min: shown.scale.min, max: shown.scale.max} : null;
      persist();
    },
    onLog(log) {
      state.log = log;
      persist();
    },
  });

  /** Redraws after a change of the state and copies it to the URL. Views that change the state (e.g. the
   *  reference run) call it too. */
  function persist() {
    writeUrlState(state);
    render();
  }

  const referenceControl = createReferenceControl(view.toolbar, (key) => {
    state.reference = key;
    persist();
  });

  // -- linked views: a step clicked in a chart, a layer hovered, a unit clicked ---------------------------
  /** Moves the step slider to `step` (following the latest step when it is the last one). */
  function goToStep(step) {
    if (step === null || step === undefined) return;
    const steps = unionSteps(selectedEntries(state).map((entry) => store.unitSteps(entry)).filter(Boolean));
    state.step = steps.length && step >= steps.at(-1) ? null : step;
    persist();
  }

  /** Highlights layer `name` in every view (the heatmaps' column, the profile's points, the curves). */
  function highlightLayer(name) {
    if (name === highlighted) return;
    highlighted = name;
    heatmaps.highlightLayer(name);
    profile.highlight(name);
    curves.highlight(name);
  }

  /** Shows a unit's values during training (a click on a heatmap cell): only that chart changes. */
  function showUnit({layer, unit}) {
    selectedUnit = {layer, unit};
    redrawUnitHistory();
    view.unitHistorySection.scrollIntoView({block: "nearest"});
  }

  // Export buttons in the sections' headings: the data shown (CSV, JSON) and the charts (PNG, SVG).
  function exportName(what, withStep) {
    const step = withStep && shown.step !== undefined && shown.step !== null ? `-step${shown.step}` : "";
    return fileSafe(`invariance-${what}${what === "accuracy" ? "" : `-${state.measure}`}${step}`);
  }
  const runsLegend = () => shown.profiles.map(({label, color}) => ({label, color}));
  const exportsOf = {
    "tm-units": ["units", {
      onData: (format) => downloadTable(unitsTable(shown.panels, {measure: state.measure}), exportName("units", true), format),
      onImage: (format) => downloadImage(document.getElementById("tm-units"), exportName("units", true), format),
    }],
    "tm-profile-section": ["profile", {
      onData: (format) => downloadTable(profileTable(shown.profiles.filter((s) => s.points.length), {measure: state.measure, types: moduleTypes}),
        exportName("profile", true), format),
      onImage: (format) => downloadImage(document.getElementById("tm-profile-section"), exportName("profile", true), format, {runs: runsLegend()}),
    }],
    "tm-accuracy-section": ["accuracy", {
      onImage: (format) => downloadImage(document.getElementById("tm-accuracy-section"), exportName("accuracy", true), format, {runs: runsLegend()}),
    }],
    "tm-curves-section": ["curves", {
      onData: (format) => downloadTable(meansTable(shown.runs, {measure: state.measure, types: moduleTypes}), exportName("layer-means"), format),
      onImage: (format) => downloadImage(document.getElementById("tm-curves-section"), exportName("curves"), format),
    }],
    "tm-unit-history-section": ["unit-history", {
      onData: (format) => downloadTable(unitHistoryTable(shown.unitHistory.runs, {measure: state.measure, selection: shown.unitHistory.selection || {layer: "", unit: ""}}),
        exportName(shown.unitHistory.selection ? `unit-${shown.unitHistory.selection.layer}-${shown.unitHistory.selection.unit}` : "unit"), format),
      onImage: (format) => downloadImage(document.getElementById("tm-unit-history-section"),
        exportName(shown.unitHistory.selection ? `unit-${shown.unitHistory.selection.layer}-${shown.unitHistory.selection.unit}` : "unit"), format),
    }],
    "tm-pt-section": ["per-transformation", {
      onData: (format) => downloadTable(perTransformationTable(shown.perTransformation.runs, {measure: shown.perTransformation.measure, types: moduleTypes}),
        fileSafe(`invariance-per-transformation-${shown.perTransformation.measure}`), format),
      onImage: (format) => downloadImage(document.getElementById("tm-pt-section"), fileSafe(`invariance-per-transformation-${shown.perTransformation.measure}`), format),
    }],
    "tm-accuracy-training-section": ["accuracy-training", {
      onData: (format) => downloadTable(accuracyTrainingTable(shown.accuracyRuns), "invariance-accuracy-training", format),
      onImage: (format) => downloadImage(document.getElementById("tm-accuracy-training-section"), "invariance-accuracy-training", format),
    }],
    "tm-training-section": ["training", {
      onImage: (format) => downloadImage(document.getElementById("tm-training-section"), exportName("training-heatmap"), format),
    }],
  };
  for (const [id, [what, actions]] of Object.entries(exportsOf)) {
    document.getElementById(id).querySelector("h3, h4").append(exportButtons(what, actions));
  }

  function wantedStep(entry) {
    const steps = store.unitSteps(entry);
    return state.step === null || !steps ? null : stepAtOrBefore(steps, state.step);
  }

  function requestUnits(entry, step) {
    wantedUnits.set(JSON.stringify([runKey(entry), state.measure, step]), entry);
    if (unitTimer === null) {
      const wait = Math.max(0, lastUnitFetch + STEP_FETCH_DELAY_MS - performance.now());
      unitTimer = setTimeout(fetchWantedUnits, wait);
    }
  }

  function fetchWantedUnits() {
    unitTimer = null;
    lastUnitFetch = performance.now();
    const entries = [...wantedUnits.values()];
    wantedUnits.clear();
    for (const entry of entries) {
      if (state.selected.has(runKey(entry)) && wantedStep(entry) !== null) store.units(entry, state.measure, wantedStep(entry));
    }
  }

  function scheduleRender() {
    if (pendingFrame === null) {
      pendingFrame = requestAnimationFrame(() => {
        pendingFrame = null;
        render();
      });
    }
  }

  /** Redraws the unit history alone in the next frame (a response only it shows), unless the whole tab
   *  is redrawn in that frame anyway: redrawing every view per response would cost tens of ms each. */
  function scheduleUnitHistory() {
    if (pendingFrame === null && pendingUnitFrame === null) {
      pendingUnitFrame = requestAnimationFrame(() => {
        pendingUnitFrame = null;
        if (pendingFrame === null) redrawUnitHistory();
      });
    }
  }

  function base(entry) {
    return {key: runKey(entry), entry, label: runLabel(entry), color: colorOf(state, entry)};
  }

  function unitsPanel(entry) {
    const panel = {...base(entry), units: null, note: "", message: ""};
    if (!entry.measures.includes(state.measure)) return {...panel, message: `This run has no ${state.measure}.`};
    const latest = store.latestUnits(entry, state.measure); // also keeps the run's list of steps current
    const step = wantedStep(entry);
    const record = step === null ? latest : store.peekUnits(entry, state.measure, step);
    if (!record) requestUnits(entry, step);
    if (record && record.done) {
      if (record.error) return {...panel, message: String(record.error.message || record.error)};
      if (!record.value) return {...panel, message: `No units at step ${step}.`};
      ranges.note(panel.key, state.measure, record.value.step, summarized(record.value, liveUnitValues));
      return {...panel, units: selectUnits(record.value, shown.selection), note: `step ${record.value.step}`};
    }
    const last = store.lastUnits(entry, state.measure);
    return {...panel, units: selectUnits(last, shown.selection) || null, stale: Boolean(last), note: "loading\u2026"};
  }

  function meansOf(entry) {
    if (!entry.measures.includes(state.measure)) return null;
    const record = store.layerMeans(entry, state.measure);
    return record.done && !record.error ? record.value : null;
  }

  /** The profile of a run at the chosen step: from its unit snapshot when that is loaded (each layer's mean
   *  at exactly that step), else from the layer means (possibly thinned to fewer steps). */
  function profileSeries(entry, units) {
    if (units) {
      const points = units.layers.map((layer) => ({
        name: layer.name, index: layer.index, depth: layerDepth(entry, layer.index), value: layer.mean, layer, // layer: spread, dead units
      }));
      return withStderr(entry, {...base(entry), step: units.step, points, meansIncludeDead: units.meansIncludeDead});
    }
    const means = meansOf(entry);
    if (!means || means.steps.length === 0) return {...base(entry), step: null, points: []};
    const step = state.step === null ? means.steps.at(-1) : stepAtOrBefore(means.steps, state.step);
    const row = means.values[means.steps.indexOf(step)];
    const indexOf = new Map(entry.layers.map((layer) => [layer.name, layer.index]));
    const types = moduleTypes(entry);
    const points = means.layers.flatMap((name, l) => {
      if (!shown.selection.keeps(name, types.get(name))) return [];
      const index = indexOf.get(name) ?? l;
      return [{name, index, depth: layerDepth(entry, index), value: row[l]}];
    });
    return withStderr(entry, {...base(entry), step, points});
  }

  /** A profile series with each point's standard error `se` and the run's `shards`, when the layer means
   *  carry standard errors at the series' step; else the series as it is. */
  function withStderr(entry, series) {
    const means = meansOf(entry);
    const stderr = means && means.stderr;
    const s = stderr ? stderr.steps.indexOf(series.step) : -1;
    if (s < 0) return series;
    const column = new Map(means.layers.map((name, l) => [name, l]));
    const row = stderr.values[s];
    const points = series.points.map((p) => (column.has(p.name) ? {...p, se: row[column.get(p.name)]} : p));
    return {...series, points, shards: stderr.shards};
  }

  function accuracySeries(entry) {
    const record = store.accuracy(entry);
    const accuracy = record.done && !record.error ? record.value : null;
    if (!accuracy || accuracy.steps.length === 0) return null;
    const step = state.step === null ? accuracy.steps.at(-1) : stepAtOrBefore(accuracy.steps, state.step);
    return {...base(entry), step, labels: accuracy.labels, values: accuracy.values[accuracy.steps.indexOf(step)]};
  }

  function descriptions(entries) {
    const found = new Map();
    for (const entry of entries) {
      const record = store.config(entry);
      for (const measure of (record.done && record.value && record.value.measures) || []) {
        if (!found.has(measure.name)) found.set(measure.name, measure.description);
      }
    }
    return found;
  }

  /** The measure's color scale for every view: its natural range, or the range of the layer means and the
   *  unit snapshots already loaded for the selected runs (scales.measureScale), or the locked range. */
  function currentScale(entries) {
    const keys = entries.filter((entry) => entry.measures.includes(state.measure)).map(runKey);
    const means = entries.map(meansOf).filter(Boolean).map((payload) => summarized(payload, (m) => m.values));
    shown.scale = measureScale({
      measure: state.measure, log: state.log, lock: state.lock, summaries: {means, units: ranges.summaries(keys, state.measure)},
    });
    return shown.scale;
  }

  /** How many of the selected runs' layers the layer filter shows: {shown, total}. */
  function layerCounts(entries) {
    const layers = new Map(entries.flatMap((entry) => entry.layers.map((layer) => [layer.name, layer.moduleType])));
    return {shown: [...layers].filter(([name, type]) => shown.selection.keeps(name, type)).length, total: layers.size};
  }

  function renderStepViews(entries, width, steps, panels, scale) {
    const shownStep = state.step === null ? steps.at(-1) : stepAtOrBefore(steps, state.step);
    const stepText = shownStep === undefined || shownStep === null ? "" : ` \u00b7 step ${shownStep}`;
    const withUnits = panels.filter((panel) => panel.units);
    const grid = gridLayout(width, panels.length,
      Math.max(1, ...withUnits.map((panel) => panel.units.layers.length)),
      Math.max(1, ...withUnits.flatMap((panel) => panel.units.layers.map((layer) => layer.values.length))));
    const ref = referenceOf(entries);
    const against = ref ? ` \u2212 ${ref.label}` : "";
    view.unitsNote.textContent = `${state.measure}${against}${stepText}`;
    if (ref) {
      const differences = differencePanels(entries, panels, ref);
      const differenceOnly = differences.filter((panel) => panel.units).map((panel) => panel.units);
      const divergent = differenceScale(differenceOnly, state.measure, ref.label);
      renderDifferenceLegend(view.unitsLegend, divergent, `${state.measure}${against}`);
      heatmaps.render(differences, {grid, scale: divergent, measure: `${state.measure}${against}`});
    } else {
      renderLegend(view.unitsLegend, {scale, label: state.measure, special: true});
      heatmaps.render(panels, {grid, scale, measure: state.measure});
    }

    view.profileNote.textContent = `${ref ? state.measure : `mean ${state.measure}`} per layer${against}${stepText}`;
    const profiles = entries.map((entry, i) => profileSeries(entry, panels[i].stale ? null : panels[i].units));
    Object.assign(shown, {panels, profiles, step: shownStep});
    profile.render(ref ? differenceProfiles(entries, profiles, ref) : profiles,
      {xAxis: state.xAxis, measure: state.measure, width, difference: ref && {label: ref.label}});

    renderPerTransformation(entries, width);

    view.accuracyNote.textContent = stepText;
    renderAccuracy(view.accuracyChart, entries.map(accuracySeries).filter(Boolean), {width, tooltip});
  }

  /** ie_t / ee_t of the selected runs that log them, at the chosen step (their last at or before it). */
  function renderPerTransformation(entries, width) {
    const measure = perTransformation.measure();
    const logged = entries.filter((entry) => (entry.perTransformation || []).length);
    view.perTransformationSection.hidden = logged.length === 0;
    if (!logged.length) {
      shown.perTransformation = {measure, runs: []};
      return;
    }
    const items = logged.map((entry) => {
      if (!entry.perTransformation.includes(measure)) return {...base(entry), shards: 0, record: null};
      const latest = store.perTransformation(entry, measure, null);
      let record = latest;
      if (state.step !== null && latest.done && latest.value) {
        const step = stepAtOrBefore(latest.value.steps, state.step);
        if (step !== null && step !== undefined && step !== latest.value.step) record = store.perTransformation(entry, measure, step);
      }
      const means = entry.measures.includes(state.measure) ? store.layerMeans(entry, state.measure) : null; // its shard count
      const shards = means && means.done && means.value && means.value.stderr ? means.value.stderr.shards : 0;
      return {...base(entry), shards, record};
    });
    view.perTransformationNote.textContent = measure;
    shown.perTransformation = {measure, runs: items.flatMap((item) => (item.record && item.record.done && !item.record.error && item.record.value
      ? [{entry: item.entry, data: item.record.value}] : []))};
    perTransformation.render(items, {width: Math.min(width, MAX_CHART_WIDTH)});
  }

  // -- the difference view: every run minus the reference run ---------------------------------------------
  /** The reference run among the selected entries: {key, entry, label, index}, or null (no difference view). */
  function referenceOf(entries) {
    const key = activeReference(state);
    const index = key === null ? -1 : entries.findIndex((entry) => runKey(entry) === key);
    return index < 0 ? null : {key, entry: entries[index], label: runLabel(entries[index]), index};
  }

  /** The unit heatmaps' panels minus the reference's units (a message where they cannot be differenced). */
  function differencePanels(entries, panels, ref) {
    const reference = panels[ref.index];
    return panels.map((panel, i) => {
      if (i === ref.index) return {...panel, units: null, stale: false, message: "The reference run: the other heatmaps show their difference to it."};
      if (!panel.units) return panel;
      const other = `${ref.label} has other layers or unit counts (another architecture): its units cannot be matched one to one, `
        + "so there is no difference heatmap; the layer profile and the curves compare the two by depth %.";
      if (!sameArchitecture(entries[i], ref.entry, state.measure)) return {...panel, units: null, stale: false, message: other};
      if (!reference.units) {
        const why = reference.message ? `nothing to compare with: ${reference.message}` : "waiting for its units\u2026";
        return {...panel, units: null, stale: false, message: `Difference to ${ref.label}: ${why}`};
      }
      const units = differenceUnits(panel.units, reference.units);
      if (!units) return {...panel, units: null, stale: false, message: other};
      return {...panel, units, stale: panel.stale || reference.stale, note: `${panel.note} \u2212 ${ref.label} step ${reference.units.step}`};
    });
  }

  /** The profiles of the runs other than the reference minus the reference's. */
  function differenceProfiles(entries, profiles, ref) {
    const reference = profiles[ref.index];
    if (!reference.points.length) return [];
    return profiles.flatMap((series, i) => (i === ref.index || !series.points.length ? []
      : [differenceProfile(series, reference, sameArchitecture(entries[i], ref.entry, state.measure))]));
  }

  /** The curves' runs: each run's layer means minus the reference's; the reference itself says so. */
  function differenceRuns(entries, runs, ref) {
    const reference = runs[ref.index];
    const depths = (entry) => {
      const indexOf = new Map(entry.layers.map((layer) => [layer.name, layer.index]));
      return (name) => layerDepth(entry, indexOf.get(name) ?? 0);
    };
    return runs.map((run, i) => {
      if (i === ref.index) return {...run, message: "The reference run: the other charts show their difference to it."};
      if (!ref.entry.measures.includes(state.measure)) return {...run, message: `${ref.label} has no ${state.measure} to compare with.`};
      if (!run.means || !reference.means) return {...run, means: null};
      const same = sameArchitecture(entries[i], ref.entry, state.measure);
      return {...run, means: differenceMeans(run.means, reference.means, {same, depthOf: depths(entries[i]), referenceDepthOf: depths(ref.entry)})};
    });
  }

  /** The unit history alone, of the selected runs at the tab's width. */
  function redrawUnitHistory() {
    renderUnitHistory(selectedEntries(state), Math.max(contentWidth, MIN_CHART_WIDTH));
  }

  /** The unit clicked in a heatmap, during training, in every selected run that has it. */
  function renderUnitHistory(entries, width) {
    const runs = !selectedUnit ? [] : entries.map((entry) => {
      const {layer, unit} = selectedUnit;
      const info = entry.layers.find((item) => item.name === layer);
      const has = entry.measures.includes(state.measure) && ((entry.measureLayers || {})[state.measure] || []).includes(layer)
        && info && unit < info.numUnits;
      return {...base(entry), absent: has ? "" : `has no layer ${layer} with a unit ${unit} (${state.measure})`,
        record: has ? store.unitHistory(entry, state.measure, layer, unit) : null};
    });
    shown.unitHistory = {selection: selectedUnit, runs: runs.flatMap((run) => (run.record && run.record.done && !run.record.error && run.record.value
      ? [{entry: run.entry, history: run.record.value}] : []))};
    unitHistory.render(selectedUnit, runs, {width: Math.min(width, MAX_CHART_WIDTH + 200), measure: state.measure,
      smoothing: state.smoothing, log: state.logY});
    unitHistory.showStep(state.step);
  }

  function renderTrainingViews(entries, width, scale) {
    const runs = entries.map((entry) => ({...base(entry), means: selectMeans(meansOf(entry), entry, shown.selection)}));
    shown.runs = runs;
    const smallWidth = chartWidth(width, runs.length);
    renderLegend(view.trainingLegend, {scale, label: `mean ${state.measure}`}); // redrawn only when it changed
    if (changed(memo, "training", [state.measure, smallWidth, scale.min, scale.max, scale.log,
      ...runs.flatMap((run) => [run.key, run.means, run.color])])) {
      training.render(runs, {width: smallWidth, scale, measure: state.measure});
    }
    const ref = referenceOf(entries);
    const curveRuns = ref ? differenceRuns(entries, runs, ref) : runs;
    if (changed(memo, "curves", [state.measure, smallWidth, state.smoothing, state.logY, ref && ref.key,
      ...curveRuns.flatMap((run) => [run.key, run.means, run.color, run.message])])) {
      curves.render(curveRuns, {width: smallWidth, measure: state.measure, smoothing: state.smoothing, log: state.logY && !ref,
        difference: ref && {label: ref.label}});
    }
    curves.showStep(state.step);
    training.showStep(state.step);
    const accuracyRuns = entries.map((entry) => {
      const record = store.accuracy(entry);
      return {...base(entry), accuracy: record.done && !record.error ? record.value : null};
    });
    view.accuracyLegend.hidden = !accuracyRuns.some((run) => run.accuracy && run.accuracy.steps.length);
    if (!view.accuracyLegend.hidden) renderLegend(view.accuracyLegend, {scale: measureScale({measure: "accuracy"}), label: "top-1 accuracy"});
    shown.accuracyRuns = accuracyRuns.filter((run) => run.accuracy && run.accuracy.steps.length);
    accuracyTraining.render(accuracyRuns, {width: smallWidth});
    accuracyTraining.showStep(state.step);
  }

  function renderConfigView(entries) {
    const items = entries.map((entry) => ({...base(entry), record: store.config(entry)}));
    if (changed(memo, "config", items.flatMap((item) => [item.key, item.record, item.record.done]))) {
      renderConfig(view.configPanels, items);
    }
  }

  function render() {
    assignRunColors(state, tensorBoardRuns, document.body.classList.contains("tm-dark")); // TensorBoard's run colors
    const entries = selectedEntries(state);
    shown.selection = layerSelection(state);
    const panels = entries.map(unitsPanel); // also records the unit snapshots' value ranges
    const scale = currentScale(entries);
    const steps = unionSteps(entries.map((entry) => store.unitSteps(entry)).filter(Boolean));
    controls.update(state, {
      steps, descriptions: descriptions(entries), scale, layers: layerCounts(entries), filterError: shown.selection.error,
    });
    referenceControl.update(state, entries);
    curveControls.update(state, {difference: activeReference(state) !== null});
    const empty = catalogLoaded && state.catalog.length === 0;
    view.toolbar.hidden = empty;
    view.content.hidden = empty;
    view.empty.hidden = !empty;
    if (empty) {
      renderEmptyState(view.empty);
      return;
    }
    const width = Math.max(contentWidth, MIN_CHART_WIDTH);
    renderStepViews(entries, width, steps, panels, scale);
    renderUnitHistory(entries, width);
    renderTrainingViews(entries, width, scale);
    renderConfigView(entries);
  }

  async function refreshCatalog() {
    const request = ++catalogRequest;
    try {
      const [catalog, order] = await Promise.all([fetchRuns(), fetchTensorBoardRuns()]);
      if (request !== catalogRequest) return;
      tensorBoardRuns = order;
      setCatalog(state, catalog);
      catalogLoaded = true;
      view.status.textContent = "";
    } catch (error) {
      view.status.textContent = `Could not load the runs: ${error.message}`;
    }
    scheduleRender();
  }

  await stylesheet;
  // The width is read on resize only: reading it in render would force a layout of the whole page.
  contentWidth = view.content.clientWidth;
  new ResizeObserver(([entry]) => {
    if (entry.contentRect.width !== contentWidth && entry.contentRect.width > 0) {
      contentWidth = entry.contentRect.width;
      scheduleRender();
    }
  }).observe(view.content);
  listenForReloads(refreshCatalog);
  await refreshCatalog();
}
