// Run colors as TensorBoard gives them: it colors the runs of its run list (data/runs: by start time, then
// name, every run of the logdir whatever its data) with its palette in that order, again from the start
// after the last color, light or dark with its theme. The tab does the same, so a run has the color here
// that it has in TensorBoard's other dashboards; every namespace of a run shares the run's color.
import {runColor} from "./colors.js";
import {runKey} from "./state.js";

/**
 * Sets the color of every run of the catalog in state.colors. order: TensorBoard's run names in its
 * order, or null when unknown (then the catalog's order); runs it does not list (yet) come after it, in
 * catalog order. Returns whether a color changed.
 */
export function assignRunColors(state, order, dark) {
  const position = new Map((order || []).map((name, i) => [name, i]));
  const later = new Map();
  let changed = false;
  for (const entry of state.catalog) {
    let n = position.get(entry.run);
    if (n === undefined) {
      if (!later.has(entry.run)) later.set(entry.run, position.size + later.size);
      n = later.get(entry.run);
    }
    const color = runColor(n, dark);
    if (state.colors.get(runKey(entry)) !== color) {
      state.colors.set(runKey(entry), color);
      changed = true;
    }
  }
  return changed;
}
