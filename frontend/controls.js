// The toolbar: run selector (with run colors), measure selector, step slider, x-axis toggle, the layer
// filter (text or /regex/, and a switch hiding activation / normalization layers) and the color scale's
// lock and log switches.
import {formatValue, html} from "./plot.js";
import {logAllowed} from "./scales.js";
import {availableMeasures, colorOf, runKey, runLabel, stepAtOrBefore} from "./state.js";

const FILTER_DELAY_MS = 150;

function field(label, ...children) {
  const group = html("div", "tm-field");
  group.append(html("span", "tm-field-label", label), ...children);
  return group;
}

function checkbox(id, text) {
  const label = html("label", "tm-radio");
  const input = html("input");
  input.type = "checkbox";
  input.id = id;
  label.append(input, html("span", "", text));
  return {label, input};
}

function radio(name, value, text) {
  const label = html("label", "tm-radio");
  const input = html("input");
  input.type = "radio";
  input.name = name;
  input.value = value;
  label.append(input, html("span", "", text));
  return label;
}

/**
 * Builds the toolbar into `container`. handlers: {onRuns(keys), onMeasure(measure), onStep(step or null
 * for "latest"), onXAxis("layer" | "depth"), onLayerFilter(text), onHideActivations(hide), onLock(locked),
 * onLog(log)}. Returns {update(state, {steps, descriptions, scale, layers: {shown, total}, filterError})}.
 */
