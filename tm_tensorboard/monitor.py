"""The two-line integration: measure every ``every`` training steps and log it for TensorBoard.

    monitor = tm_tensorboard.Monitor(model, probe, tm_tensorboard.transforms.rotations(16), logdir="runs/rotated")
    ...
    monitor.step(global_step)   # in the training loop
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import caller, distributed, metadata
from .background_writer import BackgroundWriter, close_at_exit
from .capture import LayerInfo, LayerSelector
from .engine import Actions, Measurement
from .kept_batches import KeptBatches
from .preserve import preserved_rng_state
from .probe import as_probe
from .result import MeasureResult
from .summary import SummaryEmitter, run_config
from .transforms import TransformationSet

__all__ = ["Monitor"]

_LOG = logging.getLogger(__name__)
MEASUREMENTS_EXPECTED = 10  # what a Monitor's compile decision counts on (a run measures at least this often)


def _open_writer(logdir: str | os.PathLike):
    """A SummaryWriter for ``logdir``, after checking that the directory can be written."""
    from torch.utils.tensorboard import SummaryWriter

    try:
        os.makedirs(logdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=logdir):
            pass
    except OSError as error:
        raise ValueError(f"cannot write to logdir {os.fspath(logdir)!r}: {error}") from error
    return SummaryWriter(log_dir=os.fspath(logdir))


# (real path of the run directory, namespace) -> a weak reference to the live Monitor writing it: two
# Monitors logging the same tags into one run would interleave their steps and TensorBoard would show one.
_LIVE: dict[tuple[str, str], weakref.ref] = {}
_LIVE_LOCK = threading.Lock()


def _run_key(logdir, writer, namespace: str) -> tuple[str, str]:
    directory = logdir if writer is None else writer.get_logdir()
    return os.path.realpath(os.fspath(directory)), namespace


def _refuse_shared_run(key: tuple[str, str]) -> None:
    """ValueError if a live Monitor already writes ``key``'s namespace into ``key``'s run directory."""
    ref = _LIVE.get(key)
    other = None if ref is None else ref()
    if other is not None and not other._closed:
        raise ValueError(
            f"another Monitor is already writing namespace {key[1]!r} into the run directory {key[0]!r}: their "
            "steps would interleave under the same tags and TensorBoard would show one model's data; pass another "
            "namespace= (a tag prefix, e.g. namespace='invariance_b') or logdir=, or close() the other Monitor first"
        )


def _register_run(key: tuple[str, str], monitor: "Monitor") -> None:
    def forget(ref, key=key):  # the Monitor was garbage-collected unclosed
        with _LIVE_LOCK:
            if _LIVE.get(key) is ref:
                del _LIVE[key]

    with _LIVE_LOCK:
        _refuse_shared_run(key)
        _LIVE[key] = weakref.ref(monitor, forget)


def _release_run(key: tuple[str, str], monitor: "Monitor") -> None:
    with _LIVE_LOCK:
        ref = _LIVE.get(key)
        if ref is not None and ref() is monitor:
            del _LIVE[key]


def _as_step(global_step: Any) -> int:
    """``global_step`` as an int: a Python, numpy or 0-d torch integer (not a bool, float or string)."""
    if isinstance(global_step, torch.Tensor) and global_step.dim() == 0 and not global_step.is_floating_point() \
            and not global_step.is_complex() and global_step.dtype != torch.bool:
        return int(global_step.item())
    if isinstance(global_step, (int, np.integer)) and not isinstance(global_step, (bool, np.bool_)):
        return int(global_step)
    shown = f"a tensor of dtype {global_step.dtype} and shape {list(global_step.shape)}" \
        if isinstance(global_step, torch.Tensor) else f"{type(global_step).__name__} {global_step!r}"
    raise TypeError(f"monitor.step(global_step) takes an int (the training step; numpy and 0-d torch integers "
                    f"too), got {shown}")


def _check_writer(writer) -> None:
    if not hasattr(writer, "_get_file_writer"):
        raise TypeError(f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}")
    if getattr(writer, "file_writer", None) is None:
        raise ValueError("the SummaryWriter passed as writer= is closed; pass an open writer or logdir=")


class Monitor:
    """Measures ``model`` on a fixed probe every ``every`` steps and writes the results for TensorBoard.

    Give either ``logdir=`` (the Monitor owns a writer for that run directory) or ``writer=`` (your
    ``SummaryWriter``; both then write into the same run, and you may keep calling ``add_scalar`` on it
    meanwhile). A second live Monitor writing the same ``namespace`` into the same run directory is refused
    (their steps would interleave under the same tags): give it another ``namespace=`` or ``logdir=``. With
    labels (in the probe or ``labels=``) and the default ``measures``, accuracy per transformation is logged
    too. Under torch.distributed every rank makes the Monitor with the same probe and calls ``step``
    at the same steps; only rank 0 writes. Measuring never changes training: modes, autograd, RNG states
    are restored and hooks removed. ``step`` measures on the calling thread, then hands the result to a
    background thread that builds the summaries and writes them (CRC32C in C, chunk by chunk, yielding the
    GIL to training); the next measured step waits until that write is done, so at most one step is in
    flight and a crash loses at most that one. ``close()`` and interpreter exit wait for it. A failing
    measurement warns and training goes on, as does a failing write (reported at the next ``step()`` or
    ``close()``), unless ``strict=True``. Everything that can be checked is checked here, not at step
    10,000. ``unit_tensors=False`` leaves out the per-layer unit vectors written for other tools (the
    Invariance tab does not need them), which halves the log size. Layer means are over each layer's live
    units; ``means_include_dead=True`` counts units without any variance too (tmeasures' layer means).
    ``compile`` is measure()'s: by default, where preparing kernels pays over ten measurements, they are
    prepared here (``compile_seconds``): on CPU the hand-written kernels where they do all the per-chunk
    work (built once per machine), else the statistics fused by ``torch.compile`` (once per process);
    otherwise the hand-written kernels where built, else eager code. All give the same numbers up to float
    rounding. ``error_bars`` is measure()'s too (by default on where they fit): with
    them, each layer mean is logged with its jackknife standard error over interleaved shards of the probe. ``state_dtype``, ``memory_budget`` and
    ``dedupe_batchnorm`` are measure()'s (by default an eval-mode BatchNorm that only rescales another
    observed layer's output is derived from that output's states where that is exact; False measures it): a
    budget too small for a layer's states is a ValueError here. ``positions`` and ``positions_seed`` are
    measure()'s too: the same sampled positions at every step. On CPU without a ``memory_budget``, the
    Monitor keeps its last measurement's states between steps, so that the next one does not page them in
    anew (``kept_states.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        transformations: TransformationSet,
        *,
        logdir: str | os.PathLike | None = None,
        writer=None,
        every: int = 500,
        layers: LayerSelector = None,
        measures: Sequence[str] | None = None,
        labels: Any = None,
        batch_size: int = 16,
        stratified: bool = False,
        num_samples: int | None = None,
        namespace: str = metadata.DEFAULT_NAMESPACE,
        strict: bool = False,
        noise_floor: bool = False,
        actions: Actions = None,
        disk: bool = False,
        alpha: float = 0.01,
        unit_tensors: bool = True,
        compile: bool | None = None,
        means_include_dead: bool = False,
        error_bars: int | bool | None = None,
        state_dtype: torch.dtype | None = None,
        memory_budget: int | str | None = None,
        dedupe_batchnorm: bool | None = None,
        positions: int | str | None = None,
        positions_seed: int = 0,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1 (measure every `every` steps), got {every!r}")
        self._writes = distributed.is_writer()  # under torch.distributed only rank 0 writes
        if self._writes and (logdir is None) == (writer is None):
            raise ValueError("give exactly one of logdir= (a run directory) or writer= (a SummaryWriter)")
        if not namespace or "/" in namespace:
            raise ValueError(f"namespace must be a non-empty tag prefix without '/', got {namespace!r}")
        if self._writes and writer is not None:
            _check_writer(writer)
        self._run = _run_key(logdir, writer, namespace) if self._writes else None
        if self._run is not None:
            _refuse_shared_run(self._run)  # before the expensive checks; registered once they passed
        self.every = every
        self.strict = strict
        self._measurement = Measurement(
            model,
            transformations,
            layers=layers,
            measures=measures,
            batch_size=batch_size,
            stratified=stratified,
            noise_floor=noise_floor,
            actions=actions,
            disk=disk,
            alpha=alpha,
            compile=compile,
            error_bars=error_bars,
            state_dtype=state_dtype,
            memory_budget=memory_budget,
            dedupe_batchnorm=dedupe_batchnorm,
            positions=positions,
            positions_seed=positions_seed,
        )
        with preserved_rng_state():
            samples = as_probe(probe, labels=labels, num_samples=num_samples)
        self._measurement.use_labels(samples)  # the default measures log accuracy when there are labels
        self._measurement.check_probe(samples)
        self._classes = self._measurement.classes(samples)
        self._probe = samples.to(self._measurement.device(samples))  # moved once, not every step
        self._measurement.kept_batches = KeptBatches()  # and transformed once (on CPU, up to kept_batches.MAX_BYTES)
        self._measurement.passes(self._probe, self._classes)  # a memory_budget too small fails here, not at a step
        measured = self._measurement.discover(self._probe)  # (with the positions fit chose)
        self.layers: list[LayerInfo] = self._measurement.result_layers(self._probe)  # (and the derived BatchNorms)
        if self._measurement.compile is None:  # decide now: compiling pays over the many measurements to come
            values = self._measurement.values_per_measurement(measured, len(samples))
            self._measurement.compile = self._measurement.choose_kernels(
                values, self._measurement.device(self._probe), MEASUREMENTS_EXPECTED)
        self.compile_seconds = self._measurement.warm_up(self._probe)  # 0 if already compiled, eager or the CPU kernels
        if self.compile_seconds:
            _LOG.info("tm_tensorboard: compiled the measurement kernels in %.1f s", self.compile_seconds)
        self._closed = False
        self._last_step: int | None = None
        self._owns_writer = writer is None
        self.writer = None
        if self._writes:
            _register_run(self._run, self)
            try:
                self.writer = _open_writer(logdir) if writer is None else writer
                self._emitter = SummaryEmitter(self.writer, namespace, unit_tensors=unit_tensors,
                                               means_include_dead=means_include_dead)
                config = run_config(self._measurement, self.layers, probe_size=len(samples), every=every,
                                    classes=self._classes, shards=self._measurement.shards(self._probe, self._classes),
                                    means_include_dead=means_include_dead)
                self._emitter.write_config(config, step=0)  # in the event file when it returns
            except BaseException:
                _release_run(self._run, self)
                raise
            self._background = BackgroundWriter(self._emitter)
            weakref.finalize(self, close_at_exit, self._background)  # also runs at interpreter exit

    def step(self, global_step: int, *, force: bool = False) -> MeasureResult | None:
        """Measure if ``global_step`` is a multiple of ``every`` (or ``force``); else do nothing.

        Returns the MeasureResult when it measured (its summaries are written in the background), None
        otherwise. A background write that failed since the last call is reported here.
        """
        global_step = _as_step(global_step)
        if self._closed:
            raise RuntimeError("this Monitor is closed")
        if self._writes:
            self._report(self._background.failure())
        if global_step == self._last_step or not (force or global_step % self.every == 0):
            return None
        self._last_step = global_step
        try:
            device = self._measurement.device(self._probe)
            if self._probe.images.device != device:  # the model moved since the Monitor was made
                self._probe = self._probe.to(device)
            result = self._measurement.run(self._probe, classes=self._classes)
        except Exception as error:
            if self.strict:
                raise
            warnings.warn(
                f"tm_tensorboard: measuring at step {global_step} failed and was skipped "
                f"(training continues; strict=True raises instead): {error!r}",
                RuntimeWarning,
                stacklevel=caller.stacklevel(),
            )
            return None
        if self._writes:
            self._report(self._background.wait())  # at most one step in flight
            self._background.submit(result, global_step)
        return result

    def _report(self, failure: tuple[int, Exception] | None) -> None:
        """Warn about a failed background write, or raise it under ``strict``."""
        if failure is None:
            return
        step, error = failure
        if self.strict:
            raise RuntimeError(f"tm_tensorboard: writing step {step} failed: {error!r}") from error
        warnings.warn(
            f"tm_tensorboard: writing step {step} failed and the step is missing from the log "
            f"(training continues; strict=True raises instead): {error!r}",
            RuntimeWarning,
            stacklevel=caller.stacklevel(),
        )

    def close(self) -> None:
        """Wait for the step being written; flush; close the writer if the Monitor opened it (yours stays open)."""
        if self._closed:
            return
        self._closed = True
        if self._run is not None:
            _release_run(self._run, self)
        if self.writer is None:
            return
        try:
            failure = self._background.close()
        finally:
            if self._owns_writer:
                self.writer.close()
            else:
                self.writer.flush()
            self.writer = None
        self._report(failure)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
