// Each selected run's configuration: transformations, probe, interpolation, measures, library version.
import {html} from "./plot.js";

function rows(config) {
  const transformations = config.transformations || [];
  return [
    ["transformations", `${transformations.length}: ${transformations.map((t) => t.label).join(", ")}`],
    ["transformation set", config.transformation_set_id || ""],
    ["interpolation", config.interpolation || "\u2014"],
    ["padding", config.padding || "\u2014"],
    ["probe size", `${config.probe_size || 0} samples${config.stratified ? ", stratified by class" : ""}`],
    ["batch size", String(config.batch_size || "")],
    ["measured every", `${config.every || "?"} steps`],
    ["units", config.aggregation || ""],
    ["layers", String((config.layers || []).length)],
    ["measures", (config.measures || []).map((m) => m.name).join(", ")],
    ["library version", config.library_version || ""],
  ];
}

/** Fills `container` with one card per run: items [{key, label, color, record}] (record from the store). */
export function renderConfig(container, items) {
  container.replaceChildren(
    ...items.map(({label, color, record}) => {
      const card = html("figure", "tm-panel tm-config");
      const caption = html("figcaption", "tm-panel-title");
      const swatch = html("span", "tm-swatch");
      swatch.style.background = color;
      caption.append(swatch, html("span", "tm-run-name", label));
      card.append(caption);
      if (record.error) card.append(html("p", "tm-error", String(record.error.message || record.error)));
      else if (!record.done) card.append(html("p", "tm-muted", "loading\u2026"));
      else if (!record.value) card.append(html("p", "tm-muted", "No configuration logged."));
      else {
        const list = html("dl");
        for (const [term, description] of rows(record.value)) list.append(html("dt", "", term), html("dd", "", description));
        card.append(list);
      }
      return card;
    }),
  );
}
