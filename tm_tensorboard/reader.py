"""Read side without a server: every run's measures under a logdir as arrays, a data frame, CSV or JSON.

``read(logdir)`` walks the runs the way ``tensorboard --logdir`` does (a run is a directory holding event
files, named by its path relative to ``logdir``) and reads their events with TensorBoard's own loaders,
then keeps this plugin's data of one namespace: the configuration, the per-layer means of every measure,
the accuracy per transformation, the per-layer means of each per-transformation measure for each
transformation and, on request, every unit from the per-step snapshots. Events are
streamed, not accumulated: without ``units=True`` the snapshot blobs, most of a logdir's bytes, are
dropped as they are read. Data that is not ours, of a newer format version or that does not fit its
description is skipped, as the Invariance tab skips it; a step logged twice (a resumed run writing into
the same directory) keeps the value written last.

Imports neither torch nor pandas (``to_pandas`` imports pandas when called).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, NamedTuple

import numpy as np
from tensorboard.backend.event_processing import directory_loader, event_file_loader, io_wrapper
from tensorboard.compat import tf
from tensorboard.util import tensor_util

from . import caller, metadata

__all__ = ["Series", "RunLog", "Logs", "read", "export", "COLUMNS", "UNIT_COLUMNS"]

# The long table of ``to_pandas`` and of the CSV export, one row per value. Accuracy rows have measure
# "accuracy", the transformation's label as layer and its position as layer_index. Read with units, a
# table also has a row per unit (``unit`` its channel, ``dead`` whether it had no variance at all; both
# empty on layer-mean and accuracy rows). The per-transformation measures' layer means (ie_t, ee_t) are not
# in it, as they would need a transformation column: ``RunLog.per_transformation`` and the JSON export
# have them.
COLUMNS = ("run", "measure", "layer", "layer_index", "step", "value")
UNIT_COLUMNS = ("run", "measure", "layer", "layer_index", "step", "unit", "dead", "value")
ACCURACY = "accuracy"
_JSON_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # TensorBoard's spelling


@dataclass(frozen=True, eq=False)
class Series:
    """One quantity at every logged step: ``steps`` int64 [S] (ascending) and ``values`` [S] or
    [S, N], float32 as logged (NaN and inf included), bool for dead units."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if len(self) else "no steps"
        return f"Series({span}, values {self.values.dtype}{list(self.values.shape)})"


class RunLog:
    """One run's measures in one namespace.

    ``means[measure][layer]``: the layer's mean over its finite units at each step (a Series [S]);
    ``accuracy``: top-1 accuracy per transformation, [S, T], columns in the order of ``transformations``
    (None if not measured); ``per_transformation[measure][layer]``: the layer's mean of a
    per-transformation measure (ie_t, ee_t) for each transformation at each step, [S, T], columns as
    ``accuracy``'s; ``config``: the run's configuration record as a dict (None if missing);
    read with ``units=True``: ``units[measure][layer]`` with every unit (channel) at each step, [S, N],
    and ``dead[measure][layer]``, True where a unit had no variance at all (ratio measures show 1 there).
    """

    def __init__(
        self,
        name: str,
        config: dict | None,
        means: dict[str, dict[str, Series]],
        layer_index: dict[str, int],
        accuracy: Series | None,
        transformations: list[str],
        units: dict[str, dict[str, Series]] | None,
        dead: dict[str, dict[str, Series]] | None,
        per_transformation: dict[str, dict[str, Series]],
    ):
        self.name = name
        self.config = config
        self.means = means
        self.accuracy = accuracy
        self.per_transformation = per_transformation
        self.transformations = transformations
        self._layer_index = layer_index
        self._units = units
        self._dead = dead

    @property
    def measures(self) -> list[str]:
        """Measures with layer means, in the order they were logged (e.g. tvi, svi, nvi)."""
        return list(self.means)

    def layers(self, measure: str) -> list[str]:
        """Layers that have values of ``measure``, in network order."""
        if measure not in self.means:
            raise KeyError(f"run {self.name!r} has no measure {measure!r}; measures: {', '.join(self.means) or 'none'}")
        return list(self.means[measure])

    def layer_index(self, layer: str) -> int:
        """The layer's position in network order among the observed layers."""
        return self._layer_index[layer]

    @property
    def steps(self) -> np.ndarray:
        """Every step with any layer means or accuracy, ascending."""
        found = [s.steps for series in (self.means, self.per_transformation) for layers in series.values()
                 for s in layers.values()]
        found += [self.accuracy.steps] if self.accuracy is not None else []
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    @property
    def units(self) -> dict[str, dict[str, Series]]:
        """{measure: {layer: Series [S, units]}} from the per-step snapshots."""
        return self._unit_data(self._units)

    @property
    def dead(self) -> dict[str, dict[str, Series]]:
        """{measure: {layer: Series bool [S, units]}} for measures whose group marks dead units."""
        return self._unit_data(self._dead)

    @property
    def has_units(self) -> bool:
        return self._units is not None

    def _unit_data(self, found: dict | None) -> dict:
        if found is None:
            raise ValueError(f"run {self.name!r} was read without its units: read(logdir, units=True)")
        return found

    def to_pandas(self):
        """This run as the long table of ``COLUMNS`` (``UNIT_COLUMNS`` when read with units)."""
        return _frame([self], self.has_units)

    def __repr__(self) -> str:
        layers = {layer for m in self.means.values() for layer in m}
        return (
            f"RunLog({self.name!r}, measures={self.measures}, {len(layers)} layers, {len(self.steps)} steps"
            f"{', units' if self.has_units else ''})"
        )


