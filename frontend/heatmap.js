// Unit heatmaps, one per selected run, side by side: one column per layer in network order, one cell per
// unit (channel), each column's units stretched to the full height, on a canvas; under each column the
// layer's full name and module type, rotated (every column's where they fit, else every n-th).
import {pixelColors} from "./colors.js";
import {textWidth} from "./layers.js";
import {outsideScaleNote} from "./scales.js";
import {deadUnitsText, nonFiniteText} from "./layer_stats.js";
import {formatValue, html, svg, svgText, svgTitle} from "./plot.js";

const MIN_HEIGHT = 200;
const MAX_HEIGHT = 512;
const MIN_COLUMN = 4;
const READABLE_COLUMN = 8;
const MAX_COLUMN = 28;
const PANEL_CHROME = 24;
const LABEL_SPACING = 13;
const TICK_FONT = 11;

/**
 * The shared layout of the heatmaps: column width and height (CSS pixels) chosen so that `panels`
 * heatmaps of up to `maxLayers` columns fit side by side in `width` (wrapping when they cannot).
 */
export function gridLayout(width, panels, maxLayers, maxUnits) {
  const height = Math.min(Math.max(maxUnits, MIN_HEIGHT), MAX_HEIGHT);
  let columnWidth = MIN_COLUMN;
  for (let perRow = Math.max(panels, 1); perRow >= 1; perRow--) {
    const fit = Math.floor((width / perRow - PANEL_CHROME) / Math.max(maxLayers, 1));
    if (fit >= READABLE_COLUMN || perRow === 1) {
      columnWidth = Math.min(Math.max(fit, MIN_COLUMN), MAX_COLUMN);
      break;
    }
  }
  return {columnWidth, height};
}

/** One heatmap's layout: the grid's column width and height with this run's unit count per column. */
function heatmapLayout({columnWidth, height}, counts) {
  return {columnWidth, height, counts, gap: columnWidth >= 5 ? 1 : 0, width: columnWidth * counts.length};
}

/** The CSS-pixel rectangle {x, y, width, height} of unit `unit` in column `layer`. */
export function cellRect(layout, layer, unit) {
  const rows = layout.height / layout.counts[layer];
  return {x: layer * layout.columnWidth, y: unit * rows, width: layout.columnWidth - layout.gap, height: rows};
}

/** The [layer, unit] under the CSS-pixel point (x, y), or null between columns or outside. */
function cellAt(layout, x, y) {
  const layer = Math.floor(x / layout.columnWidth);
  if (layer < 0 || layer >= layout.counts.length || y < 0 || y >= layout.height) return null;
  if (x - layer * layout.columnWidth >= layout.columnWidth - layout.gap) return null;
  const unit = Math.min(Math.floor((y / layout.height) * layout.counts[layer]), layout.counts[layer] - 1);
  return [layer, unit];
}

// One pixel per unit (column l, row u) on a scratch canvas, scaled into each heatmap column with
// nearest-neighbor sampling. The unit pixels of a payload are kept for the scale they were made with,
// so returning to a step already seen only blits.
const unitPixels = new WeakMap();
const scratch = document.createElement("canvas");

function unitImage(layers, counts, scale) {
  const cached = unitPixels.get(layers);
  if (cached && cached.min === scale.min && cached.max === scale.max && cached.log === scale.log) return cached.image;
  const image = new ImageData(layers.length, Math.max(...counts));
  const pixels = new Uint32Array(image.data.buffer);
  const pixelColor = pixelColors(scale);
  layers.forEach((layer, l) => {
    for (let u = 0; u < layer.values.length; u++) pixels[u * layers.length + l] = pixelColor(layer.values[u], layer.dead.has(u));
  });
  unitPixels.set(layers, {min: scale.min, max: scale.max, log: scale.log, image});
  return image;
}

/** Paints the heatmap on `canvas` at `ratio` device pixels per CSS pixel (the screen's, or more for a
 *  print-resolution export). */
