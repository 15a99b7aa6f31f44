"""The Invariance tab's backend: JSON routes over ``context.data_provider`` and the static frontend.

Routes (relative to ``data/plugin/tm_invariance``):

- ``/runs``: every (run, namespace) with its measures, layers (network order), accuracy, step range, and
  its per-transformation measures (``per_transformation``: ie_t, ee_t).
- ``/units?run&namespace&measure[&step]``: every unit of every layer at one step (latest by default),
  with each layer's mean over finite live units (all finite units if the run was logged with
  ``means_include_dead``, which the payload says), the indices of dead units (no variance at all) and the
  list of steps that have units (as of the last request for the latest step or a step not seen before).
- ``/layer_means?run&namespace&measure[&downsample]``: per-layer means at every step (curves, layer ×
  step heatmap, layer profile).
- ``/accuracy?run&namespace[&downsample]``: accuracy per transformation at every step.
- ``/per_transformation?run&namespace&measure[&step]``: a per-transformation measure (ie_t, ee_t) at one
  step (latest by default): each layer's mean for each transformation, [layers, T] as JSON numbers (null
  where not finite), the transformations with their ops' kinds, values, parameter names and units (from
  the run's configuration), and the steps that have it.
- ``/config?run&namespace``: the run's configuration record.
- ``/unit_history?run&namespace&measure&layer&unit``: one unit's value at every step that has a snapshot,
  and the steps at which it was dead (read from the event files where possible: see ``unit_history``).
- ``/index.js`` and ``/static/<file>``: the frontend (a fixed list of files; nothing else is served).

Bad or missing parameters give 400, unknown runs / measures / steps 404; steps come back sorted. Every
route only reads: methods other than GET and HEAD give 405. Data under the plugin's name that is not
what the SDK writes never gives 500: a point whose values are not float numbers in the shape they declare
is left out (see ``tensors``), a snapshot that cannot be read gives 404, and a warning is logged once
per series.

Bulk values (units, means, accuracy) come as base64 of little-endian float32, the precision they were
logged in, with their shape: formatting tens of thousands of numbers as JSON text cost more than half of
a request's time.
"""
from __future__ import annotations

import base64
import json
import logging
import math
from importlib import resources

import numpy as np
from google.protobuf import json_format
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import grpc_provider, provider
from tensorboard.plugins import base_plugin
from werkzeug import exceptions, wrappers

from .. import metadata
from . import tensors, unit_history

logger = logging.getLogger(__name__)

DEFAULT_DOWNSAMPLE = 1000
MAX_DOWNSAMPLE = 10000
# Enough to hold every step of any run: reading blob references is cheap (no values).
ALL_STEPS = 10**9
MAX_PARAM_LENGTH = 1024
_MIME = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png"}
MEASURE_ORDER = ("tvi", "svi", "nvi", "tvse", "svse", "nvse", "ee", "ie_t", "ee_t", "lie_rotation",
                 "lie_translation_x", "lie_translation_y", "lie_scale", "lie_brightness", "gfl", "gfg", "gf",
                 "anova_f", "anova")


def _number(value: float) -> float | str:
    """A JSON-safe number with float32 precision; non-finite values as TensorBoard spells them."""
    if math.isfinite(value):
        return float(f"{value:.7g}")
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _number_or_null(value: float) -> float | None:
    """A JSON number with float32 precision; None (null) where not finite."""
    return float(f"{value:.7g}") if math.isfinite(value) else None


