// The toolbar: run selector (with run colors), measure selector, step slider and x-axis toggle.
import {html} from "./plot.js";
import {availableMeasures, colorOf, runKey, runLabel, stepAtOrBefore} from "./state.js";

function field(label, ...children) {
  const group = html("div", "tm-field");
  group.append(html("span", "tm-field-label", label), ...children);
  return group;
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
 * for "latest"), onXAxis("layer" | "depth")}. Returns {update(state, {steps, descriptions})}.
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
  container.replaceChildren(
    field("Runs", runList),
    field("Measure", measureBox),
    field("Step", stepBox),
    field("Layer axis", axisToggle),
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

  function updateRuns(state) {
    const signature = JSON.stringify(state.catalog.map(runKey));
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

  return {
    /** Shows `state`; steps: the sorted steps the slider snaps to; descriptions: Map measure -> text. */
    update(state, {steps: unionOfSteps, descriptions}) {
      updateRuns(state);
      updateMeasure(state, descriptions);
      updateStep(state, unionOfSteps);
      for (const input of axisToggle.querySelectorAll("input")) input.checked = input.value === state.xAxis;
    },
  };
}
