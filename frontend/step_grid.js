// A row × step grid painted on a canvas (layers or transformations over training), and its step ticks.
import {pixelColors} from "./colors.js";

/** Paints `values` ([steps][rows]) on `canvas`, one column per step and one band per row, at `ratio`
 *  device pixels per CSS pixel (the screen's, or more for a print-resolution export). */
export function paintStepGrid(canvas, values, rows, scale, width, height, ratio = window.devicePixelRatio || 1) {
  const w = Math.round(width * ratio);
  const h = Math.round(height * ratio);
  canvas.width = w;
  canvas.height = h;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  const pixels = new Uint32Array(image.data.buffer);
  const pixelColor = pixelColors(scale);
  const steps = values.length;
  for (let px = 0; px < w; px++) {
    const column = values[Math.min(Math.floor(((px + 0.5) / w) * steps), steps - 1)];
    for (let r = 0; r < rows; r++) {
      const color = pixelColor(column[r]);
      for (let py = Math.round((r * h) / rows); py < Math.round(((r + 1) * h) / rows); py++) pixels[py * w + px] = color;
    }
  }
  context.putImageData(image, 0, 0);
}

/** [x, label] of at most one tick per 70 px along `width` for the grid's `steps`. */
export function stepTicks(steps, width) {
  const count = Math.min(steps.length, Math.max(2, Math.floor(width / 70)));
  const indices = [...new Set(Array.from({length: count}, (_, i) => Math.round((i * (steps.length - 1)) / Math.max(count - 1, 1))))];
  return indices.map((i) => [((i + 0.5) / steps.length) * width, String(steps[i])]);
}