class Logs(Mapping):
    """Read-only {run name: RunLog} of one namespace, runs sorted by name."""

    def __init__(self, logdir: str, namespace: str, runs: dict[str, RunLog], units: bool):
        self.logdir = logdir
        self.namespace = namespace
        self.has_units = units
        self._runs = runs

    def __getitem__(self, run: str) -> RunLog:
        if run not in self._runs:
            raise KeyError(f"no run {run!r} under {self.logdir!r}; runs: {', '.join(self._runs)}")
        return self._runs[run]

    def __iter__(self) -> Iterator[str]:
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)

    def to_pandas(self):
        """Every run as the long table of ``COLUMNS`` (``UNIT_COLUMNS`` when read with units)."""
        return _frame(self._runs.values(), self.has_units)

    def __repr__(self) -> str:
        return f"Logs({self.logdir!r}, namespace={self.namespace!r}, runs={list(self._runs)})"


# -- reading ---------------------------------------------------------------------------------------------
def _plain(message) -> dict:
    """A message as plain Python values, every field included (json_format writes int64 as strings)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.message_type is not None:
            out[field.name] = [_plain(v) for v in value] if field.is_repeated else _plain(value)
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out


def _events(run_dir: str) -> Iterator:
    """Every event of a run directory's event files, in file order, through TensorBoard's loaders."""
    loader = directory_loader.DirectoryLoader(
        run_dir, event_file_loader.TimestampedEventFileLoader, path_filter=io_wrapper.IsSummaryEventsFile
    )
    return loader.Load()


class _RunReader:
    """Collects one run's data of one namespace from its events, one value at a time."""

    def __init__(self, namespace: str, units: bool):
        self.namespace = namespace
        self.units = units
        self.namespaces: set[str] = set()  # every namespace of ours seen, for a helpful error
        self.described: dict[str, metadata.PluginData | None] = {}  # tag -> ours in namespace, or None
        self.config: metadata.RunConfig | None = None
        self.means: dict[str, dict[str, dict[int, float]]] = {}  # measure -> layer -> step -> mean
        self.layer_index: dict[str, int] = {}
        self.accuracy: dict[int, np.ndarray] = {}
        self.per_transformation: dict[str, dict[str, dict[int, np.ndarray]]] = {}  # measure -> layer -> step -> [T]
        self.unit_values: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        self.dead: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        self.skipped = 0  # values that do not fit their description

    @property
    def found(self) -> bool:
        return (self.config is not None or bool(self.means) or bool(self.accuracy) or bool(self.per_transformation)
                or bool(self.unit_values))

    def add(self, event) -> None:
        for value in event.summary.value:
            if value.HasField("metadata"):  # the first value of a tag through each writer carries it
                self.described[value.tag] = self._describe(value.metadata)
            data = self.described.get(value.tag)
            if data is not None:
                self._add(event.step, value, data)

    def _describe(self, summary_metadata) -> metadata.PluginData | None:
        if summary_metadata.plugin_data.plugin_name != metadata.PLUGIN_NAME:
            return None
        try:
            data = metadata.parse_plugin_data(summary_metadata.plugin_data.content)
        except ValueError:  # corrupted, or from a newer version of this library
            return None
        self.namespaces.add(data.namespace)
        return data if data.namespace == self.namespace else None

    def _add(self, step: int, value, data: metadata.PluginData) -> None:
        if data.kind == metadata.RUN_CONFIG:
            self.config = data.config
        elif data.kind == metadata.UNIT_SNAPSHOT:
            if self.units:
                self._add_snapshot(step, value, data)
        elif data.kind in (metadata.LAYER_MEANS, metadata.ACCURACY, metadata.PER_TRANSFORMATION):
            try:
                vector = tensor_util.make_ndarray(value.tensor)
            except (TypeError, ValueError):
                vector = None
            if data.kind == metadata.ACCURACY and vector is not None and vector.ndim == 1:
                self.accuracy[step] = vector.astype(np.float32)
            elif data.kind == metadata.LAYER_MEANS and vector is not None and vector.shape == (len(data.layers),):
                layers = self.means.setdefault(data.measure, {})
                for layer, mean in zip(data.layers, vector.astype(np.float32)):
                    layers.setdefault(layer.name, {})[step] = mean
                    self.layer_index[layer.name] = layer.index
            elif (data.kind == metadata.PER_TRANSFORMATION and vector is not None and vector.ndim == 2
                  and len(vector) == len(data.layers)):
                layers = self.per_transformation.setdefault(data.measure, {})
                for layer, means in zip(data.layers, vector.astype(np.float32)):
                    layers.setdefault(layer.name, {})[step] = means
                    self.layer_index[layer.name] = layer.index
            else:
                self.skipped += 1

    def _add_snapshot(self, step: int, value, data: metadata.PluginData) -> None:
        try:
            if len(value.tensor.string_val) != 1:
                raise ValueError("not one blob")
            snapshot = metadata.decode_snapshot(value.tensor.string_val[0], data)
        except ValueError:
            self.skipped += 1
            return
        dead = snapshot.pop(metadata.DEAD_ROW, None)
        for measure, vectors in snapshot.items():
            for i, (layer, vector) in enumerate(zip(data.layers, vectors)):
                self.unit_values.setdefault(measure, {}).setdefault(layer.name, {})[step] = vector
                self.layer_index[layer.name] = layer.index
                if dead is not None:
                    self.dead.setdefault(measure, {}).setdefault(layer.name, {})[step] = dead[i] > 0.5

    def _series(self, points: dict[int, np.ndarray | float], dtype) -> Series:
        """Points in step order; for vectors, only those as wide as the last step's (others counted)."""
        steps = sorted(points)
        if steps and np.ndim(points[steps[-1]]):
            width = np.shape(points[steps[-1]])
            kept = [s for s in steps if np.shape(points[s]) == width]
            self.skipped += len(steps) - len(kept)
            steps = kept
            values = np.stack([points[s] for s in steps]).astype(dtype)
        else:
            values = np.array([points[s] for s in steps], dtype=dtype)
        return Series(np.array(steps, dtype=np.int64), values)

    def _by_layer(self, found: dict[str, dict[str, dict]], dtype) -> dict[str, dict[str, Series]]:
        order = lambda layer: self.layer_index.get(layer, len(self.layer_index))  # noqa: E731
        return {
            measure: {layer: self._series(layers[layer], dtype) for layer in sorted(layers, key=order)}
            for measure, layers in found.items()
        }

    def run_log(self, name: str) -> RunLog:
        accuracy = self._series(self.accuracy, np.float32) if self.accuracy else None
        per_transformation = self._by_layer(self.per_transformation, np.float32)
        per_t = [accuracy] + [s for layers in per_transformation.values() for s in layers.values()]
        width = next((s.values.shape[1] for s in per_t if s is not None and len(s)), None)
        labels = [t.label for t in self.config.transformations] if self.config is not None else []
        if width is not None and len(labels) != width:
            labels = [str(t) for t in range(width)]  # no (matching) configuration
        means = self._by_layer(self.means, np.float32)
        units = self._by_layer(self.unit_values, np.float32) if self.units else None
        dead = self._by_layer(self.dead, bool) if self.units else None
        if self.skipped:
            warnings.warn(f"tm_tensorboard.read: run {name!r}: skipped {self.skipped} values that do not "
                          "fit their description (a corrupted or interrupted write?)", RuntimeWarning, stacklevel=caller.stacklevel())
        config = _plain(self.config) if self.config is not None else None
        return RunLog(name, config, means, dict(self.layer_index), accuracy, labels, units, dead, per_transformation)


