// The controls of the charts over training (layer means during training, a unit during training), as
// TensorBoard's scalar dashboard has them: its smoothing slider (same range, same default) and a log y axis.
import {html} from "./plot.js";
import {MAX_SMOOTHING} from "./smoothing.js";

/**
 * Builds the controls into `container`. handlers: {onSmoothing(weight), onLogY(log)}. Returns
 * {update(state, {difference})}: difference, whether the difference view is on (no log axis then).
 */
export function createCurveControls(container, {onSmoothing, onLogY}) {
  const box = html("div", "tm-curve-controls");
  const smoothingLabel = html("label", "tm-curve-control", "Smoothing");
  const slider = html("input");
  slider.type = "range";
  slider.id = "tm-smoothing";
  slider.min = "0";
  slider.max = String(MAX_SMOOTHING);
  slider.step = "0.001";
  slider.title = "TensorBoard's smoothing: an exponential moving average of each curve, debiased at its start "
    + "(the raw curves stay visible, faint).";
  const value = html("output", "tm-smoothing-value");
  value.id = "tm-smoothing-value";
  smoothingLabel.append(slider, value);
  const logLabel = html("label", "tm-radio tm-curve-control");
  const log = html("input");
  log.type = "checkbox";
  log.id = "tm-log-y";
  logLabel.append(log, html("span", "", "log y axis"));
  box.append(smoothingLabel, logLabel);
  container.append(box);
  slider.addEventListener("input", () => onSmoothing(Number(slider.value)));
  log.addEventListener("change", () => onLogY(log.checked));
  return {
    update(state, {difference = false} = {}) {
      if (document.activeElement !== slider) slider.value = String(state.smoothing);
      value.textContent = state.smoothing.toFixed(3).replace(/\.?0+$/, "") || "0";
      log.checked = state.logY && !difference;
      log.disabled = difference;
      logLabel.title = difference ? "Differences are signed: their axis is linear." : "Log10 y axis over the positive values.";
    },
  };
}