def _float32_base64(values: np.ndarray) -> str:
    """The values as base64 of little-endian float32 (non-finite values included, bit for bit)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def _series(points: list, width: int) -> dict:
    """Steps and their values, [steps, width] as base64 float32, of the points holding `width` values."""
    points = [p for p in points if p.numpy.shape == (width,)]
    values = np.stack([p.numpy for p in points]) if points else np.zeros((0, width))
    return {"steps": [p.step for p in points], "shape": [len(points), width], "values": _float32_base64(values)}


def _json(request, payload: dict) -> wrappers.Response:
    return http_util.Respond(request, json.dumps(payload, ensure_ascii=False), "application/json; charset=utf-8")


def _param(request, name: str, *, required: bool = True) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        if required:
            raise errors.InvalidArgumentError(f"missing query parameter {name!r}")
        return None
    if len(value) > MAX_PARAM_LENGTH:
        raise errors.InvalidArgumentError(f"query parameter {name!r} is too long")
    return value


def _int_param(request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    text = _param(request, name, required=False)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise errors.InvalidArgumentError(f"query parameter {name!r} must be an integer, got {text!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"query parameter {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def _read_only(app):
    """``app`` for GET and HEAD; any other method gets 405 with ``Allow: GET, HEAD``."""

    def route(environ, start_response):
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return app(environ, start_response)
        return exceptions.MethodNotAllowed(valid_methods=["GET", "HEAD"])(environ, start_response)

    return route


def _layer_json(layer: metadata.Layer) -> dict:
    return {
        "name": layer.name,
        "index": layer.index,
        "module_type": layer.module_type,
        "unit_shape": list(layer.unit_shape),
        "num_units": layer.num_units,
    }


def _transformation_json(transformation) -> dict:
    """A transformation of the run configuration: its label and its ops' kinds, numbers, the numbers'
    names and unit (``metadata.OP_PARAMETERS``) and a flip's axis."""
    ops = []
    for op in transformation.ops:
        names, unit = metadata.OP_PARAMETERS.get(op.kind, ((), ""))
        ops.append({"kind": op.kind, "values": [_number_or_null(v) for v in op.values], "parameters": list(names),
                    "unit": unit, "axis": op.axis})
    return {"label": transformation.label, "ops": ops}


