// TensorBoard's smoothing of scalar curves, with its slider's range and default, for the curves over
// training. The formula is TensorBoard's own (2.21: the line chart's classicSmoothing, also the older
// scalar dashboard's resmoothDataset): an exponential moving average started at 0 and debiased, so early
// points are not pulled towards 0; non-finite points are left as they are and not averaged in; a
// constant series is left as it is.

/** TensorBoard's default smoothing weight and its slider's upper end. */
export const DEFAULT_SMOOTHING = 0.6;
export const MAX_SMOOTHING = 0.999;

/** `values` (an array of numbers) smoothed with `weight` in [0, 1], as TensorBoard smooths a curve. */
export function smooth(values, weight) {
  let w = Number.isFinite(weight) ? weight : 0;
  w = Math.max(0, Math.min(w, 1));
  const out = new Float64Array(values.length);
  const first = values[0];
  let constant = true;
  for (let i = 0; i < values.length; i++) {
    // TensorBoard compares with ==: a NaN makes a series not constant
    if (values[i] != first) {
      constant = false;
      break;
    }
  }
  let last = values.length > 0 ? 0 : NaN;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (constant || !Number.isFinite(v)) {
      out[i] = v;
      continue;
    }
    last = last * w + (1 - w) * v;
    count += 1;
    const debias = w === 1 ? 1 : 1 - w ** count;
    out[i] = last / debias;
  }
  return out;
}

const smoothed = new WeakMap(); // rows -> Map(weight -> smoothed rows)

/**
 * Each column of `rows` (one array per step, one value per series) smoothed along the steps: the same
 * shape, one Float32Array per step. Computed once per (rows, weight); rows are returned as they are for
 * weight 0.
 */
export function smoothColumns(rows, weight) {
  if (!(weight > 0) || rows.length === 0) return rows;
  if (!smoothed.has(rows)) smoothed.set(rows, new Map());
  const cache = smoothed.get(rows);
  if (!cache.has(weight)) {
    // smooth() of every column at once, step by step (no copy of a column)
    const w = Math.min(weight, 1);
    const width = rows[0].length;
    const constant = new Uint8Array(width).fill(1);
    for (let s = 1; s < rows.length; s++) {
      for (let c = 0; c < width; c++) if (rows[s][c] != rows[0][c]) constant[c] = 0; // as smooth(): NaN is not constant
    }
    const last = new Float64Array(width);
    const count = new Uint32Array(width);
    const debias = Float64Array.from({length: rows.length + 1}, (_, k) => (w === 1 ? 1 : 1 - w ** k));
    const out = rows.map((row) => {
      const smoothedRow = new Float32Array(width);
      for (let c = 0; c < width; c++) {
        const v = row[c];
        if (constant[c] || !Number.isFinite(v)) {
          smoothedRow[c] = v;
          continue;
        }
        last[c] = last[c] * w + (1 - w) * v;
        count[c] += 1;
        smoothedRow[c] = last[c] / debias[count[c]];
      }
      return smoothedRow;
    });
    cache.set(weight, out);
  }
  return cache.get(weight);
}
