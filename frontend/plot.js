// Small plotting toolkit shared by the views: SVG elements, linear scales, ticks, axes and line paths.
// Text (layer names, labels) only ever goes into text nodes.

const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element with attributes (numbers and strings the code made, never user text). */
export function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

/** An SVG <text> holding `text` as a text node. */
export function svgText(text, attributes = {}) {
  const element = svg("text", attributes);
  element.textContent = text;
  return element;
}

/** An SVG <title> (the browser's hover tooltip) holding `text` as a text node. */
export function svgTitle(text) {
  const element = svg("title");
  element.textContent = text;
  return element;
}

/** An HTML element with a class and optional text content. */
export function html(tag, className = "", text = null) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== null) element.textContent = text;
  return element;
}

/** A linear map from [d0, d1] to [r0, r1] (with .invert); degenerate domains map to the middle of the range. */
export function linearScale([d0, d1], [r0, r1]) {
  const scale = (v) => (d1 === d0 ? (r0 + r1) / 2 : r0 + ((v - d0) / (d1 - d0)) * (r1 - r0));
  scale.invert = (p) => (r1 === r0 ? d0 : d0 + ((p - r0) / (r1 - r0)) * (d1 - d0));
  scale.domain = [d0, d1];
  scale.range = [r0, r1];
  return scale;
}

/** A log10 map from [d0, d1] (both > 0) to [r0, r1] (with .invert); values <= 0 map to NaN. */
export function logScale([d0, d1], [r0, r1]) {
  const [l0, l1] = [Math.log10(d0), Math.log10(d1)];
  const scale = (v) => (v > 0 ? (l1 === l0 ? (r0 + r1) / 2 : r0 + ((Math.log10(v) - l0) / (l1 - l0)) * (r1 - r0)) : NaN);
  scale.invert = (p) => 10 ** (r1 === r0 ? l0 : l0 + ((p - r0) / (r1 - r0)) * (l1 - l0));
  scale.domain = [d0, d1];
  scale.range = [r0, r1];
  scale.log = true;
  return scale;
}

/** Ticks of a log axis over [lo, hi] (lo > 0): the powers of ten, with 2 and 5 times them when there
 *  are fewer than three decades. */
export function logTicks(lo, hi) {
  const ticks = [];
  const decades = Math.log10(hi / lo);
  const multiples = decades < 3 ? [1, 2, 5] : [1];
  for (let power = Math.floor(Math.log10(lo)); power <= Math.ceil(Math.log10(hi)); power++) {
    for (const m of multiples) {
      const v = Number((m * 10 ** power).toPrecision(12));
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
    }
  }
  return ticks;
}

/** About `count` round tick values covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

/**
 * Ticks for [lo, hi] and the domain they span: the ticks' step extended to whole steps past lo and hi, so
 * that the domain stays the same while the data moves within a step (charts sharing it need no redraw).
 */
export function niceDomain(lo, hi, count = 5) {
  const ticks = niceTicks(lo, hi, count);
  if (ticks.length < 2) return {domain: [lo, hi], ticks};
  const step = ticks[1] - ticks[0];
  const domain = [Math.floor(lo / step + 1e-9) * step, Math.ceil(hi / step - 1e-9) * step].map((v) => Number(v.toPrecision(12)));
  return {domain, ticks: niceTicks(domain[0], domain[1], Math.round((domain[1] - domain[0]) / step))};
}