def _run_dirs(logdir: str) -> dict[str, str]:
    """{run name: directory} as ``tensorboard --logdir`` names them; helpful errors for a wrong path."""
    if not tf.io.gfile.exists(logdir):
        raise FileNotFoundError(f"no such directory: {logdir!r}")
    if not tf.io.gfile.isdir(logdir):
        raise ValueError(f"{logdir!r} is a file: give the directory you pass to tensorboard --logdir")
    found = {os.path.relpath(d, logdir): d for d in io_wrapper.GetLogdirSubdirectories(logdir)}
    return dict(sorted(found.items()))


def read(logdir: str | os.PathLike, *, namespace: str = metadata.DEFAULT_NAMESPACE, units: bool = False) -> Logs:
    """Every run's measures under ``logdir`` (the directory given to ``tensorboard --logdir``).

    ``namespace``: the Monitor's (runs with nothing in it are left out); ``units=True`` also reads every
    unit of every layer at every step (memory: all the snapshots, float32). ValueError if no run has
    data of this namespace.
    """
    logdir = os.fspath(logdir)
    runs: dict[str, RunLog] = {}
    others: set[str] = set()
    run_dirs = _run_dirs(logdir)
    for name, directory in run_dirs.items():
        reader = _RunReader(namespace, units)
        for event in _events(directory):
            reader.add(event)
        if reader.found:
            runs[name] = reader.run_log(name)
        others |= reader.namespaces - {namespace}
    if not runs:
        raise ValueError(_no_runs(logdir, namespace, len(run_dirs), others))
    return Logs(logdir, namespace, runs, units)


