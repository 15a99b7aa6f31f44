// Which layers the views show: the layer filter (a substring, or a regular expression written /like\d+/i)
// and the switch hiding activation, normalization and dropout layers, applied to every view's data in
// the same way; and the width of a layer's label on an axis.

// Module types that only reshape a layer's values elementwise or renormalize them (activations,
// normalizations, dropout, identity): hidden by the switch, to declutter plots of deep networks.
const ACTIVATION_OR_NORMALIZATION = new RegExp(
  "^(ReLU6?|LeakyReLU|PReLU|RReLU|ELU|SELU|CELU|GELU|QuickGELU|NewGELUActivation|GELUActivation|SiLU|Swish|Mish"
  + "|Hardswish|Hardsigmoid|Hardtanh|Sigmoid|LogSigmoid|Tanh|Tanhshrink|Softplus|Softsign|Softmax|Softmax2d"
  + "|LogSoftmax|Threshold|GLU|BatchNorm\\w*|SyncBatchNorm|LazyBatchNorm\\w*|LayerNorm|GroupNorm|InstanceNorm\\w*"
  + "|LazyInstanceNorm\\w*|LocalResponseNorm|RMSNorm|Dropout\\w*|AlphaDropout|FeatureAlphaDropout|Identity)$",
);

/** True for module types the "hide activation / normalization layers" switch hides. */
export function isActivationOrNormalization(moduleType) {
  return ACTIVATION_OR_NORMALIZATION.test(moduleType || "");
}

/**
 * The layer filter of `text`: {kind: "none" | "substring" | "regex", test(name, moduleType), error}.
 * "/pattern/flags" is a regular expression when it compiles (else a substring, with `error` saying why);
 * anything else a case-insensitive substring. A layer passes when its name or its module type matches.
 */
export function parseLayerFilter(text) {
  const trimmed = (text || "").trim();
  if (!trimmed) return {kind: "none", error: "", test: () => true};
  const literal = /^\/(.+)\/([dgimsuvy]*)$/.exec(trimmed);
  if (literal) {
    try {
      const pattern = new RegExp(literal[1], literal[2].replace(/[gy]/g, ""));
      return {kind: "regex", error: "", test: (name, moduleType) => pattern.test(name) || pattern.test(moduleType || "")};
    } catch (error) {
      const needle = trimmed.toLowerCase();
      return {kind: "substring", error: `not a valid regular expression (${error.message}): matching it as text`,
        test: (name, moduleType) => name.toLowerCase().includes(needle) || (moduleType || "").toLowerCase().includes(needle)};
    }
  }
  const needle = trimmed.toLowerCase();
  return {kind: "substring", error: "",
    test: (name, moduleType) => name.toLowerCase().includes(needle) || (moduleType || "").toLowerCase().includes(needle)};
}

/**
 * The layers shown for the state's {layerFilter, hideActivations}: {signature, active, keeps(name,
 * moduleType), error}. Not active: every layer is shown (and the views get their data unchanged).
 */
export function layerSelection({layerFilter = "", hideActivations = false}) {
  const filter = parseLayerFilter(layerFilter);
  const active = filter.kind !== "none" || hideActivations;
  return {
    signature: JSON.stringify([layerFilter.trim(), hideActivations]),
    active,
    error: filter.error,
    keeps: (name, moduleType) => (!hideActivations || !isActivationOrNormalization(moduleType)) && filter.test(name, moduleType),
  };
}

const filtered = new WeakMap(); // payload -> {signature, value}

function memo(payload, selection, make) {
  const found = filtered.get(payload);
  if (found && found.signature === selection.signature) return found.value;
  const value = make();
  filtered.set(payload, {signature: selection.signature, value});
  return value;
}

/** The module type of each of a run entry's layers, by name. */
export function moduleTypes(entry) {
  return new Map(entry.layers.map((layer) => [layer.name, layer.moduleType]));
}

/** Units (api.fetchUnits) with only the selected layers; the same object while the selection is the same. */
export function selectUnits(units, selection) {
  if (!units || !selection.active) return units;
  return memo(units, selection, () => ({...units, layers: units.layers.filter((layer) => selection.keeps(layer.name, layer.moduleType))}));
}

/** Layer means (api.fetchLayerMeans) with only the selected layers' columns; the same object while the
 *  selection is the same (so charts cached on it are not redrawn). */
export function selectMeans(means, entry, selection) {
  if (!means || !selection.active) return means;
  return memo(means, selection, () => {
    const types = moduleTypes(entry);
    const kept = means.layers.flatMap((name, l) => (selection.keeps(name, types.get(name)) ? [l] : []));
    return {
      ...means,
      layers: kept.map((l) => means.layers[l]),
      values: means.values.map((row) => Float32Array.from(kept, (l) => row[l])),
      stderr: means.stderr && {...means.stderr, values: means.stderr.values.map((row) => Float32Array.from(kept, (l) => row[l]))},
    };
  });
}

let measurer = null;
let family = "";

/** The width in CSS pixels of `text` in the tab's font at `size` pixels (the axes' tick labels). */
export function textWidth(text, size = 11) {
  if (!measurer) {
    measurer = document.createElement("canvas").getContext("2d");
    family = getComputedStyle(document.body).fontFamily || "sans-serif";
  }
  measurer.font = `${size}px ${family}`;
  return measurer.measureText(text).width;
}