function paint(canvas, layout, layers, scale, ratio = window.devicePixelRatio || 1) {
  const height = Math.round(layout.height * ratio);
  canvas.width = Math.round(layout.width * ratio);
  canvas.height = height;
  canvas.style.width = `${layout.width}px`;
  canvas.style.height = `${layout.height}px`;
  const image = unitImage(layers, layout.counts, scale);
  scratch.width = image.width;
  scratch.height = image.height;
  scratch.getContext("2d").putImageData(image, 0, 0);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  layers.forEach((layer, l) => {
    const rect = cellRect(layout, l, 0);
    const x0 = Math.round(rect.x * ratio);
    context.drawImage(scratch, l, 0, 1, layer.values.length, x0, 0, Math.round((rect.x + rect.width) * ratio) - x0, height);
  });
}

/** The layer axis under the columns: each shown layer's full name and module type, rotated to read
 *  upwards; every column's when columns are at least a line high, else every n-th. The axis is as tall
 *  as the longest label. */
function drawLayerAxis(axis, layout, layers) {
  const every = Math.max(1, Math.ceil(LABEL_SPACING / layout.columnWidth));
  const shown = layers.filter((_, l) => l % every === 0);
  const height = Math.ceil(Math.max(0, ...shown.map((layer) => textWidth(`${layer.name} ${layer.moduleType || ""}`, TICK_FONT)))) + 10;
  axis.replaceChildren();
  axis.setAttribute("width", layout.width);
  axis.setAttribute("height", height);
  layers.forEach((layer, l) => {
    if (l % every !== 0) return;
    const x = (l + 0.5) * layout.columnWidth;
    const label = svgText(layer.name, {class: "tm-tick tm-layer-label", "text-anchor": "end", "dominant-baseline": "middle",
      transform: `translate(${x},4) rotate(-90)`});
    if (layer.moduleType) {
      const type = svg("tspan", {class: "tm-module-type"});
      type.textContent = ` ${layer.moduleType}`;
      label.append(type);
    }
    label.append(svgTitle(`${layer.name} (${layer.moduleType})`));
    label.dataset.layer = layer.name;
    axis.append(label);
  });
}

function tooltipLines(data, layer, unit, value, measure) {
  const dead = layer.dead.has(unit);
  return [
    [data.label, "tm-tooltip-title"],
    `layer ${layer.name} (${layer.moduleType})`,
    `unit ${unit} of ${layer.values.length}`,
    dead ? `${measure} = ${formatValue(value)}, dead unit (no variance)` : `${measure} = ${formatValue(value)}${outsideScaleNote(value, data.scale)}`,
    `step ${data.units.step}`,
    ...(data.scale.diverging ? [] : [deadUnitsText(layer, data.units.meansIncludeDead), nonFiniteText(layer)].filter(Boolean)),
    ["click: this unit during training", "tm-tooltip-hint"],
  ];
}

function createPanel(tooltip, handlers) {
  const figure = html("figure", "tm-panel");
  const caption = html("figcaption", "tm-panel-title");
  const swatch = html("span", "tm-swatch");
  const name = html("span", "tm-run-name");
  const note = html("span", "tm-muted");
  caption.append(swatch, name, note);
  const canvas = html("canvas", "tm-heatmap");
  const message = html("div", "tm-message");
  const axis = svg("svg", {class: "tm-heatmap-axis"});
  const outline = html("div", "tm-column-highlight"); // the highlighted layer's column (linked views)
  outline.hidden = true;
  figure.classList.add("tm-heatmap-panel");
  figure.append(caption, canvas, outline, axis, message);
  const panel = {figure, swatch, name, note, canvas, message, axis, outline, drawn: null, axisSignature: "", layout: null, data: null};

  canvas.addEventListener("mousemove", (event) => {
    const {layout, data} = panel;
    const cell = layout && cellAt(layout, event.offsetX, event.offsetY);
    if (!cell) {
      handlers.onLayerHover(null);
      return tooltip.hide();
    }
    const [l, unit] = cell;
    const layer = data.units.layers[l];
    handlers.onLayerHover(layer.name);
    const value = layer.values[unit];
    tooltip.show(event, tooltipLines(data, layer, unit, value, data.measure), {
      run: data.entry.run,
      namespace: data.entry.namespace,
      layer: layer.name,
      unit: String(unit),
      value: String(value),
      step: String(data.units.step),
    });
  });
  canvas.addEventListener("mouseleave", () => {
    tooltip.hide();
    handlers.onLayerHover(null);
  });
  canvas.addEventListener("click", (event) => {
    const cell = panel.layout && cellAt(panel.layout, event.offsetX, event.offsetY);
    if (cell) handlers.onCell({entry: panel.data.entry, layer: panel.data.units.layers[cell[0]].name, unit: cell[1]});
  });
  canvas.cellCenter = (layer, unit) => {
    const rect = cellRect(panel.layout, layer, unit);
    return {x: rect.x + rect.width / 2, y: rect.y + rect.height / 2};
  };
  return panel;
}