export function createControls(container, handlers) {
  const runList = html("div", "tm-run-list");
  runList.id = "tm-runs";
  const measure = html("select");
  measure.id = "tm-measure";
  const description = html("div", "tm-muted tm-description");
  const slider = html("input");
  slider.type = "range";
  slider.id = "tm-step";
  slider.min = "0";
  slider.step = "1";
  const stepLabel = html("output", "tm-step-label");
  stepLabel.id = "tm-step-value";
  const axisToggle = html("div", "tm-toggle");
  axisToggle.append(radio("tm-x-axis", "layer", "layer index"), radio("tm-x-axis", "depth", "depth %"));

  const stepBox = html("div", "tm-step-box");
  stepBox.append(slider, stepLabel);
  const measureBox = html("div");
  measureBox.append(measure, description);

  const filter = html("input", "tm-layer-filter");
  filter.type = "search";
  filter.id = "tm-layer-filter";
  filter.placeholder = "filter: text or /regex/";
  filter.spellcheck = false;
  filter.title = "Shows the layers whose name or module type contains the text (any case), or matches a regular "
    + "expression written /like this/ (flags after the last slash, e.g. /conv\\d/i); in every view.";
  const hide = checkbox("tm-hide-activations", "hide activation / normalization");
  hide.label.title = "Hides layers whose module type is an activation (ReLU, GELU, SiLU, Sigmoid, Tanh, ...), a "
    + "normalization (BatchNorm*, LayerNorm, GroupNorm, ...), Dropout or Identity, in every view.";
  const layerCount = html("span", "tm-muted tm-layer-count");
  layerCount.id = "tm-layer-count";
  const layerBox = html("div", "tm-layer-box");
  layerBox.append(filter, hide.label, layerCount);

  const lock = checkbox("tm-lock", "lock range");
  lock.label.title = "Keeps the color scale's current range for every step, run and measure view until unlocked.";
  const log = checkbox("tm-log", "log scale");
  const range = html("span", "tm-muted tm-scale-range");
  range.id = "tm-scale-range";
  const scaleBox = html("div", "tm-toggle");
  scaleBox.append(range, lock.label, log.label);

  container.replaceChildren(
    field("Runs", runList),
    field("Measure", measureBox),
    field("Step", stepBox),
    field("Layer axis", axisToggle),
    field("Layers", layerBox),
    field("Color scale", scaleBox),
  );

  let steps = [];
  let catalogSignature = "";
  let measureSignature = "";

  runList.addEventListener("change", () => {
    handlers.onRuns([...runList.querySelectorAll("input:checked")].map((input) => input.value));
  });
  measure.addEventListener("change", () => handlers.onMeasure(measure.value));
  slider.addEventListener("input", () => {
    const index = Number(slider.value);
    handlers.onStep(index >= steps.length - 1 ? null : steps[index]);
  });
  axisToggle.addEventListener("change", (event) => handlers.onXAxis(event.target.value));
  // The filter applies once typing pauses, or at once when the box loses focus (Enter, Tab, a click away).
  let filterTimer = null;
  const applyFilter = () => {
    clearTimeout(filterTimer);
    filterTimer = null;
    handlers.onLayerFilter(filter.value);
  };
  filter.addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(applyFilter, FILTER_DELAY_MS);
  });
  filter.addEventListener("change", () => {
    if (filterTimer !== null) applyFilter();
  });
  hide.input.addEventListener("change", () => handlers.onHideActivations(hide.input.checked));
  lock.input.addEventListener("change", () => handlers.onLock(lock.input.checked));
  log.input.addEventListener("change", () => handlers.onLog(log.input.checked));

  function updateRuns(state) {
    const signature = JSON.stringify(state.catalog.map((entry) => [runKey(entry), colorOf(state, entry)])); // colors: run_colors.js
    if (signature !== catalogSignature) {
      catalogSignature = signature;
      runList.replaceChildren(
        ...state.catalog.map((entry) => {
          const label = html("label", "tm-run");
          const input = html("input", "tm-run-toggle");
          input.type = "checkbox";
          input.value = runKey(entry);
          input.dataset.run = entry.run;
          input.dataset.namespace = entry.namespace;
          const swatch = html("span", "tm-swatch");
          swatch.style.background = colorOf(state, entry);
          const name = html("span", "tm-run-name", runLabel(entry));
          label.title = runLabel(entry);
          label.append(input, swatch, name);
          return label;
        }),
      );
    }
    for (const input of runList.querySelectorAll("input")) input.checked = state.selected.has(input.value);
  }

  function updateMeasure(state, descriptions) {
    const measures = availableMeasures(state);
    const signature = JSON.stringify([measures, [...descriptions]]);
    if (signature !== measureSignature) {
      measureSignature = signature;
      measure.replaceChildren(
        ...measures.map((name) => {
          const option = html("option", "", name);
          option.value = name;
          option.title = descriptions.get(name) || "";
          return option;
        }),
      );
    }
    measure.value = state.measure;
    measure.title = descriptions.get(state.measure) || "";
    description.textContent = descriptions.get(state.measure) || "";
  }

  function updateStep(state, unionOfSteps) {
    steps = unionOfSteps;
    const shown = state.step === null ? steps.at(-1) : stepAtOrBefore(steps, state.step);
    slider.max = String(Math.max(steps.length - 1, 0));
    slider.value = String(Math.max(steps.indexOf(shown), 0));
    slider.disabled = steps.length < 2;
    slider.dataset.step = shown === undefined || shown === null ? "" : String(shown);
    stepLabel.textContent = steps.length ? `step ${shown}${state.step === null ? " (latest)" : ""}` : "no steps yet";
  }

  function updateLayers(state, layers, filterError) {
    if (document.activeElement !== filter && filterTimer === null && filter.value !== state.layerFilter) filter.value = state.layerFilter;
    filter.classList.toggle("tm-invalid", Boolean(filterError));
    filter.setCustomValidity(filterError || "");
    hide.input.checked = state.hideActivations;
    layerCount.textContent = layers && layers.total ? `${layers.shown} of ${layers.total} layers` : "";
    layerCount.title = filterError || "";
  }

  function updateScale(state, scale) {
    lock.input.checked = Boolean(state.lock);
    log.input.checked = Boolean(scale ? scale.log : state.log);
    log.input.disabled = !logAllowed(state.measure) || Boolean(state.lock);
    log.label.title = logAllowed(state.measure)
      ? (state.lock ? "Unlock the range to switch between linear and log." : "Colors by log10 of the value.")
      : `${state.measure} has a natural range: its scale is linear.`;
    range.textContent = scale ? `${formatValue(scale.min)} \u2013 ${formatValue(scale.max)}` : "";
    range.title = scale ? scale.rule : "";
  }

  return {
    /** Shows `state`; steps: the sorted steps the slider snaps to; descriptions: Map measure -> text;
     *  scale: the measure's color scale; layers: {shown, total} of the selected runs' layers. */
    update(state, {steps: unionOfSteps, descriptions, scale = null, layers = null, filterError = ""}) {
      updateRuns(state);
      updateMeasure(state, descriptions);
      updateStep(state, unionOfSteps);
      for (const input of axisToggle.querySelectorAll("input")) input.checked = input.value === state.xAxis;
      updateLayers(state, layers, filterError);
      updateScale(state, scale);
    },
  };
}