def _no_runs(logdir: str, namespace: str, num_runs: int, others: set[str]) -> str:
    where = "the directory you pass to tensorboard --logdir (the parent of each Monitor(logdir=...))"
    if others:
        return (f"no runs with namespace {namespace!r} under {logdir!r}; namespaces found: "
                f"{', '.join(sorted(others))} (pass namespace=... / --namespace)")
    if num_runs:
        return (f"no tm_tensorboard runs under {logdir!r}, only {num_runs} run(s) of other TensorBoard data: "
                f"give {where}")
    return f"no tm_tensorboard runs under {logdir!r} (no event files at all): give {where}"


# -- tables and export -------------------------------------------------------------------------------------
class _Block(NamedTuple):
    """Rows of the long table that share run, measure and layer; per-row arrays of equal length."""

    run: str
    measure: str
    layer: str
    layer_index: int
    steps: np.ndarray
    values: np.ndarray
    unit: np.ndarray | None = None
    dead: np.ndarray | None = None


def _blocks(runs: Iterable[RunLog], units: bool) -> Iterator[_Block]:
    """The long table: per run its layer means, then (``units``) every unit, then its accuracy."""
    for run in runs:
        for measure, layers in run.means.items():
            for layer, series in layers.items():
                yield _Block(run.name, measure, layer, run.layer_index(layer), series.steps, series.values)
        if units:
            for measure, layers in run.units.items():
                for layer, series in layers.items():
                    count, width = series.values.shape
                    dead = run.dead.get(measure, {}).get(layer)
                    yield _Block(
                        run.name, measure, layer, run.layer_index(layer),
                        np.repeat(series.steps, width), series.values.reshape(-1),
                        unit=np.tile(np.arange(width), count),
                        dead=dead.values.reshape(-1) if dead is not None else None,
                    )
        if run.accuracy is not None:
            for t, label in enumerate(run.transformations):
                yield _Block(run.name, ACCURACY, label, t, run.accuracy.steps, run.accuracy.values[:, t])