/**
 * The heatmap views in `container`; render(panels, options) shows one heatmap per panel
 * {key, entry, label, color, units, stale, note, message} and repaints only those whose data changed.
 */
export function createUnitHeatmaps(container, tooltip, handlers = {}) {
  const on = {onLayerHover: () => {}, onCell: () => {}, ...handlers}; // linked views (app.js)
  const panels = new Map();
  let highlighted = null;

  /** Outlines layer `name`'s column in the panel (hidden when it has no such layer). */
  function outlineColumn(panel) {
    const l = highlighted === null || !panel.layout || panel.canvas.hidden ? -1
      : panel.data.units.layers.findIndex((layer) => layer.name === highlighted);
    panel.outline.hidden = l < 0;
    if (l < 0) return;
    const rect = cellRect(panel.layout, l, 0);
    Object.assign(panel.outline.style, {left: `${panel.canvas.offsetLeft + rect.x}px`, top: `${panel.canvas.offsetTop}px`,
      width: `${rect.width}px`, height: `${panel.layout.height}px`});
  }

  function update(panel, data, options) {
    const {units} = data;
    panel.swatch.style.background = data.color;
    panel.name.textContent = data.label;
    panel.note.textContent = data.note;
    const empty = Boolean(units) && units.layers.length === 0; // the layer filter left no layer
    panel.message.textContent = data.message || (empty ? "No layer of this run passes the layer filter." : "");
    panel.canvas.hidden = !units || empty;
    panel.axis.toggleAttribute("hidden", !units || empty); // an SVG element has no .hidden
    panel.figure.classList.toggle("tm-stale", Boolean(data.stale));
    if (!units || empty) return;
    const layout = heatmapLayout(options.grid, units.layers.map((layer) => layer.values.length));
    const {scale} = options;
    const signature = [units, scale.min, scale.max, scale.log, layout.columnWidth, layout.height, window.devicePixelRatio];
    panel.layout = layout;
    panel.data = {...data, measure: options.measure, scale: options.scale};
    Object.assign(panel.canvas.dataset, {
      run: data.entry.run,
      namespace: data.entry.namespace,
      measure: options.measure,
      step: String(units.step),
      min: String(scale.min),
      max: String(scale.max),
      log: String(Boolean(scale.log)),
    });
    // the export draws the same heatmap at print resolution
    panel.canvas.tmPaintAt = (ratio) => {
      const canvas = document.createElement("canvas");
      paint(canvas, layout, units.layers, scale, ratio);
      return canvas;
    };
    if (panel.drawn && signature.every((value, i) => value === panel.drawn[i])) return;
    paint(panel.canvas, layout, units.layers, scale);
    const axisSignature = JSON.stringify([layout.columnWidth, units.layers.map((layer) => [layer.name, layer.moduleType])]);
    if (axisSignature !== panel.axisSignature) drawLayerAxis(panel.axis, layout, units.layers);
    panel.axisSignature = axisSignature;
    panel.drawn = signature;
  }

  return {
    /** Shows the panels (in order) with the shared {grid, scale, measure}. */
    render(list, options) {
      const keys = new Set(list.map((data) => data.key));
      for (const [key, panel] of panels) {
        if (!keys.has(key)) {
          panel.figure.remove();
          panels.delete(key);
        }
      }
      list.forEach((data, i) => {
        if (!panels.has(data.key)) panels.set(data.key, createPanel(tooltip, on));
        const panel = panels.get(data.key);
        update(panel, data, options);
        if (container.children[i] !== panel.figure) container.insertBefore(panel.figure, container.children[i] || null);
      });
      if (highlighted !== null) for (const panel of panels.values()) outlineColumn(panel);
    },

    /** Outlines layer `name`'s column in every heatmap (null: none). */
    highlightLayer(name) {
      highlighted = name;
      for (const panel of panels.values()) outlineColumn(panel);
    },
  };
}