class InvariancePlugin(base_plugin.TBPlugin):
    """Serves the Invariance tab."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider
        self._static: dict[str, tuple[bytes, str]] | None = None
        self._described: dict[tuple, dict[str, metadata.PluginData]] = {}  # (experiment, kind, run) -> tags
        self._snapshots: dict[tuple, dict[int, str]] = {}  # (experiment, run, tag) -> {step: blob key}
        self._warned: set[tuple] = set()  # (experiment, run, tag) of series with unreadable data
        self._unit_history = unit_history.UnitHistoryReader(getattr(context, "logdir", None))

    def get_plugin_apps(self):
        routes = {
            "/index.js": self._serve_index,
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/units": self._serve_units,
            "/layer_means": self._serve_layer_means,
            "/accuracy": self._serve_accuracy,
            "/per_transformation": self._serve_per_transformation,
            "/config": self._serve_config,
            "/unit_history": self._serve_unit_history,
        }
        return {path: _read_only(app) for path, app in routes.items()}

    def is_active(self) -> bool:
        return False  # deprecated by TensorBoard: the frontend asks data_plugin_names instead

    def data_plugin_names(self):
        return (metadata.PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Invariance")

    # -- static files --------------------------------------------------------------------------------
    def _files(self) -> dict[str, tuple[bytes, str]]:
        """The frontend's files by name, read once; requests are looked up here, never on disk."""
        if self._static is None:
            root = resources.files("tm_tensorboard.frontend")
            self._static = {
                entry.name: (entry.read_bytes(), _MIME[suffix])
                for entry in root.iterdir()
                if entry.is_file() and (suffix := "." + entry.name.rsplit(".", 1)[-1]) in _MIME
            }
        return self._static

    @wrappers.Request.application
    def _serve_index(self, request):
        content, mime = self._files()["index.js"]
        return http_util.Respond(request, content, mime)

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/static/", 1)[-1]
        found = self._files().get(name)
        if found is None:
            raise errors.NotFoundError(f"no frontend file {name!r}")
        return http_util.Respond(request, found[0], found[1])

    # -- data access -----------------------------------------------------------------------------------
    def _ids(self, request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _list(self, request, kind: str, run: str | None = None, tag: str | None = None) -> dict:
        """{run: {tag: time series}} of this plugin's tensors ("tensor") or blob sequences ("blob").

        A run whose data the provider cannot list (a corrupt file can leave a tag with metadata and no
        values) is left out instead of failing the whole request.
        """
        ctx, eid = self._ids(request)
        listing = self._provider.list_tensors if kind == "tensor" else self._provider.list_blob_sequences

        def one(runs):
            return listing(
                ctx,
                experiment_id=eid,
                plugin_name=metadata.PLUGIN_NAME,
                run_tag_filter=provider.RunTagFilter(runs=runs, tags=None if tag is None else [tag]),
            )

        try:
            return one(None if run is None else [run])
        except errors.PublicError:
            raise
        except Exception:
            if run is not None:
                logger.warning("tm-tensorboard: cannot list %s data of run %r", kind, run, exc_info=True)
                return {}
        ctx_runs = self._provider.list_runs(ctx, experiment_id=eid)
        out = {}
        for r in ctx_runs:
            out.update(self._list(request, kind, r.run_name, tag))
        return out

    def _descriptions(self, request, kind: str, run: str, refresh: bool = False) -> dict[str, metadata.PluginData]:
        """{tag: plugin data} of one run's tensors or blob sequences; foreign or future data is skipped.

        Cached: a series' plugin data never changes once written, and every listing costs ~45 ms under
        the Rust data server. A lookup that misses refreshes the run once (new tags appear as training
        goes on).
        """
        key = (plugin_util.experiment_id(request.environ), kind, run)
        if refresh or key not in self._described:
            self._remember(key, self._list(request, kind, run).get(run, {}))
        return self._described[key]

    def _remember(self, key: tuple, tags: dict) -> dict[str, metadata.PluginData]:
        found = {}
        for tag, series in tags.items():
            try:
                found[tag] = metadata.parse_plugin_data(series.plugin_content)
            except ValueError:
                continue
        self._described[key] = found
        return found

    def _find(self, request, kind: str, run: str, what: str, match) -> tuple[str, metadata.PluginData]:
        """The (tag, plugin data) of ``run`` that ``match(tag, data)`` accepts; 404 naming ``what``."""
        for refresh in (False, True):
            for tag, data in self._descriptions(request, kind, run, refresh).items():
                if match(tag, data):
                    return tag, data
        raise errors.NotFoundError(f"no {what} for run {run!r}")

    def _snapshot(self, request, run: str, tag: str, step: int | None, what: str) -> tuple[int, list[int], bytes]:
        """(step, all steps with a snapshot, blob) of a run's snapshot series at ``step`` (None: latest).

        The series' {step: blob key} is cached: a step's key never changes once written, so a step
        already listed costs one data-provider call (the blob) instead of two. The latest step, a step
        not listed yet, or a cached key whose blob is gone (TensorBoard purges steps of a restarted run)
        lists the series again.
        """
        def pick(keys: dict[int, str]) -> tuple[int, list[int], bytes]:
            if not keys:
                raise errors.NotFoundError(f"run {run!r} has no {what} yet")
            chosen = next(reversed(keys)) if step is None else step
            if chosen not in keys:
                raise errors.NotFoundError(f"run {run!r} has no {what} at step {step}")
            return chosen, list(keys), self._blob(request, run, tag, chosen, keys[chosen], what)

        keys = self._snapshots.get((plugin_util.experiment_id(request.environ), run, tag))
        if keys is not None and step is not None and step in keys:
            try:
                return pick(keys)
            except errors.NotFoundError:
                pass  # the step is gone since it was listed
        return pick(self._list_snapshots(request, run, tag))

    def _blob(self, request, run: str, tag: str, step: int, key: str, what: str) -> bytes:
        """One snapshot blob; 404 if what the data provider holds there is not bytes.

        The Python loader converts the stored tensor before taking the blob out of it: a DT_VARIANT
        tensor raises KeyError there, string content ValueError, and a float tensor gives a number.
        """
        ctx, _ = self._ids(request)
        try:
            blob = self._provider.read_blob(ctx, blob_key=key)
            if isinstance(blob, bytes):
                return blob
            problem = f"a {type(blob).__name__}, not bytes"
        except errors.PublicError:
            raise
        except Exception as error:
            problem = repr(error)
        self._warn_once(request, run, tag, f"step {step}: {problem}")
        raise errors.NotFoundError(f"run {run!r}, step {step}: unreadable {what} ({problem})")

    def _list_snapshots(self, request, run: str, tag: str) -> dict[int, str]:
        """{step: blob key} of a run's snapshot series in step order, listed now and cached.

        The SDK writes one blob per step. The Python data provider makes a blob key for every element a
        step declares, so that an event of 200 bytes declaring shape [2**27] would cost gigabytes and
        minutes: a series declaring more than one blob at some step is not read. The Rust data server
        counts the blobs a step holds instead, and listing there costs ~40 ms: its series are read as
        they are.
        """
        if not isinstance(self._provider, grpc_provider.GrpcDataProvider):
            series = self._list(request, "blob", run, tag).get(run, {}).get(tag)
            if series is not None and (series.max_length or 0) > 1:
                self._warn_once(request, run, tag, f"a step declares {series.max_length} blobs, not 1")
                raise errors.NotFoundError(f"run {run!r}: {tag!r} declares {series.max_length} blobs per step, not 1")
        ctx, eid = self._ids(request)
        data = self._provider.read_blob_sequences(
            ctx,
            experiment_id=eid,
            plugin_name=metadata.PLUGIN_NAME,
            downsample=ALL_STEPS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        )
        points = sorted(data.get(run, {}).get(tag, []), key=lambda d: d.step)
        keys = {p.step: p.values[0].blob_key for p in points if p.values}
        self._snapshots[(plugin_util.experiment_id(request.environ), run, tag)] = keys
        return keys

    def _snapshot_series(self, request, run: str, namespace: str, measure: str) -> tuple[str, metadata.PluginData]:
        """The (tag, plugin data) of the run's snapshot series holding ``measure``."""
        return self._find(
            request,
            "blob",
            run,
            f"{measure!r} units in namespace {namespace!r}",
            lambda t, d: d.kind == metadata.UNIT_SNAPSHOT
            and d.namespace == namespace
            and measure in d.measures
            and measure != metadata.DEAD_ROW,
        )

    def _config(self, request, run: str, namespace: str) -> tuple[str, metadata.PluginData]:
        tag = metadata.config_tag(namespace)
        return self._find(request, "tensor", run, "configuration", lambda t, d: t == tag and d.kind == metadata.RUN_CONFIG)

    def _read(self, request, run: str, tag: str, downsample: int) -> list[provider.TensorDatum]:
        """The points of one of this plugin's tensor series with float values, sorted by step; the others
        are left out."""
        ctx, eid = self._ids(request)
        points, left_out = tensors.read(
            self._provider, ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, run=run, tag=tag,
            downsample=downsample,
        )
        if left_out:
            self._warn_once(request, run, tag, f"left out {len(left_out)} point(s): {'; '.join(left_out[:3])}")
        return sorted(points, key=lambda d: d.step)

    def _warn_once(self, request, run: str, tag: str, problem: str) -> None:
        """Log that a series holds data the plugin cannot read, once per series."""
        key = (plugin_util.experiment_id(request.environ), run, tag)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("tm-tensorboard: run %r, tag %r is not as the SDK writes it: %s", run, tag, problem)

    # -- routes ----------------------------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_runs(self, request):
        listing = self._list(request, "tensor")
        eid = plugin_util.experiment_id(request.environ)
        entries: dict[tuple[str, str], dict] = {}
        for run, tags in listing.items():
            described = self._remember((eid, "tensor", run), tags)
            for tag, data in described.items():
                series = tags[tag]
                entry = entries.setdefault(
                    (run, data.namespace),
                    {"run": run, "namespace": data.namespace, "layers": {}, "measure_layers": {},
                     "per_transformation": [], "accuracy": False, "config": False, "max_step": None},
                )
                if data.kind == metadata.LAYER_MEANS:
                    entry["measure_layers"][data.measure] = [layer.name for layer in data.layers]
                    entry["layers"].update((layer.name, _layer_json(layer)) for layer in data.layers)
                    entry["max_step"] = max(series.max_step, entry["max_step"] or series.max_step)
                elif data.kind == metadata.PER_TRANSFORMATION:
                    entry["per_transformation"].append(data.measure)
                    entry["layers"].update((layer.name, _layer_json(layer)) for layer in data.layers)
                    entry["max_step"] = max(series.max_step, entry["max_step"] or series.max_step)
                elif data.kind == metadata.ACCURACY:
                    entry["accuracy"] = True
                elif data.kind == metadata.RUN_CONFIG:
                    entry["config"] = True
        rank = {m: i for i, m in enumerate(MEASURE_ORDER)}
        runs = [
            {
                **entry,
                "layers": sorted(entry["layers"].values(), key=lambda layer: layer["index"]),
                "measures": sorted(entry["measure_layers"], key=lambda m: (rank.get(m, len(rank)), m)),
                "per_transformation": sorted(entry["per_transformation"], key=lambda m: (rank.get(m, len(rank)), m)),
            }
            for _, entry in sorted(entries.items())
        ]
        return _json(request, {"runs": runs})

    @wrappers.Request.application
    def _serve_units(self, request):
        run, namespace, measure = _param(request, "run"), _param(request, "namespace"), _param(request, "measure")
        step = _int_param(request, "step", None, -(2**63), 2**63 - 1)
        tag, data = self._snapshot_series(request, run, namespace, measure)
        chosen, steps, blob = self._snapshot(request, run, tag, step, f"{measure!r} units")
        try:
            snapshot = metadata.decode_snapshot(blob, data)
        except ValueError as error:
            self._warn_once(request, run, tag, f"step {chosen}: {error}")
            raise errors.NotFoundError(f"run {run!r}, step {chosen}: unreadable units ({error})") from None
        dead_rows = snapshot.get(metadata.DEAD_ROW)  # units without any variance, whatever the measure shown
        layers = []
        for i, layer in enumerate(data.layers):
            dead = np.flatnonzero(dead_rows[i] > 0.5) if dead_rows is not None else []
            values = snapshot[measure][i]
            counted = np.isfinite(values)
            if not data.means_include_dead:  # as the layer means route: over live units unless logged otherwise
                counted[dead] = False
            layers.append({
                **_layer_json(layer),
                "values": _float32_base64(values),
                "dead": [int(u) for u in dead],
                "mean": _number(float(values[counted].mean())) if counted.any() else "NaN",
            })
        return _json(
            request,
            {
                "run": run,
                "namespace": namespace,
                "measure": measure,
                "step": chosen,
                "steps": steps,
                "means_include_dead": data.means_include_dead,
                "layers": layers,
            },
        )

    @wrappers.Request.application
    def _serve_layer_means(self, request):
        run, namespace, measure = _param(request, "run"), _param(request, "namespace"), _param(request, "measure")
        downsample = _int_param(request, "downsample", DEFAULT_DOWNSAMPLE, 1, MAX_DOWNSAMPLE)
        tag = metadata.means_tag(namespace, measure)
        _, data = self._find(
            request, "tensor", run, f"{measure!r} layer means", lambda t, d: t == tag and d.kind == metadata.LAYER_MEANS
        )
        points = self._read(request, run, tag, downsample)
        names = [layer.name for layer in data.layers]
        errors_of = self._stderr_points(request, run, namespace, measure, downsample)
        return _json(
            request,
            {
                "run": run,
                "namespace": namespace,
                "measure": measure,
                "layers": names,
                **_series(points, len(names)),
                # the standard errors of the layer means at their steps (a run without error bars: null)
                "stderr": None if errors_of is None else {"shards": errors_of[0], **_series(errors_of[1], len(names))},
            },
        )

    def _stderr_points(self, request, run: str, namespace: str, measure: str,
                       downsample: int) -> tuple[int, list[provider.TensorDatum]] | None:
        """(shards, points) of a measure's standard errors; None for a run logged without error bars."""
        tag = metadata.stderr_tag(namespace, measure)
        data = self._descriptions(request, "tensor", run, False).get(tag)
        if data is None or data.kind != metadata.LAYER_STDERRS:
            return None
        return data.shards, self._read(request, run, tag, downsample)

    @wrappers.Request.application
    def _serve_accuracy(self, request):
        run, namespace = _param(request, "run"), _param(request, "namespace")
        downsample = _int_param(request, "downsample", DEFAULT_DOWNSAMPLE, 1, MAX_DOWNSAMPLE)
        tag = metadata.accuracy_tag(namespace)
        self._find(request, "tensor", run, "accuracy", lambda t, d: t == tag and d.kind == metadata.ACCURACY)
        try:
            _, config = self._config(request, run, namespace)
            labels = [t.label for t in config.config.transformations]
        except errors.NotFoundError:
            labels = []
        points = self._read(request, run, tag, downsample)
        width = len(labels) if labels else max((p.numpy.size for p in points), default=0)
        return _json(request, {"run": run, "namespace": namespace, "labels": labels, **_series(points, width)})

    @wrappers.Request.application
    def _serve_config(self, request):
        run, namespace = _param(request, "run"), _param(request, "namespace")
        _, data = self._config(request, run, namespace)
        config = json_format.MessageToDict(data.config, preserving_proto_field_name=True)
        return _json(request, {"run": run, "namespace": namespace, "config": config})

    @wrappers.Request.application
    def _serve_per_transformation(self, request):
        run, namespace, measure = _param(request, "run"), _param(request, "namespace"), _param(request, "measure")
        step = _int_param(request, "step", None, -(2**63), 2**63 - 1)
        tag = metadata.per_transformation_tag(namespace, measure)
        _, data = self._find(
            request, "tensor", run, f"{measure!r} per transformation",
            lambda t, d: t == tag and d.kind == metadata.PER_TRANSFORMATION,
        )
        try:
            _, config = self._config(request, run, namespace)
            transformations = [_transformation_json(t) for t in config.config.transformations]
        except errors.NotFoundError:
            transformations = []
        matrices = {p.step: p.numpy for p in self._read(request, run, tag, ALL_STEPS)
                    if p.numpy.ndim == 2 and len(p.numpy) == len(data.layers)}  # a step written twice: the last
        width = len(transformations) or next((m.shape[1] for m in reversed(matrices.values())), 0)
        matrices = {s: m for s, m in matrices.items() if m.shape[1] == width}
        if not matrices:
            raise errors.NotFoundError(f"run {run!r} has no {measure!r} per transformation yet")
        chosen = next(reversed(matrices)) if step is None else step
        if chosen not in matrices:
            raise errors.NotFoundError(f"run {run!r} has no {measure!r} per transformation at step {step}")
        errors_of = self._stderr_points(request, run, namespace, measure, ALL_STEPS)
        stderr = next((p.numpy for p in (errors_of or (0, []))[1] if p.step == chosen and p.numpy.shape == matrices[chosen].shape),
                      None)
        return _json(
            request,
            {
                "run": run,
                "namespace": namespace,
                "measure": measure,
                "step": chosen,
                "steps": list(matrices),
                "layers": [layer.name for layer in data.layers],
                "transformations": transformations or [{"label": str(t), "ops": []} for t in range(width)],
                "values": [[_number_or_null(float(v)) for v in row] for row in matrices[chosen]],
                "stderr": None if stderr is None else [[_number_or_null(float(v)) for v in row] for row in stderr],
                "means_include_dead": data.means_include_dead,
            },
        )

    @wrappers.Request.application
    def _serve_unit_history(self, request):
        run, namespace, measure = _param(request, "run"), _param(request, "namespace"), _param(request, "measure")
        layer = _param(request, "layer")
        unit = _int_param(request, "unit", None, 0, 2**31 - 1)
        if unit is None:
            raise errors.InvalidArgumentError("missing query parameter 'unit'")
        tag, data = self._snapshot_series(request, run, namespace, measure)
        try:
            blob_size, offsets, has_dead = unit_history.unit_offsets(data, measure, layer, unit)
        except KeyError:
            raise errors.NotFoundError(f"run {run!r} has no layer {layer!r} with {measure!r} units") from None
        except IndexError:
            units = next(item.num_units for item in data.layers if item.name == layer)
            raise errors.NotFoundError(f"layer {layer!r} of run {run!r} has {units} units, no unit {unit}") from None
        steps = list(self._list_snapshots(request, run, tag))
        key = (plugin_util.experiment_id(request.environ), run, tag)
        values, missing = self._unit_history.read(key, run, tag, steps, blob_size, offsets)
        left_out = set()
        if missing:  # not found in the event files: through the data provider, blob by blob
            keys = self._snapshots.get(key, {})
            column = {step: i for i, step in enumerate(steps)}
            for step in missing:
                try:
                    blob = self._blob(request, run, tag, step, keys[step], "units")
                except (errors.NotFoundError, KeyError):
                    left_out.add(step)
                    continue
                if len(blob) != blob_size:
                    self._warn_once(request, run, tag, f"step {step}: a blob of {len(blob)} bytes, not {blob_size}")
                    left_out.add(step)
                    continue
                for row, offset in enumerate(offsets):
                    values[row, column[step]] = np.frombuffer(blob, metadata.SNAPSHOT_DTYPE, 1, offset)[0]
        kept = [i for i, step in enumerate(steps) if step not in left_out]
        values = values[:, kept]
        steps = [steps[i] for i in kept]
        dead = [step for step, flag in zip(steps, values[1]) if flag > 0.5] if has_dead else []
        return _json(
            request,
            {
                "run": run,
                "namespace": namespace,
                "measure": measure,
                "layer": layer,
                "unit": unit,
                "steps": steps,
                "values": _float32_base64(values[0]),
                "dead": dead,
            },
        )