def _frame(runs: Iterable[RunLog], units: bool):
    """The long table as a pandas DataFrame (values float32; unit and dead nullable)."""
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError("to_pandas() needs pandas: pip install 'tm-tensorboard[pandas]'") from error
    blocks = list(_blocks(runs, units))
    sizes = [len(b.steps) for b in blocks]

    def repeated(field: str, dtype=object) -> np.ndarray:
        """A per-block field, once per row."""
        return np.repeat(np.array([getattr(b, field) for b in blocks], dtype=dtype), sizes)

    def joined(field: str, dtype) -> np.ndarray:
        """A per-row field of every block; zeros for blocks without it."""
        parts = [np.zeros(n, dtype) if getattr(b, field) is None else getattr(b, field) for b, n in zip(blocks, sizes)]
        return np.concatenate([np.zeros(0, dtype), *parts]).astype(dtype)

    def absent(field: str) -> np.ndarray:
        return np.repeat(np.array([getattr(b, field) is None for b in blocks], dtype=bool), sizes)

    columns = {name: repeated(name) for name in ("run", "measure", "layer")}
    columns["layer_index"] = repeated("layer_index", np.int64)
    columns["step"] = joined("steps", np.int64)
    if units:
        columns["unit"] = pd.arrays.IntegerArray(joined("unit", np.int64), absent("unit"))
        columns["dead"] = pd.arrays.BooleanArray(joined("dead", bool), absent("dead"))
    columns["value"] = joined("values", np.float32)
    return pd.DataFrame(columns, columns=list(UNIT_COLUMNS if units else COLUMNS))


def _text(values: np.ndarray) -> list[str]:
    """Each float32 value as the shortest text that reads back to it exactly ("nan", "inf", "-inf")."""
    return values.astype(np.float32).astype(str).tolist()


def _write_csv(logs: Logs, out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(UNIT_COLUMNS if logs.has_units else COLUMNS)
    for b in _blocks(logs.values(), logs.has_units):
        n = len(b.steps)
        head = [[b.run] * n, [b.measure] * n, [b.layer] * n, [b.layer_index] * n, b.steps.tolist()]
        if logs.has_units:
            head.append(b.unit.tolist() if b.unit is not None else [""] * n)
            head.append(b.dead.astype(int).tolist() if b.dead is not None else [""] * n)
        writer.writerows(zip(*head, _text(b.values)))


def _json_numbers(values: np.ndarray) -> list:
    """Float32 values as JSON numbers (shortest exact text); NaN and ±inf as "NaN", "Infinity", "-Infinity"."""
    if values.ndim > 1:
        return [_json_numbers(row) for row in values]
    return [_JSON_NON_FINITE.get(t) or float(t) for t in _text(values)]


def _json_series(series: Series) -> dict:
    return {"steps": series.steps.tolist(), "values": _json_numbers(series.values)}


def _json_run(run: RunLog) -> dict:
    out = {
        "config": run.config,
        "measures": {m: {layer: _json_series(s) for layer, s in layers.items()} for m, layers in run.means.items()},
        "accuracy": None if run.accuracy is None
        else {"transformations": run.transformations, **_json_series(run.accuracy)},
        "per_transformation": None if not run.per_transformation else {
            "transformations": run.transformations,
            "measures": {m: {layer: _json_series(s) for layer, s in layers.items()}
                         for m, layers in run.per_transformation.items()},
        },
    }
    if run.has_units:
        out["units"] = {
            m: {
                layer: {
                    **_json_series(s),
                    **({"dead": [np.flatnonzero(row).tolist() for row in run.dead[m][layer].values]}
                       if layer in run.dead.get(m, {}) else {}),
                }
                for layer, s in layers.items()
            }
            for m, layers in run.units.items()
        }
    return out


def _write_json(logs: Logs, out: IO[str]) -> None:
    """{run: {config, measures: {measure: {layer: {steps, values}}}, accuracy, per_transformation[, units]}}:
    valid JSON."""
    json.dump({name: _json_run(run) for name, run in logs.items()}, out, allow_nan=False, ensure_ascii=False)
    out.write("\n")


def export(
    logdir: str | os.PathLike,
    fmt: str = "csv",
    output: str | os.PathLike = "-",
    namespace: str | None = None,
    units: bool = False,
) -> int:
    """``tm-tensorboard export``: write ``read(logdir)`` as CSV (the long table) or JSON to ``output``
    ("-": standard output); returns the exit status 0. The logdir is read before ``output`` is opened."""
    writers = {"csv": _write_csv, "json": _write_json}
    if fmt not in writers:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(writers)}")
    logs = read(logdir, namespace=namespace or metadata.DEFAULT_NAMESPACE, units=units)
    if os.fspath(output) == "-":
        writers[fmt](logs, sys.stdout)
        sys.stdout.flush()
    else:
        with open(output, "w", encoding="utf-8", newline="") as out:
            writers[fmt](logs, out)
    return 0
