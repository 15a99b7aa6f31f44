// The Invariance tab: builds the page, owns the state, asks the store for data and hands it to the views.
// Views that depend on the step (unit heatmaps, layer profile, accuracy) redraw on every slider move from
// cached data; the others redraw only when their inputs change.
import {fetchRuns} from "./api.js";
import {renderAccuracy} from "./accuracy.js";
import {sharedScale, valueSummary} from "./colors.js";
import {renderConfig} from "./config_view.js";
import {createControls} from "./controls.js";
import {createCurves, depthLegend} from "./curves.js";
import {renderEmptyState} from "./empty_state.js";
import {createUnitHeatmaps, gridLayout} from "./heatmap.js";
import {listenForReloads} from "./host.js";
import {renderLegend} from "./legend.js";
import {html} from "./plot.js";
import {renderProfile} from "./profile.js";
import {
  colorOf, createState, layerDepth, runKey, runLabel, selectedEntries, setCatalog, stepAtOrBefore, unionSteps,
} from "./state.js";
import {createStore} from "./store.js";
import {followTheme} from "./theme.js";
import {createTooltip} from "./tooltip.js";
import {createTrainingHeatmaps} from "./training_heatmap.js";

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
    "One column per layer in network order, one cell per unit (channel), each column's units stretched to the full height. Hover a cell for details.");
  const unitsLegend = html("div", "tm-legend");
  unitsLegend.id = "tm-units-legend";
  const heatmaps = html("div", "tm-panels");
  heatmaps.id = "tm-heatmaps";
  units.element.append(unitsLegend, heatmaps);

  const profile = section("tm-profile-section", "Layer profile", "Mean over each layer's finite units, one line per run.");
  const profileChart = html("div");
  profileChart.id = "tm-profile";
  profile.element.append(profileChart);

  const accuracy = section("tm-accuracy-section", "Accuracy per transformation");
  const accuracyChart = html("div");
  accuracyChart.id = "tm-accuracy";
  accuracy.element.append(accuracyChart);

  const curves = section("tm-curves-section", "Layer means during training", "One line per layer, colored by depth.");
  const curvesLegend = html("div", "tm-legend");
  curvesLegend.append(depthLegend());
  const curvesPanels = html("div", "tm-panels");
  curvesPanels.id = "tm-curves";
  curves.element.append(curvesLegend, curvesPanels);

  const training = section("tm-training-section", "Invariance during training", "Layer means: one row per layer, one column per logged step.");
  const trainingLegend = html("div", "tm-legend");
  trainingLegend.id = "tm-training-legend";
  const trainingPanels = html("div", "tm-panels");
  trainingPanels.id = "tm-training";
  training.element.append(trainingLegend, trainingPanels);

  const config = section("tm-config-section", "Configuration");
  const configPanels = html("div", "tm-panels");
  configPanels.id = "tm-config";
  config.element.append(configPanels);

  content.append(units.element, profile.element, accuracy.element, curves.element, training.element, config.element);
  app.append(toolbar, status, content, empty);
  root.append(app);
  return {
    toolbar, status, content, empty, unitsNote: units.note, unitsLegend, heatmaps, profileNote: profile.note,
    profileChart, accuracyNote: accuracy.note, accuracyChart, curvesPanels, trainingLegend, trainingPanels, configPanels,
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
  followTheme(document.body);
  const state = createState();
  const view = layout(root);
  const tooltip = createTooltip(root);
  const memo = {};
  let catalogLoaded = false;
  let contentWidth = 0;
  let catalogRequest = 0;
  let pendingFrame = null;

  // Unit snapshots of the step the slider shows: fetched at once after a pause (a click or a key moves
  // it), while it is dragged only once it rests for STEP_FETCH_DELAY_MS (not every step it passes).
  const wantedUnits = new Map();
  let unitTimer = null;
  let lastUnitFetch = -Infinity;

  const store = createStore(scheduleRender);
  const heatmaps = createUnitHeatmaps(view.heatmaps, tooltip);
  const curves = createCurves(view.curvesPanels, tooltip);
  const training = createTrainingHeatmaps(view.trainingPanels, tooltip);
  const controls = createControls(view.toolbar, {
    onRuns(keys) {
      state.selected = new Set(keys);
      render();
    },
    onMeasure(measure) {
      state.measure = measure;
      render();
    },
    onStep(step) {
      state.step = step;
      if (unitTimer !== null) {
        clearTimeout(unitTimer);
        unitTimer = setTimeout(fetchWantedUnits, STEP_FETCH_DELAY_MS);
      }
      render();
    },
    onXAxis(xAxis) {
      state.xAxis = xAxis;
      render();
    },
  });

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
      return {...panel, units: record.value, note: `step ${record.value.step}`};
    }
    const last = store.lastUnits(entry, state.measure);
    return {...panel, units: last || null, stale: Boolean(last), note: "loading\u2026"};
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
        name: layer.name, index: layer.index, depth: layerDepth(entry, layer.index), value: layer.mean,
      }));
      return {...base(entry), step: units.step, points};
    }
    const means = meansOf(entry);
    if (!means || means.steps.length === 0) return {...base(entry), step: null, points: []};
    const step = state.step === null ? means.steps.at(-1) : stepAtOrBefore(means.steps, state.step);
    const row = means.values[means.steps.indexOf(step)];
    const indexOf = new Map(entry.layers.map((layer) => [layer.name, layer.index]));
    const points = means.layers.map((name, l) => {
      const index = indexOf.get(name) ?? l;
      return {name, index, depth: layerDepth(entry, index), value: row[l]};
    });
    return {...base(entry), step, points};
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

  function renderStepViews(entries, width, steps) {
    const shownStep = state.step === null ? steps.at(-1) : stepAtOrBefore(steps, state.step);
    const stepText = shownStep === undefined || shownStep === null ? "" : ` \u00b7 step ${shownStep}`;
    const panels = entries.map(unitsPanel);
    const withUnits = panels.filter((panel) => panel.units);
    const scale = sharedScale(withUnits.map((panel) => summarized(panel.units, liveUnitValues)));
    const grid = gridLayout(width, panels.length,
      Math.max(1, ...withUnits.map((panel) => panel.units.layers.length)),
      Math.max(1, ...withUnits.flatMap((panel) => panel.units.layers.map((layer) => layer.values.length))));
    view.unitsNote.textContent = `${state.measure}${stepText}`;
    renderLegend(view.unitsLegend, {scale, label: state.measure, special: true});
    heatmaps.render(panels, {grid, scale, measure: state.measure});

    view.profileNote.textContent = `mean ${state.measure} per layer${stepText}`;
    const profiles = entries.map((entry, i) => profileSeries(entry, panels[i].stale ? null : panels[i].units));
    renderProfile(view.profileChart, profiles, {xAxis: state.xAxis, measure: state.measure, width, tooltip});

    view.accuracyNote.textContent = stepText;
    renderAccuracy(view.accuracyChart, entries.map(accuracySeries).filter(Boolean), {width, tooltip});
  }

  function renderTrainingViews(entries, width) {
    const runs = entries.map((entry) => ({...base(entry), means: meansOf(entry)}));
    const smallWidth = chartWidth(width, runs.length);
    if (changed(memo, "training", [state.measure, smallWidth, ...runs.flatMap((run) => [run.key, run.means])])) {
      const withMeans = runs.filter((run) => run.means);
      const scale = sharedScale(withMeans.map((run) => summarized(run.means, (means) => means.values)));
      renderLegend(view.trainingLegend, {scale, label: `mean ${state.measure}`});
      curves.render(runs, {width: smallWidth, measure: state.measure});
      training.render(runs, {width: smallWidth, scale, measure: state.measure});
    }
    curves.showStep(state.step);
    training.showStep(state.step);
  }

  function renderConfigView(entries) {
    const items = entries.map((entry) => ({...base(entry), record: store.config(entry)}));
    if (changed(memo, "config", items.flatMap((item) => [item.key, item.record, item.record.done]))) {
      renderConfig(view.configPanels, items);
    }
  }

  function render() {
    const entries = selectedEntries(state);
    const steps = unionSteps(entries.map((entry) => store.unitSteps(entry)).filter(Boolean));
    controls.update(state, {steps, descriptions: descriptions(entries)});
    const empty = catalogLoaded && state.catalog.length === 0;
    view.toolbar.hidden = empty;
    view.content.hidden = empty;
    view.empty.hidden = !empty;
    if (empty) {
      renderEmptyState(view.empty);
      return;
    }
    const width = Math.max(contentWidth, MIN_CHART_WIDTH);
    renderStepViews(entries, width, steps);
    renderTrainingViews(entries, width);
    renderConfigView(entries);
  }

  async function refreshCatalog() {
    const request = ++catalogRequest;
    try {
      const catalog = await fetchRuns();
      if (request !== catalogRequest) return;
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