/** A value for axes and tooltips: 4 significant digits, "+inf" / "-inf" / "NaN" spelled out. */
export function formatValue(value) {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "+inf";
  if (value === -Infinity) return "-inf";
  if (value !== 0 && (Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

/** The finite [min, max] of arrays of values, widened to include `include`; null if nothing is finite. */
export function finiteExtent(arrays, include = []) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const values of [...arrays, include]) {
    for (const v of values) {
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
  }
  return lo <= hi ? [lo, hi] : null;
}

/** An SVG path "d" through the points [x, y]; non-finite y values break the line. */
function linePath(points) {
  let d = "";
  let pen = "M";
  for (const [x, y] of points) {
    if (Number.isFinite(y)) {
      d += `${pen}${x.toFixed(1)},${y.toFixed(1)}`;
      pen = "L";
    } else {
      pen = "M";
    }
  }
  return d;
}

/**
 * Draws the frame, ticks and labels of a chart into `group`. x and y are scales; xTicks / yTicks are
 * [value, label] pairs; the labels are text nodes.
 */
export function drawAxes(group, {x, y, xTicks, yTicks, xLabel = "", yLabel = "", rotateX = false}) {
  const [x0, x1] = [x(x.domain[0]), x(x.domain[1])];
  const [y0, y1] = [y(y.domain[0]), y(y.domain[1])];
  const axes = svg("g");
  axes.append(svg("path", {class: "tm-axis-line", d: `M${x0},${y1}V${y0}H${x1}`}));
  for (const [value, label] of yTicks) {
    const py = y(value);
    axes.append(svg("line", {class: "tm-grid", x1: x0, x2: x1, y1: py, y2: py}));
    axes.append(svgText(label, {x: x0 - 6, y: py, class: "tm-tick", "text-anchor": "end", "dominant-baseline": "middle"}));
  }
  for (const [value, label] of xTicks) {
    const px = x(value);
    axes.append(svg("line", {class: "tm-axis-line", x1: px, x2: px, y1: y0, y2: y0 + 4}));
    const text = rotateX
      ? svgText(label, {class: "tm-tick", "text-anchor": "end", transform: `translate(${px},${y0 + 8}) rotate(-35)`})
      : svgText(label, {x: px, y: y0 + 16, class: "tm-tick", "text-anchor": "middle"});
    axes.append(text);
  }
  if (xLabel) axes.append(svgText(xLabel, {x: (x0 + x1) / 2, y: y0 + (rotateX ? 74 : 34), class: "tm-axis-label", "text-anchor": "middle"}));
  if (yLabel) {
    axes.append(svgText(yLabel, {class: "tm-axis-label", "text-anchor": "middle", transform: `translate(12,${(y0 + y1) / 2}) rotate(-90)`}));
  }
  group.append(axes);
}

/** Ticks for category positions 0..n-1, thinned to at most `max` labels. */
export function categoryTicks(labels, max = 12) {
  const every = Math.max(1, Math.ceil(labels.length / max));
  return labels.map((label, i) => [i, label]).filter(([i]) => i % every === 0);
}

/** Shortens a name to "…" and its last max - 1 characters: a module path's tail tells layers apart. */
export function shorten(text, max) {
  return text.length > max ? `\u2026${text.slice(text.length - max + 1)}` : text;
}

/**
 * Appends one run's line to `root`: a path with data-run / data-namespace through points [[x, y, value]]
 * and a dot per finite value whose hover shows describe(i) (tooltip lines). names: each point's layer
 * name (data-layer on its dot); onHover(i or null) is called as the pointer enters / leaves dots.
 */
export function drawRunLine(root, {entry, color, points, tooltip, describe, names = null, onHover = null}) {
  const path = svg("path", {class: "tm-line", d: linePath(points), stroke: color});
  path.dataset.run = entry.run;
  path.dataset.namespace = entry.namespace;
  const dots = svg("g", {fill: color});
  points.forEach(([x, y], i) => {
    if (!Number.isFinite(y)) return;
    const dot = svg("circle", {class: "tm-dot", cx: x, cy: y, r: 3, "data-index": i});
    if (names) dot.dataset.layer = names[i];
    dots.append(dot);
  });
  dots.addEventListener("mousemove", (event) => {
    const i = Number(event.target.dataset.index);
    tooltip.show(event, describe(i));
    if (onHover) onHover(i);
  });
  dots.addEventListener("mouseleave", () => {
    tooltip.hide();
    if (onHover) onHover(null);
  });
  root.append(path, dots);
  return {path, dots};
}

/**
 * Charts by key, redrawn only when what they show changed: chart(key, signature, draw) returns the chart
 * drawn last for that key if its signature (an array compared element by element) is the same, else
 * draw(); keepOnly(keys) forgets the others.
 */
export function chartCache() {
  const drawn = new Map();
  return {
    chart(key, signature, draw) {
      const found = drawn.get(key);
      if (found && found.signature.length === signature.length && signature.every((value, i) => value === found.signature[i])) {
        return found.chart;
      }
      const chart = draw();
      drawn.set(key, {chart, signature});
      return chart;
    },
    keepOnly(keys) {
      for (const key of drawn.keys()) if (!keys.has(key)) drawn.delete(key);
    },
  };
}

/** An SVG path "d" of the area between the points' [x, low, high], broken where low or high is not finite. */
export function bandPath(points) {
  let d = "";
  let run = [];
  const flush = () => {
    if (run.length > 1) {
      d += `M${run.map(([x, , high]) => `${x.toFixed(1)},${high.toFixed(1)}`).join("L")}`;
      d += `L${[...run].reverse().map(([x, low]) => `${x.toFixed(1)},${low.toFixed(1)}`).join("L")}Z`;
    }
    run = [];
  };
  for (const point of points) {
    if (Number.isFinite(point[1]) && Number.isFinite(point[2])) run.push(point);
    else flush();
  }
  flush();
  return d;
}
