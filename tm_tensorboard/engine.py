"""The streaming measurement: every probe image is forwarded once per transformation.

For each chunk of b probe samples the b·T batch of all their transformations is built in one batched
call on the model's device and forwarded once (eval mode, no autograd). Forward hooks view each
observed output as [b, T, units] and fold it into that activation's streaming states on the spot, so no
activation is kept (memory is O(state)) and a later in-place op cannot alter what was measured. Each
group's fold is one fused update (``fused.py``), compiled when that pays, and nothing on the chunk path
reads a device value back to the host. After the last chunk each activation's states are finalized on
the device and copied to the host once. (Goodfellow's thresholds need two extra passes over the
untransformed probe first; each Lie derivative one pass over it with forward-mode tangents, ``lie.py``.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

from . import block_pool, caller, derived, distributed, fused, heap, kept_states, lie, memory, native
from .actions import FeatureAction, identity
from .capture import (
    AffineBatchNorms,
    Capture,
    LayerInfo,
    LayerSelector,
    is_token_output,
    output_tensor,
    select_modules,
    unwrap,
)
from .kept_batches import KeptBatches
from .kept_states import KeptStates
from .layer_measures import (GROUPS, LIE_PHASES, PAIRED_SAMPLES, TRANSFORMED, UNTRANSFORMED_PHASES, Chunk,
                             MeasureOptions, update_together)
from .measures import MEASURE_GROUPS
from .positions import AUTO, AUTO_POSITIONS, build_measure, check_positions, sampled_positions
from .preserve import preserved_rng_state, preserved_training_state
from .probe import Probe, as_probe, border_variation
from .result import MeasureResult
from .relu_pairs import ReluPairs
from .shards import AUTOMATIC_ERROR_BAR_BYTES, DEFAULT_SHARDS, interleave, shard_count
from .statistics import STATE_DTYPES, AccuracyState, Scratch
from .transforms import Op, Transformation, TransformationSet

__all__ = ["measure", "estimate_memory", "Measurement", "DEFAULT_MEASURES"]

DEFAULT_MEASURES = ("invariance", "same_equivariance")
INPUT_LAYER = "input"  # the noise floor: the identity network, observed before the model
# compile=None compiles the fused updates for at least this many activation values folded in (probe samples
# × transformations × observed units, over the measurements expected): below it, compiling (~16 s on a
# fresh machine, ~4 s with Inductor's disk cache) takes longer than it saves (~1-2 ns a value on CPU).
COMPILE_WHEN_VALUES = 2_000_000_000
# Above this border_variation of the probe, padding="border" under interpolated transformations warns: the
# objects reach the border. Measured: scikit-learn's handwritten digits 0.84 (0.81 at their 8 px), uniform
# noise 0.99, the demo's glyphs on a faintly noisy background 0.13, anything on a blank margin 0.
BORDER_VARIATION_WARNING = 0.25
_UNTRANSFORMED = TransformationSet([Transformation((Op("identity", ()),))], "identity")

Actions = FeatureAction | Mapping[str, FeatureAction] | None


def compile_pays(values: int, measurements: int = 1) -> bool:
    """Whether compiling the fused updates pays for ``measurements`` measurements of ``values`` activation
    values each: always once this process has compiled them, else above COMPILE_WHEN_VALUES in all."""
    if not fused.compile_available():
        return False
    return fused.compiled_seconds() > 0 or values * measurements >= COMPILE_WHEN_VALUES


# The groups whose per-chunk work native.py's CPU kernels do all of (on CPU, float64 states, every position)
# and whose measurements are as fast without the compiled graphs (bench_fused.py --parts native)
NATIVE_GROUPS = frozenset({"invariance", "same_equivariance", "equivariance_error", "per_transformation"})


def automatic_kernels(values: int, measurements: int = 1, native_covered: bool = False) -> bool | str:
    """``compile=None``'s choice. Where the CPU kernels do all of a measurement's per-chunk work
    (``native_covered``), they replace compiling (``fused.NATIVE``: eager code for the rest): as fast as with
    the compiled graphs (``benchmarks/bench_fused.py --parts native``), and built in ~10 s once per machine,
    then loaded in a millisecond, where the graphs take 25-50 s to compile cold and ~2 s in every process
    after. So: the kernels when they are built or building them pays (``compile_pays``), else eager.
    Elsewhere: compiled (True) where that pays, else the kernels where built, else eager (False)."""
    if native_covered and native.enabled() and native.available():
        return fused.NATIVE if native.stored() or compile_pays(values, measurements) else False
    if compile_pays(values, measurements):
        return True
    return fused.NATIVE if native.stored() else False


def check_model_and_transformations(model: Any, transformations: Any) -> None:
    """TypeError unless ``model`` is a module and ``transformations`` a TransformationSet."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(transformations, TransformationSet):
        raise TypeError(
            "transformations must be a TransformationSet, e.g. tm_tensorboard.transforms.rotations(16); "
            f"got {type(transformations).__name__}"
        )


class LayerMeasureError(ValueError):
    """A selected layer cannot be measured as asked (raised from inside the forward hooks)."""


def measure(
    model: nn.Module,
    probe: Any,
    transformations: TransformationSet,
    *,
    layers: LayerSelector = None,
    measures: Sequence[str] | None = None,
    batch_size: int = 16,
    labels: Any = None,
    stratified: bool = False,
    num_samples: int | None = None,
    noise_floor: bool = False,
    actions: Actions = None,
    disk: bool = False,
    alpha: float = 0.01,
    compile: bool | None = None,
    error_bars: int | bool | None = None,
    state_dtype: torch.dtype | None = None,
    memory_budget: int | str | None = None,
    dedupe_batchnorm: bool | None = None,
    positions: int | str | None = None,
    positions_seed: int = 0,
) -> MeasureResult:
    """Measure how invariant / equivariant every observed unit of ``model`` is to ``transformations``.

    ``probe``: a tensor [N, C, H, W], an ``(images, labels)`` pair, a Dataset or a DataLoader (its first
    ``num_samples`` samples, 256 by default). ``measures``: groups among "invariance", "same_equivariance",
    "equivariance_error", "per_transformation", "goodfellow", "anova", the Lie derivatives "lie_rotation",
    "lie_translation_x", "lie_translation_y", "lie_scale", "lie_brightness" (one forward-mode pass over the
    untransformed probe each, through the transformations' interpolation and padding; ``transformations`` is
    not forwarded when only they are measured) and "accuracy" (needs labels); by default DEFAULT_MEASURES, plus
    accuracy when the probe has labels. ``batch_size``: probe samples per forward pass (each pass sees
    batch_size × T images). ``stratified=True`` measures every class separately and reports the mean (needs
    labels). ``noise_floor=True`` also measures the input itself (layer "input"). ``actions``: the equivariance
    error's feature action, one for all layers or {glob pattern: action}; ``actions.patch_grid`` also gives
    token outputs [tokens, D] the feature maps of same-equivariance. ``disk``: equivariance error inside the
    central disk only. ``alpha``: ANOVA level (Bonferroni-corrected over each layer's units). ``compile``: run
    the statistics as kernels fused by ``torch.compile`` (True), eagerly (False), or (None) decided here: on
    CPU, where the hand-written kernels (``native.py``) do all the per-chunk work (the groups of
    NATIVE_GROUPS, float64 states, every position), by them and eager code for the rest when they are built on
    this machine (a later process loads them in a millisecond) or building them pays; elsewhere compiled when
    the measurement is large enough to repay the seconds compiling costs once per process, or the kernels are
    already compiled, else by the hand-written kernels where built, else eagerly (``automatic_kernels``).
    ``error_bars``: split the probe into this many interleaved shards (True: DEFAULT_SHARDS, at least
    MIN_SHARD_SAMPLES samples each; False: none) for jackknife standard errors (``result.stderr``) at no
    extra forward, for K more sets of states in memory (``shards.py``). None (the default): DEFAULT_SHARDS
    when those states take at most AUTOMATIC_ERROR_BAR_BYTES (and fit ``memory_budget`` in one pass), else
    none, with a warning.
    ``state_dtype=torch.float32`` halves the streaming states' memory (within a relative 1e-5 of float64
    states per unit, ``statistics.py``); None (the default) is float64 unless ``memory_budget`` needs float32.
    ``memory_budget`` (bytes, or a string such as "8GB" or "512MiB"): checked after one probe sample has learned
    the layers' sizes and before any other forward (``memory.py``, ``estimate_memory``); to fit it in one pass
    the measurement takes float32 states (``state_dtype=None``), then sampled positions (``positions="auto"``),
    saying so in a warning; layers whose states still do not fit together are measured in several passes over
    the probe (the same numbers, more forwards), and a layer that does not fit alone is a ValueError naming
    the largest layers and what to change. ``dedupe_batchnorm`` leaves out of the forward's hooks the eval-mode
    BatchNorms that only rescale another observed layer's output per channel (``capture.AffineBatchNorms``) and
    derives their measures from their input's states instead (``derived.py``: each component scaled by a
    power of |γ| / σ; nvi per element and per channel is the input's): the result holds them as measured, at
    no cost, and ``result.derived`` names them. None (the default) does so wherever that is exact and
    silently measures them otherwise (with ``layers=``, Goodfellow's measures, moving measures under
    padding="zeros", a non-identity feature action for the equivariance error / Lie derivatives, a
    BatchNorm that reads its input's units otherwise or a subclass with a forward of its own); True does so
    too but makes the first three a ValueError; False measures them all.
    ``positions=K`` keeps the states of K random positions per channel (fixed by ``positions_seed`` and the
    layer) on layers with more, so per-channel values are estimates of known error at K / (H·W) the state
    memory; no per-element values there, and only the invariance, same-equivariance, per-transformation
    and Goodfellow groups (``positions.py``). ``positions="auto"``: every position, or the largest K of
    AUTO_POSITIONS with which the states fit ``memory_budget`` in one pass.
    A ``torch.compile``d model is measured eagerly through its original module (as a DDP model through
    its ``.module``); a half / bfloat16 model is given the transformed probe in its own dtype. On CPU
    without a budget the states' memory is kept for the next call on the same model, up to 2 GB
    (``kept_states.py``; ``tm.release_memory()`` gives it back).
    """
    session = Measurement(
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
    with preserved_rng_state():  # reading a shuffling DataLoader draws random numbers
        samples = as_probe(probe, labels=labels, num_samples=num_samples)
    session.use_labels(samples)
    # the state memory of the calls before on this model, kept for the next (kept_states.py)
    with kept_states.one_off(model, tuple(samples.images.shape[1:])) as kept:
        session.kept_states = kept
        return session.run(samples)


def estimate_memory(
    model: nn.Module,
    probe: Any,
    transformations: TransformationSet,
    *,
    labels: Any = None,
    num_samples: int | None = None,
    **keywords: Any,
) -> memory.MemoryReport:
    """The memory ``measure(model, probe, transformations, **keywords)`` would need, from one probe sample's
    forward: each layer's streaming states (exact, as the measures allocate them), one chunk's working
    memory (an estimate), and with ``memory_budget=`` the passes over the probe that fit it (``passes()``;
    ValueError if a layer does not fit alone). ``print()`` it for a table; ``state_bytes``,
    ``working_bytes``, ``total_bytes``, ``largest()`` and ``layers`` give the numbers."""
    session = Measurement(model, transformations, **keywords)
    with preserved_rng_state():
        samples = as_probe(probe, labels=labels, num_samples=num_samples)
    session.use_labels(samples)
    session.check_probe(samples)
    return session.estimate_memory(samples, session.classes(samples))


def _with_positions(layers: Sequence[LayerInfo], positions: int | None) -> list[LayerInfo]:
    """The layers as measured with ``positions=`` (each one's sampled positions per channel, or None)."""
    return [dataclasses.replace(info, positions=sampled_positions(info.unit_shape, info.tokens, positions))
            for info in layers]


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's parameters (else buffers); None if it has neither."""
    for tensors in (model.parameters(), model.buffers()):
        for tensor in tensors:
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def _eager_call(model: nn.Module):
    """``model``'s call without the compiled code ``model.compile()`` installed: hooks would recompile it."""
    return model._call_impl if getattr(model, "_compiled_call_impl", None) is not None else model


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def _action_lookup(actions: Actions):
    """layer name -> FeatureAction, from one action or {glob pattern: action} (first match; else identity)."""
    if actions is None or isinstance(actions, FeatureAction):
        action = actions or identity()
        return lambda layer: action
    if not isinstance(actions, Mapping) or not all(isinstance(a, FeatureAction) for a in actions.values()):
        raise TypeError("actions must be a FeatureAction or a {layer name or glob pattern: FeatureAction} mapping")
    items = list(actions.items())

    def lookup(layer: str) -> FeatureAction:
        return next((action for pattern, action in items if fnmatch.fnmatchcase(layer, pattern)), identity())

    return lookup


# A layer's output is watched through its forward and the next before it may be kept for a pair of chunks: the
# first pair's first chunk is then the third (its first two chunks are measured one at a time).
WATCHED_FORWARDS = 2


class _Observer:
    """The measure groups' states on one activation."""

    def __init__(self, info: LayerInfo, groups: Sequence[str], num_classes: int, transformations: TransformationSet,
                 device: torch.device, options: MeasureOptions):
        self.info = info
        self.compiled = False
        with heap.mapped_apart():  # states live to the measurement's end: given back to the system then
            self.measures = {
                g: build_measure(g, info, transformations, num_classes, device, options)
                for g in groups if GROUPS[g].applies(info)
            }
        # the equivariance error last: it takes the maps same-equivariance moved back (``Chunk.moved_back``),
        # whichever order the groups were asked in
        self._update_order = sorted(self.measures, key=lambda group: group == "equivariance_error")
        # Pairs of chunks (``Chunk.hold``): the output kept for the next chunk, its version then, its chunk;
        # whether the layer's output stays as it is through the rest of its forward and the next one (None: not
        # seen yet: an output changed in place later, by an in-place ReLU after it say, or a buffer the module
        # writes again at its next call, cannot be kept), and the output watched to learn it, its version and
        # the forwards left to watch.
        self.held: tuple[torch.Tensor, int, Chunk] | None = None
        self.output_stays: bool | None = None
        self._watched: tuple[torch.Tensor, int, int] | None = None

    def update(self, phase: str, activation: torch.Tensor, chunk: Chunk) -> None:
        self.compiled = chunk.compiled  # finalize the way the chunks went
        if chunk.pairing and self.output_stays is None and self._watched is None:
            self._watched = (activation, activation._version, WATCHED_FORWARDS)
        if chunk.hold and self.held is None and self._pairs(phase, activation):
            self.held = (activation, activation._version, chunk)
            return
        held, self.held = self.held, None
        if held is not None:
            self._check_held(held)
        try:
            together = update_together(self.measures, phase, activation, chunk,
                                       held=None if held is None else held[0])
            for group in self._update_order:
                m = self.measures[group]
                if phase in m.phases and group not in together:
                    if held is None:
                        m.update(phase, activation, chunk)
                    else:
                        m.update_pair(phase, held[0], held[2], activation, chunk)
        finally:
            chunk.moved_back = None  # this layer's moved maps (and its activation) are not kept past its update

    def _pairs(self, phase: str, activation: torch.Tensor) -> bool:
        """Whether this chunk's output may be kept for the next chunk's update: every measure of the phase folds
        pairs, and the output is float32 on CPU and stayed as it was through WATCHED_FORWARDS forwards."""
        updated = [m for m in self.measures.values() if phase in m.phases]
        return (bool(self.output_stays) and activation.dtype == torch.float32 and activation.device.type == "cpu"
                and bool(updated) and all(m.pairs for m in updated))

    def _check_held(self, held: tuple[torch.Tensor, int, Chunk]) -> None:
        if held[0]._version != held[1]:
            raise RuntimeError(
                f"tm_tensorboard: the output of layer {self.info.name!r} was changed in place after it was observed, "
                f"though not in the first chunks: a chunk of at most {PAIRED_SAMPLES} samples keeps its outputs to "
                f"be measured with the next chunk's; measure with batch_size > {PAIRED_SAMPLES}, or "
                f"{native.ENVIRONMENT_VARIABLE}=0"
            )

    def after_forward(self, phase: str, chunk: Chunk) -> None:
        """After each forward: learn whether the output watched stayed as it was (through WATCHED_FORWARDS of
        them); check the output kept for the next chunk; after a pair's second chunk, update with an output still
        kept (a layer that chunk did not reach) alone."""
        if self._watched is not None:
            output, version, left = self._watched
            if output._version != version or left == 1:
                self.output_stays, self._watched = output._version == version, None
            else:
                self._watched = (output, version, left - 1)
        if self.held is None:
            return
        self._check_held(self.held)
        if not chunk.hold:
            (activation, _, held_chunk), self.held = self.held, None
            self.update(phase, activation, dataclasses.replace(held_chunk, hold=False))

    def sharded(self, phase: str) -> list:
        """The measures this phase updates that have error bars (closed at the end of each shard)."""
        return [m for m in self.measures.values() if phase in m.phases and m.shardable]

    def reserve_shards(self, phase: str, shards: int) -> None:
        """Allocate the states of every shard of this phase now, before the chunks recycle their memory."""
        if shards > 1:
            with heap.mapped_apart():
                for m in self.sharded(phase):
                    m.reserve_shards(shards)

    def finalize(self) -> tuple[dict[str, tuple[tuple[str, ...], np.ndarray, np.ndarray | None]], bool, bool]:
        """{group: (component names, [classes, components, *shape], the jackknife replicates' [K, classes,
        components, channels] or None)} on the host, and whether the states hold NaN / inf (what the activations were:
        see ``Measurement.finalize``), one device-to-host copy."""
        if not self.measures:
            return {}, False, False
        computed = [m.compute(self.compiled) for m in self.measures.values()]
        flags = [m.nonfinite() for m in self.measures.values()]  # before the replicates take the shards' states
        shards = [m.replicates(self.compiled) for m in self.measures.values()]
        host = torch.cat([c.reshape(-1) for c in computed] + [v.reshape(-1) for v in shards if v is not None]
                         + flags).to(torch.float64).cpu().numpy()  # (float32 states compute in float32)
        out, start = {}, 0
        for (group, m), c in zip(self.measures.items(), computed):
            out[group] = (m.components, host[start : start + c.numel()].reshape(c.shape[:2] + m.unit_shape), None)
            start += c.numel()
        for (group, m), v in zip(self.measures.items(), shards):
            if v is not None:
                out[group] = out[group][:2] + (host[start : start + v.numel()].reshape(v.shape),)
                start += v.numel()
        sums = host[start:]
        return out, bool(np.isnan(sums).any()), bool(np.isinf(sums).any())


class _Finalized:
    """An observer already finalized to the host (a pass of a grouped measurement), read like one."""

    def __init__(self, info: LayerInfo, values: tuple):
        self.info = info
        self._values = values

    def finalize(self) -> tuple:
        return self._values


class Measurement:
    """A validated measurement configuration that can run on a probe many times (the Monitor's core)."""

    def __init__(
        self,
        model: nn.Module,
        transformations: TransformationSet,
        *,
        layers: LayerSelector = None,
        measures: Sequence[str] | None = None,
        batch_size: int = 16,
        stratified: bool = False,
        noise_floor: bool = False,
        actions: Actions = None,
        disk: bool = False,
        alpha: float = 0.01,
        compile: bool | None = None,
        error_bars: int | bool | None = None,
        state_dtype: torch.dtype | None = None,
        memory_budget: int | str | None = None,
        dedupe_batchnorm: bool | None = None,
        positions: int | str | None = None,
        positions_seed: int = 0,
    ):
        check_model_and_transformations(model, transformations)
        if len(transformations) < 2:
            raise ValueError(
                f"the transformation set has {len(transformations)} transformation(s); the transformation "
                "variance needs at least 2"
            )
        self.measures_given = measures is not None  # else the default: DEFAULT_MEASURES, accuracy with labels
        self._accuracy_implied = False
        if measures is None:
            measures = DEFAULT_MEASURES
        if isinstance(measures, str):
            measures = (measures,)
        unknown = [m for m in measures if m not in MEASURE_GROUPS]
        if unknown or not measures:
            raise ValueError(
                f"unknown measure(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"allowed: {', '.join(MEASURE_GROUPS)}"
            )
        comparing = [m for m in measures if m in GROUPS and GROUPS[m].needs_identity]
        if comparing and transformations.identity_index is None:
            raise ValueError(
                f"{' and '.join(comparing)} compare{'s' if len(comparing) == 1 else ''} every transformed input "
                "with the untransformed one, so the transformations must include the identity (rotations(n) and "
                "rot90() do; product() with a set that has it does too)"
            )
        if any(m in lie.GENERATORS for m in measures):  # the Lie derivative differentiates the set's warp
            lie.check_interpolation(transformations.interpolation)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (probe samples per forward), got {batch_size!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (compile when it pays), got {compile!r}")
        if error_bars is not None and (not isinstance(error_bars, (bool, int)) or error_bars < 0):
            raise ValueError(f"error_bars must be None (when they fit), True, False or a number of shards, "
                             f"got {error_bars!r}")
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be None (float64, or float32 where memory_budget needs it), "
                             f"torch.float64 or torch.float32, got {state_dtype!r}")
        if dedupe_batchnorm not in (None, True, False):
            raise ValueError(f"dedupe_batchnorm must be None (where exact), True or False, got {dedupe_batchnorm!r}")
        refusal = self._dedupe_refusal(layers, measures, transformations)
        if dedupe_batchnorm and refusal:
            raise ValueError(refusal)
        check_positions(positions, positions_seed, [m for m in measures if m != "accuracy"])
        self.model = unwrap(model)
        self.transformations = transformations
        self.measures = tuple(dict.fromkeys(measures))
        self.groups = [g for g in self.measures if g != "accuracy"]
        self.batch_size = batch_size
        self.stratified = stratified
        self.noise_floor = noise_floor
        self.options = MeasureOptions(actions=_action_lookup(actions), disk=disk, alpha=alpha,
                                      state_dtype=state_dtype or torch.float64, positions_seed=positions_seed)
        # what memory_budget may change (``fit``): float32 states if state_dtype is None, sampled positions
        # if positions is "auto"
        self._automatic = {"state_dtype": state_dtype is None, "positions": positions == AUTO}
        self._asked = (self.options.state_dtype, None if positions == AUTO else positions)
        self.positions = self._asked[1]  # sampled per channel on the layers with more (None: all)
        self._fitted: dict[tuple, tuple[torch.dtype, int | None]] = {}  # fit's choice per sample shape and classes
        self.compile = compile if compile is not None else fused.mode_from_environment()
        # shards asked for (None: automatic, see ``shards``)
        self.error_bars = None if error_bars is None else DEFAULT_SHARDS if error_bars is True else max(int(error_bars), 1)
        self._shards: dict[tuple, int] = {}  # the automatic choice per probe shape and classes
        self.modules, self.explicit = select_modules(self.model, layers)
        self._selected = self.modules  # (``discover`` leaves out the BatchNorms it derives)
        self.memory_budget = None if memory_budget is None else memory.parse_bytes(memory_budget)
        self.kept_states = KeptStates()  # this session's last measurement's states, for its next (CPU, no budget)
        self.kept_batches: KeptBatches | None = None  # a Monitor's: the probe's transformed batches, for its next
        # with kept batches: the last probe, its images' version, its shard count, the probe shuffled into shards
        self._interleaved: tuple[Probe, int, int, tuple] | None = None
        # None: wherever exact; the discovery pass that finds them runs only when there is a BatchNorm to leave out
        self.dedupe_batchnorm = dedupe_batchnorm is not False and refusal is None and any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) for _, module in self.modules)
        self._layers: tuple[tuple, list[LayerInfo]] | None = None  # (probe sample shape, dtype), measured layers
        # a BatchNorm's activation -> (the activation its measures derive from, its module type): ``discover``
        self._derived: dict[str, tuple[str, str]] = {}
        self._order: dict[str, int] = {}  # every discovered activation -> its place in the network's order
        self._passes_warned = False  # the warning about several passes is given once
        self._working_bytes: int | None = None  # one chunk's working memory as planned (``passes``), under a budget
        self._fits = False  # set once the model ran on a probe batch
        self._padding_checked = False  # the border-padding warning is given once

    @staticmethod
    def _dedupe_refusal(layers: LayerSelector, measures: Sequence[str], transformations: TransformationSet) -> str | None:
        """Why leaving the affine BatchNorms out would lose something (``capture.AffineBatchNorms``): the
        ValueError of ``dedupe_batchnorm=True``; None when it loses nothing (the default then dedupes)."""
        if layers is not None:
            return ("dedupe_batchnorm=True thins the default layer selection; with layers= the layers "
                    "are yours to choose (leave the BatchNorms out of them)")
        if "goodfellow" in measures:
            return ("dedupe_batchnorm=True leaves out BatchNorms whose measures equal their inputs', and "
                    "Goodfellow's firing rates do not (a negative γ reverses which side of the threshold "
                    "fires): measure goodfellow without dedupe_batchnorm=True")
        moving = [m for m in measures if m in ("same_equivariance", "equivariance_error") or m in lie.GENERATORS]
        if moving and transformations.padding == "zeros":
            return (
                f"dedupe_batchnorm=True leaves out BatchNorms whose measures equal their inputs', and with "
                f"padding='zeros' {', '.join(moving)} do not: moving a BatchNorm's shifted maps back brings zeros in "
                "at the border, unlike its input's; use padding='border' or measure without dedupe_batchnorm=True"
            )
        return None

    def _same_as_input(self, name: str, source: str) -> bool:
        """Whether a BatchNorm that rescales the observed output ``source`` per channel measures what it does
        under their feature actions: the identity's on both for the equivariance error or a Lie derivative (a
        grouped one, orientation pooling or cyclic shifts, mixes channels with different scales)."""
        moving = any(g == "equivariance_error" or g in lie.GENERATORS for g in self.groups)
        return not moving or all(type(self.options.actions(n)) is FeatureAction for n in (name, source))

    def use_labels(self, probe: Probe) -> None:
        """With the default measures, a probe with labels adds accuracy; explicit measures that leave the
        labels unused (no accuracy, not stratified) get a warning."""
        if probe.labels is None or "accuracy" in self.measures:
            return
        if not self.measures_given:
            self.measures += ("accuracy",)
            self._accuracy_implied = True
        elif not self.stratified:
            warnings.warn(
                'the probe\'s labels are unused: measures= has no "accuracy" and stratified=False; add "accuracy" '
                "to measures= to log accuracy per transformation, or pass no labels",
                UserWarning,
                stacklevel=caller.stacklevel(),
            )

    @property
    def phases(self) -> list[str]:
        """The passes over the probe, in order: the untransformed ones the groups need, one forward-mode pass
        per Lie derivative, and the transformed one (unless only Lie derivatives are measured)."""
        needed = {p for g in self.groups for p in GROUPS[g].phases}
        if "accuracy" in self.measures:
            needed.add(TRANSFORMED)
        return [p for p in (*UNTRANSFORMED_PHASES, *LIE_PHASES, TRANSFORMED) if p in needed]

    @property
    def needs_labels(self) -> bool:
        return self.stratified or "accuracy" in self.measures

    def check_probe(self, probe: Probe) -> None:
        """Raise ValueError if this measurement cannot run on ``probe``."""
        if len(probe) < 2:
            raise ValueError(f"the probe has {len(probe)} sample(s); the sample variance needs at least 2")
        if self.needs_labels and probe.labels is None:
            what = "stratified=True" if self.stratified else 'measures=("accuracy", ...)'
            raise ValueError(f"{what} needs labels: pass probe=(images, labels) or labels=")
        if self.stratified:
            classes, counts = np.unique(probe.labels.numpy(), return_counts=True)
            small = [int(c) for c, n in zip(classes, counts) if n < 2]
            if small:
                raise ValueError(f"stratified measures need at least 2 samples per class; class(es) {small} have 1")
        self.transformations.check_input(probe.images.shape)
        self._warn_if_padding_smears(probe.images)

    def _warn_if_padding_smears(self, images: torch.Tensor) -> None:
        """Warn (once per measurement) when interpolated transformations with ``padding="border"`` would
        smear content that reaches the probe's border into the corners: an artifact no network is
        invariant to, which reads as non-invariance (on handwritten digits it halved a rotation-augmented
        model's accuracy at 45° + k·90°)."""
        t = self.transformations
        if self._padding_checked or t.padding != "border" or images.dim() != 4 or images.is_meta:  # (no values)
            return
        self._padding_checked = True
        if not t.interpolates(images.shape[-2], images.shape[-1]):
            return
        variation = border_variation(images)
        if variation > BORDER_VARIATION_WARNING:
            warnings.warn(
                f"tm_tensorboard: the probe's images have content at their border (it varies {variation:.2f} as "
                f"much as the whole image), and {t.spec} with padding='border' (the default, as in tmeasures) "
                "smears it into the corners, which no network is invariant to. Consider padding='zeros' "
                "(e.g. tm.transforms.rotations(16, padding='zeros')), and noise_floor=True to see what "
                "interpolation and padding alone do (layer 'input').",
                UserWarning,
                stacklevel=caller.stacklevel(),
            )

    def classes(self, probe: Probe) -> list[int] | None:
        return sorted(int(c) for c in torch.unique(probe.labels)) if self.stratified else None

    def device(self, probe: Probe) -> torch.device:
        return _model_device(self.model, probe.images.device)

    def _check_logits(self, output: object, rows: int) -> None:
        """Accuracy compares labels with the argmax of logits [batch, classes]: check the model returns them
        (shapes only). Accuracy added by default (labels, no measures=) is left out, with a warning."""
        if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == rows:
            return
        got = f"shape {list(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        if not self._accuracy_implied:
            raise ValueError(f"accuracy needs the model to return logits shaped [batch, classes]; got {got}")
        warnings.warn(
            f"not measuring accuracy: the probe has labels, but the model returns {got}, not logits shaped "
            "[batch, classes] (pass measures= to choose the measures and silence this)",
            UserWarning,
            stacklevel=caller.stacklevel(),
        )
        self.measures = tuple(m for m in self.measures if m != "accuracy")
        self._accuracy_implied = False

    def _check_labels(self, labels: torch.Tensor | None, classes: int) -> None:
        """ValueError unless every label indexes one of the model's ``classes`` outputs (host labels: no sync)."""
        if labels is None or "accuracy" not in self.measures:
            return
        host = labels.numpy()  # read with numpy: labels live on the host, and no device op is dispatched
        bad = np.unique(host[(host < 0) | (host >= classes)]).tolist()
        if bad:
            shown = ", ".join(map(str, bad[:6])) + (", ..." if len(bad) > 6 else "")
            hint = (
                "; labels with the default measures add accuracy: if they are not the model's classes, pass "
                "measures= without \"accuracy\""
                if self._accuracy_implied
                else ""
            )
            raise ValueError(
                f"labels must be class indices in [0, {classes}): the model returns {classes} logits and accuracy "
                f"compares the labels with their argmax; got {shown}{hint}"
            )

    def discover(self, probe: Probe) -> list[LayerInfo]:
        """Run one probe sample through the model to check that everything fits and learn the layers it
        measures (once per probe sample shape and dtype). With ``dedupe_batchnorm``, the BatchNorms that only
        rescale another observed output per channel (``capture.AffineBatchNorms``) leave the observed modules:
        their measures are derived from their inputs' (``derived.py``, ``finalize``)."""
        key = (tuple(probe.images.shape[1:]), probe.images.dtype)
        if self._layers is not None and self._layers[0] == key:
            return self._layers[1]
        self.modules = self._selected
        observers: dict[str, _Observer] = {}
        tracing = AffineBatchNorms(self.modules) if self.dedupe_batchnorm else contextlib.nullcontext()
        with warnings.catch_warnings(), tracing as trace:
            warnings.simplefilter("ignore", RuntimeWarning)
            first = Probe(probe.images[:1], None if probe.labels is None else probe.labels[:1])
            self.stream(first, None, TRANSFORMED, observers, None, groups=(), all_labels=probe.labels)
        layers = [o.info for o in observers.values()]
        derived: dict[str, str] = {}
        if trace is not None:
            derived = self._derivable(layers, trace)
            left_out = {name.split("#")[0] for name in derived}
            self.modules = [(name, module) for name, module in self.modules if name not in left_out]
        self._derived = {name: (source, observers[name].info.module_type) for name, source in derived.items()}
        self._order = {name: index for index, name in enumerate(observers)}
        measured = [info for info in layers if info.name not in derived]
        self._layers = (key, [dataclasses.replace(info, index=index) for index, info in enumerate(measured)])
        return self._layers[1]

    def result_layers(self, probe: Probe) -> list[LayerInfo]:
        """The layers a result on ``probe`` holds, in the network's order: those ``discover`` measures and the
        BatchNorms derived from them."""
        return self._with_derived({info.name: info for info in self.discover(probe)}, {}, {})[0]

    def _derivable(self, layers: list[LayerInfo], trace: AffineBatchNorms) -> dict[str, str]:
        """{BatchNorm activation: the activation it maps} for the BatchNorms whose every call maps an observed
        output whose measures give its own (``_same_as_input``), read the same way (units, channels first)."""
        infos, modules = {info.name: info for info in layers}, dict(self.modules)
        alike = {
            activation: source for activation, source in trace.sources.items()
            if activation in infos and source in infos and self._same_as_input(activation, source)
            and (infos[activation].unit_shape, infos[activation].tokens, infos[activation].grid)
            == (infos[source].unit_shape, infos[source].tokens, infos[source].grid)
            and infos[activation].num_channels == modules[activation.split("#")[0]].running_var.numel()
        }
        calls: dict[str, list[str]] = {}
        for info in layers:
            calls.setdefault(info.name.split("#")[0], []).append(info.name)
        return {activation: source for activation, source in alike.items()
                if all(call in alike for call in calls[activation.split("#")[0]])}

    def estimate_memory(self, probe: Probe, classes: list[int] | None, shards: int | None = None) -> memory.MemoryReport:
        """The memory this measurement needs on ``probe`` (``memory.py``; the discovery pass runs first, and
        ``fit`` under a budget), with its error-bar ``shards`` (default: ``self.shards``)."""
        self.fit(probe, classes)
        shards = self.shards(probe, classes) if shards is None else shards
        return self._estimate(probe, classes, shards, self.options.state_dtype, self.positions)

    def _estimate(self, probe: Probe, classes: list[int] | None, shards: int, state_dtype: torch.dtype,
                  positions: int | None) -> memory.MemoryReport:
        """The MemoryReport with these states' dtype and sampled positions."""
        layers = _with_positions(self.discover(probe), positions)
        return memory.estimate(
            layers, self.groups, self.transformations, len(classes or [0]),
            dataclasses.replace(self.options, state_dtype=state_dtype), batch_size=self.batch_size,
            input_shape=tuple(probe.images.shape[1:]), activation_dtype=_model_dtype(self.model) or probe.images.dtype,
            shards=shards, budget=self.memory_budget,
        )

    def fit(self, probe: Probe, classes: list[int] | None) -> None:
        """Under ``memory_budget``, the automatic ways to fit the states in one pass, least lossy first:
        float32 states (``state_dtype=None``; within a relative 1e-5 of float64), then the most sampled
        positions per channel of AUTO_POSITIONS (``positions="auto"``; per-channel estimates). What still does
        not fit is measured in several passes (``passes``). Chosen once per sample shape and classes, with a
        warning that says what was chosen. (The states do not depend on the probe's size: the warm-up's
        two samples and the probe get the same choice, and one warning.)"""
        key = (tuple(probe.images.shape[1:]), probe.images.dtype, tuple(classes or ()))
        if key not in self._fitted:
            self._fitted[key] = self._choose_fit(probe, classes)
        state_dtype, positions = self._fitted[key]
        self.options.state_dtype = state_dtype
        if positions != self.positions:
            self.positions = positions
            if self._layers is not None:  # the discovered layers measure the positions chosen
                shape, layers = self._layers
                self._layers = (shape, _with_positions(layers, positions))

    def _choose_fit(self, probe: Probe, classes: list[int] | None) -> tuple[torch.dtype, int | None]:
        if self.memory_budget is None or not any(self._automatic.values()):
            return self._asked
        dtypes = (torch.float64, torch.float32) if self._automatic["state_dtype"] else (self._asked[0],)
        ladder = (None, *AUTO_POSITIONS) if self._automatic["positions"] else (self._asked[1],)
        candidates = [(dtype, positions) for positions in ladder for dtype in dtypes]
        asked = self._estimate(probe, classes, 1, *candidates[0])
        chosen, report = candidates[-1], None
        for candidate in candidates:
            report = asked if candidate == candidates[0] else self._estimate(probe, classes, 1, *candidate)
            if report.total_bytes <= self.memory_budget:
                chosen = candidate
                break
        if chosen != candidates[0] and self._feasible(report):
            dtype, positions = chosen
            what = ["float32 states (within a relative 1e-5 of float64)"] if dtype != candidates[0][0] else []
            if positions is not None:
                sampled = sum(layer.positions is not None for layer in report.layers)
                what.append(f"positions={positions} sampled per channel on the {sampled} layers with more (per-channel "
                            "estimates, no per-element values there)")
            fits = report.total_bytes <= self.memory_budget
            warnings.warn(
                f"tm_tensorboard: to fit memory_budget={memory.format_bytes(self.memory_budget)} "
                f"({memory.format_bytes(asked.total_bytes)} as asked), measuring with {' and '.join(what)}: "
                f"{memory.format_bytes(report.total_bytes)}{'' if fits else ', still more: in several passes'}; "
                "pass state_dtype= and positions= explicitly to choose yourself",
                UserWarning,
                stacklevel=caller.stacklevel(),
            )
        return chosen

    @staticmethod
    def _feasible(report: memory.MemoryReport) -> bool:
        """Whether the report's layers fit its budget in one pass or several (else ``passes`` says why not)."""
        try:
            report.passes()
        except ValueError:
            return False
        return True

    def shards(self, probe: Probe, classes: list[int] | None) -> int:
        """Error-bar shards of ``probe`` (1: none): as ``error_bars`` asks, or (None) DEFAULT_SHARDS when their
        K more sets of states take at most AUTOMATIC_ERROR_BAR_BYTES and fit ``memory_budget`` in one pass;
        else none, with a warning (once) that says what they would cost."""
        asked = DEFAULT_SHARDS if self.error_bars is None else self.error_bars
        count = shard_count(asked, len(probe))
        if self.error_bars is not None or count < 2:
            return count
        key = (tuple(probe.images.shape), probe.images.dtype, tuple(classes or ()))
        if key not in self._shards:
            with_bars = self.estimate_memory(probe, classes, count)
            extra = with_bars.state_bytes - self.estimate_memory(probe, classes, 1).state_bytes
            try:
                fits = extra <= AUTOMATIC_ERROR_BAR_BYTES and (self.memory_budget is None or len(with_bars.passes()) == 1)
            except ValueError:  # a layer too big for the budget even alone: the measurement will say so
                fits = False
            self._shards[key] = count if fits else 1
            if not fits:
                limit = (f"more than the {memory.format_bytes(AUTOMATIC_ERROR_BAR_BYTES)} automatic error bars may take"
                         if extra > AUTOMATIC_ERROR_BAR_BYTES else "more than memory_budget leaves in one pass")
                warnings.warn(
                    f"tm_tensorboard: measuring without error bars: their {count} shards' states would take "
                    f"{memory.format_bytes(extra)} more memory, {limit}; error_bars=True measures them anyway "
                    "(error_bars=False: none, and no warning)",
                    UserWarning,
                    stacklevel=caller.stacklevel(),
                )
        return self._shards[key]

    def passes(self, probe: Probe, classes: list[int] | None) -> list[list[str]] | None:
        """The layers each pass over ``probe`` observes under ``memory_budget`` (None: no budget, one pass
        over all), after the discovery pass (also run for ``dedupe_batchnorm``). ValueError if a layer's
        states do not fit the budget alone; a warning, once, when the layers take several passes."""
        if self.dedupe_batchnorm:
            self.discover(probe)
        if self.memory_budget is None:
            return None
        report = self.estimate_memory(probe, classes)
        self._working_bytes = report.working_bytes
        passes = report.passes()
        if len(passes) > 1 and not self._passes_warned:
            self._passes_warned = True
            halve = "; state_dtype=torch.float32 halves the states" if self.options.state_dtype == torch.float64 \
                else ""
            warnings.warn(
                f"tm_tensorboard: the streaming states of all {len(report.layers)} layers need "
                f"{memory.format_bytes(report.state_bytes)}, more than memory_budget="
                f"{memory.format_bytes(self.memory_budget)} leaves them: measuring in {len(passes)} passes over the "
                f"probe ({len(passes)} × the forwards{halve})",
                UserWarning,
                stacklevel=caller.stacklevel(),
            )
        return passes

    def run(self, probe: Probe, *, classes: list[int] | None = None) -> MeasureResult:
        """Stream ``probe`` through the model and return the finalized result.

        Under torch.distributed every rank passes the same probe, streams its shard of it, and gets the
        same merged result.
        """
        on_cpu = self.device(probe).type == "cpu"
        kept = heap.freed_memory_kept(large_blocks=self.memory_budget is None)  # see heap.py
        with kept if on_cpu else contextlib.nullcontext(), self._keeping_states(on_cpu):
            if distributed.process_group() is not None:
                return self._run_distributed(probe, classes)
            self.check_probe(probe)
            classes = classes if classes is not None else self.classes(probe)
            probe, shards = self.interleaved(probe, classes)
            observers, accuracy = self._stream_planned(probe, classes, shards=shards)
            return self.finalize(observers, accuracy, len(probe), classes)

    def _keeping_states(self, on_cpu: bool) -> contextlib.AbstractContextManager:
        """The states of a measurement on CPU come from the previous one's memory and are kept for the next
        (``kept_states.py``: a Monitor's measurements page nothing in after the first, nor do measure()'s calls
        after a process's first). Not under a memory budget: there passes free their states for the next pass,
        nothing is held between measurements, and what one-off measurements kept is let go first."""
        if not on_cpu:
            return contextlib.nullcontext()
        if self.memory_budget is None:
            return self.kept_states.serving()
        self.kept_states.let_go()
        kept_states.let_go_one_off()
        return contextlib.nullcontext()

    def interleaved(self, probe: Probe, classes: list[int] | None) -> tuple[Probe, list[tuple[int, int]] | None]:
        """The probe in error-bar shard order and each shard's range (None: no error bars for it)."""
        count = self.shards(probe, classes)
        if count < 2:
            return probe, None
        key = (probe, probe.images._version, count)
        if self._interleaved is not None and self._interleaved[0] is probe and self._interleaved[1:3] == key[1:]:
            return self._interleaved[3]  # (the same probe, unchanged, as the last measurement's: its batches kept)
        order, bounds = interleave(len(probe), count)
        shuffled = Probe(probe.images[order], None if probe.labels is None else probe.labels[order]), bounds
        if self.kept_batches is not None:
            self._interleaved = (*key, shuffled)
        return shuffled

    def _stream_phases(self, probe: Probe, classes: list[int] | None, compiled: bool | None = None,
                       shards: list[tuple[int, int]] | None = None):
        observers: dict[str, _Observer] = {}
        accuracy = AccuracyState(len(self.transformations), self.device(probe)) if "accuracy" in self.measures else None
        for phase in self.phases:
            self.stream(probe, classes, phase, observers, accuracy, compiled=compiled, shards=shards)
            for observer in observers.values():
                for m in observer.measures.values():
                    m.finish(phase)
        return observers, accuracy

    def _stream_planned(self, probe: Probe, classes: list[int] | None, compiled: bool | None = None,
                        shards: list[tuple[int, int]] | None = None):
        """``_stream_phases`` on all layers at once, or under ``memory_budget`` once per pass of ``passes``."""
        return self._in_passes(probe, classes, compiled,
                               lambda compiled: self._stream_phases(probe, classes, compiled, shards))

    def _in_passes(self, probe: Probe, classes: list[int] | None, compiled: bool | None,
                   stream: Callable[[bool | None], tuple]):
        """``stream(compiled)`` (observers and accuracy of the layers in ``self.modules``) on all layers, or
        once per pass of ``passes``: each pass observes its layers only and is finalized to the host before
        the next one starts, so one pass's states are in memory at a time. Every pass folds the same
        activations in the same chunks with the same kernels (compiled or not is decided for the whole
        measurement), so the results equal one pass's exactly."""
        passes = self.passes(probe, classes)
        with self._pooled(probe):
            if passes is None or len(passes) == 1:
                return stream(compiled)
            return self._each_pass(probe, passes, compiled, stream)

    def _pooled(self, probe: Probe) -> contextlib.AbstractContextManager:
        """Under a memory budget on CPU, the chunks' blocks above 32 MB kept for the next chunk, within the plan's
        working memory of one chunk (``block_pool.py``; without a budget the heap keeps them: ``heap.py``)."""
        if self._working_bytes is None or self.device(probe).type != "cpu":  # (None: no budget)
            return contextlib.nullcontext()
        return block_pool.serving(self._working_bytes)

    def _each_pass(self, probe: Probe, passes: list[list[str]], compiled: bool | None,
                   stream: Callable[[bool | None], tuple]):
        """``_in_passes`` over more than one pass."""
        layers = {info.name: info for info in self.discover(probe)}
        if compiled is None and self.compile is None:
            compiled = self.choose_kernels(self.values_per_measurement(list(layers.values()), len(probe)),
                                           self.device(probe))
        modules, noise_floor = self.modules, self.noise_floor
        done: dict[str, _Finalized] = {}
        accuracy = None
        try:
            for names in passes:
                wanted = {name.split("#")[0] for name in names}
                self.modules = [(name, module) for name, module in modules if name in wanted]
                self.noise_floor = noise_floor and INPUT_LAYER in wanted
                observers, measured = stream(compiled)
                accuracy = measured if accuracy is None else accuracy  # the same in every pass
                done.update((name, _Finalized(layers[name], o.finalize())) for name, o in observers.items())
                del observers  # this pass's states, before the next pass makes its own
        finally:
            self.modules, self.noise_floor = modules, noise_floor
        return {name: done[name] for name in layers if name in done}, accuracy

    def warm_up(self, probe: Probe) -> float:
        """Compile the fused updates this measurement needs, on a few probe samples (results discarded), and
        return the seconds compiling took (0 when eager or running the stored CPU kernels, or already compiled
        in this process). Later measurements reuse the kernels for every chunk size and layer. With error bars,
        one sample per shard: finalizing K shards is its own kernels (their number of shards is part of them)."""
        pool = block_pool.build() if self.memory_budget is not None and self.device(probe).type == "cpu" else 0.0
        if self.compile is fused.NATIVE:  # nothing to compile: the CPU kernels built (or loaded) now
            before = native.build_seconds()
            native.build_all()
            native.report_failure("the eager kernels")
            return native.build_seconds() - before + pool
        if self.compile is False or not fused.compile_available():
            return pool
        before = fused.compiled_seconds()
        on_cpu = self.device(probe).type == "cpu"
        count = self.shards(probe, self.classes(probe))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(NaN|inf) in the measures", RuntimeWarning)  # of a few samples
            size = max(count, 2)
            sample = Probe(probe.images[:size], None if probe.labels is None else probe.labels[:size])
            shards = [(k, k + 1) for k in range(count)] if count > 1 else None
            with self._keeping_states(on_cpu):  # (the first measurement reuses them)
                self.finalize(*self._stream_planned(sample, None, True, shards=shards), len(sample), None)
        heap.release_freed_memory()  # the warm-up's states: a whole measurement's, for two samples
        if on_cpu and self.memory_budget is None:  # (kept states: not under a budget)
            native.prepare_zero_fill()
        return fused.compiled_seconds() - before + pool

    def native_covered(self, device: torch.device) -> bool:
        """Whether native.py's CPU kernels do all of this measurement's per-chunk work on ``device``."""
        return (device.type == "cpu" and self.options.state_dtype == torch.float64 and self.positions is None
                and set(self.groups) <= NATIVE_GROUPS)

    def choose_kernels(self, values: int, device: torch.device, measurements: int = 1) -> bool | str:
        """``automatic_kernels`` for ``measurements`` of this measurement's groups on ``device``."""
        return automatic_kernels(values, measurements, native_covered=self.native_covered(device))

    def _compiled(self, probe_size: int, observers: dict[str, "_Observer"], device: torch.device) -> bool | str:
        """How to run the fused updates (True, False or ``fused.NATIVE``: ``automatic_kernels``), once the
        layers are known (after the first chunk)."""
        if self.compile is not None:
            return self.compile
        if not observers:  # the first chunk: layer sizes unknown yet
            return self.choose_kernels(0, device)
        values = probe_size * sum(m.units * m.T for o in observers.values() for m in o.measures.values())
        return self.choose_kernels(values, device)

    def values_per_measurement(self, layers: Sequence[LayerInfo], probe_size: int) -> int:
        """Activation values the statistics fold in per measurement (an estimate before measuring)."""
        units = sum(math.prod(info.unit_shape) for info in layers)
        return probe_size * len(self.transformations) * units * max(len(self.groups), 1)

    def _run_distributed(self, probe: Probe, classes: list[int] | None) -> MeasureResult:
        rank, world = distributed.process_group()
        # 1. Local checks, then agree that every rank can go on and measures the same thing.
        error = None
        try:
            self.check_probe(probe)
            classes = classes if classes is not None else self.classes(probe)
            self.passes(probe, classes)  # a budget too small: the ValueError, on every rank
        except Exception as caught:
            error = caught
        distributed.exchange_status(
            error,
            (
                self.transformations.id,
                self.measures,
                [name for name, _ in self.modules],
                [tuple(b.shape) for b in self.model.buffers()],
                len(probe),
                tuple(probe.images.shape[1:]),
                classes,
            ),
        )
        # 2. Under a memory budget, once per pass over the probe (every rank plans the same passes).
        observers, accuracy = self._in_passes(probe, classes, None, lambda compiled: self._stream_distributed(
            probe, classes, rank, world, compiled))
        # the derived BatchNorms' scales from the running statistics the ranks measured with: rank 0's
        with distributed.rank0_buffers(self.model) if self._derived else contextlib.nullcontext():
            return self.finalize(observers, accuracy, len(probe), classes)

    def _stream_distributed(self, probe: Probe, classes: list[int] | None, rank: int, world: int,
                            compiled: bool | None) -> tuple[dict[str, "_Observer"], AccuracyState | None]:
        """Each phase: stream this rank's part (with rank 0's buffers), agree on the outcome, merge. With
        error bars, the rank's part of every error-bar shard, the ranks' states merged at each shard's end."""
        error = None
        probe, bounds = self.interleaved(probe, classes)
        ranges = [[(lo + (hi - lo) * r // world, lo + (hi - lo) * (r + 1) // world) for lo, hi in bounds or [(0, len(probe))]]
                  for r in range(world)]
        own, shards, start = [], [], 0
        for lo, hi in ranges[rank]:
            own.append(torch.arange(lo, hi))
            shards.append((start, start + hi - lo))
            start += hi - lo
        order = torch.cat(own)
        part = Probe(probe.images[order], None if probe.labels is None else probe.labels[order])

        def counts_of(r_ranges: list[tuple[int, int]]) -> list[int]:
            labels = None if classes is None else torch.cat([probe.labels[lo:hi] for lo, hi in r_ranges])
            return [sum(hi - lo for lo, hi in r_ranges)] if classes is None else [int((labels == c).sum()) for c in classes]

        counts = [counts_of(r) for r in ranges]  # per rank, per class: samples streamed in all
        shard_counts = [[counts_of([r[k]]) for r in ranges] for k in range(len(shards))]  # per shard, rank, class
        observers: dict[str, _Observer] = {}
        accuracy = AccuracyState(len(self.transformations), self.device(probe)) if "accuracy" in self.measures else None

        def merge_shard(phase: str, k: int) -> None:
            distributed.exchange_status(None, ("shard", phase, k))  # a rank that failed mid-shard says so here
            for observer in observers.values():
                for m in observer.sharded(phase):
                    for c, states in enumerate(m.states(phase)):
                        for state in states:
                            distributed.merge_state(state, [per_rank[c] for per_rank in shard_counts[k]])

        with distributed.rank0_buffers(self.model):
            for phase in self.phases:
                try:
                    if bounds is not None and not observers:  # every rank takes part in every shard's merge
                        observers.update(self._empty_observers(probe, classes))
                    if len(part) or bounds is not None:
                        self.stream(part, classes, phase, observers, accuracy, compiled=compiled,
                                    shards=shards if bounds else None,
                                    on_shard_end=(lambda k, phase=phase: merge_shard(phase, k)) if bounds else None)
                    elif not observers:  # nothing to stream, but this rank holds (empty) states for the merges
                        observers.update(self._empty_observers(probe, classes))
                except Exception as caught:
                    error = caught
                distributed.exchange_status(
                    error, [(o.info.name, o.info.unit_shape, tuple(o.measures)) for o in observers.values()]
                )
                for observer in observers.values():
                    merged = observer.sharded(phase) if bounds is not None else []  # at each shard's end already
                    for m in observer.measures.values():
                        if phase in m.phases and m not in merged:
                            for k, states in enumerate(m.states(phase)):
                                for state in states:
                                    distributed.merge_state(state, [c[k] for c in counts])
                        m.finish(phase)
        if accuracy is not None:
            distributed.merge_accuracy(accuracy, len(probe))
        return observers, accuracy

    def _empty_observers(self, probe: Probe, classes: list[int] | None) -> dict[str, _Observer]:
        """Observers with zeroed states for every layer this pass observes (the modules of ``self.modules``,
        and the input under ``noise_floor``)."""
        device = self.device(probe)
        observed = {name for name, _ in self.modules} | ({INPUT_LAYER} if self.noise_floor else set())
        return {
            info.name: _Observer(info, self.groups, len(classes or [0]), self.transformations, device, self.options)
            for info in self.discover(probe) if info.name.split("#")[0] in observed
        }

    def stream(
        self,
        probe: Probe,
        classes: list[int] | None,
        phase: str,
        observers: dict[str, _Observer],
        accuracy: AccuracyState | None,
        groups: Sequence[str] | None = None,
        compiled: bool | None = None,
        all_labels: torch.Tensor | None = None,
        shards: Sequence[tuple[int, int]] | None = None,
        on_shard_end: Callable[[int], None] | None = None,
    ) -> None:
        """Forward the probe chunk by chunk for one phase, updating the states inside the hooks.

        Observers are created on the first chunk that meets a layer; ``groups`` (default: the measured
        ones) chooses which measure groups they hold; ``compiled`` overrides the ``compile`` setting;
        ``all_labels`` (default: the probe's) are checked against the model's classes after the first chunk.
        ``shards``: the probe's [lo, hi) ranges of error-bar shards (chunks never straddle two); after each,
        ``on_shard_end(shard)`` runs (the ranks' merge) and the measures close the shard.
        """
        model = self.model
        transformations = self.transformations if phase == TRANSFORMED else _UNTRANSFORMED
        T = len(transformations)
        groups = self.groups if groups is None else groups
        device = self.device(probe)
        dtype = _model_dtype(model)
        class_index = {c: i for i, c in enumerate(classes)} if classes is not None else None
        skipped: set[str] = set()
        chunk: Chunk | None = None
        scratch = Scratch()

        def on_output(name: str, module: nn.Module | None, output: object, inputs: tuple = ()) -> None:
            if name in skipped:
                return
            observer = observers.get(name)
            if observer is None:
                try:
                    output = output_tensor(output)
                    problem = None if output.dim() >= 1 and output.shape[0] == chunk.size * T else (
                        f"returns a batch of {output.shape[0] if output.dim() else 0} rows for {chunk.size * T} inputs"
                    )
                except TypeError as error:
                    problem = str(error)
                if problem is not None:
                    if self.explicit and module is not None:
                        raise LayerMeasureError(f"layer {name!r} ({type(module).__name__}) {problem}; it cannot be measured")
                    skipped.add(name)
                    return
                module_type = "Input" if module is None else type(module).__name__
                if output.is_complex():
                    raise LayerMeasureError(
                        f"layer {name!r} ({module_type}) returns {str(output.dtype).removeprefix('torch.')} values; "
                        "the measures are defined on real activations: leave the layer out with layers=, or "
                        "measure a module that takes its real part or magnitude"
                    )
                try:
                    info = self._layer_info(name, len(observers), module, module_type, tuple(output.shape[1:]))
                    observer = observers[name] = _Observer(
                        info, groups, len(classes or [0]), self.transformations, device, self.options
                    )
                    observer.reserve_shards(phase, len(shards))
                except ValueError as error:  # a measure cannot apply to this layer (e.g. its feature action)
                    raise LayerMeasureError(f"layer {name!r}: {error}") from error
            else:
                output = output_tensor(output)
            activation = output.detach() if output.requires_grad else output  # (no_grad: it never does)
            if activation.dtype not in (torch.float32, torch.float64):
                activation = activation.float()
            with fused.call_settings(chunk.compiled):
                relus.update(name, module, inputs, observer, phase, activation, chunk)

        images, n = probe.images, len(probe)
        shards = shards or [(0, n)]
        for observer in observers.values():  # (the layers found by this stream reserve theirs when found)
            observer.reserve_shards(phase, len(shards))
        labels = probe.labels
        all_labels = labels if all_labels is None else all_labels
        # The transformations run in the wider of the probe's and the model's dtypes, the model in its own:
        # a half / bfloat16 model gets a half / bfloat16 batch, interpolated in the probe's precision.
        work = images.dtype if dtype is None else torch.promote_types(images.dtype, dtype)
        forward = _eager_call(model)
        generator = lie.GENERATORS.get(phase)  # a forward-mode pass: the inputs carry d/dt g_t x as tangents
        relus = ReluPairs()
        kept = (self.kept_batches if phase == TRANSFORMED and device.type == "cpu" and self.memory_budget is None
                else None)
        with preserved_training_state(model), Capture(self.modules, on_output, with_inputs=True) as capture, \
                (lie.forward_mode(model) if generator else contextlib.nullcontext()) as running:
            first = True
            for shard, (start, end) in enumerate(shards):
                held = False
                for lo in range(start, end, self.batch_size):
                    hi = min(lo + self.batch_size, end)
                    use_compiled = compiled if compiled is not None else self._compiled(n, observers, device)
                    use_compiled = use_compiled if device.type != "meta" else False  # shapes only: nothing to run
                    pairing = self._pairs(phase, device, use_compiled, class_index, hi - lo)
                    held = pairing and not held and hi < end
                    chunk = Chunk(hi - lo, self._groups(labels, lo, hi, class_index, device), scratch, use_compiled,
                                  tuple(images.shape[-2:]) if images.dim() == 4 else None, hold=held, pairing=pairing)

                    def transformed(lo: int = lo, hi: int = hi) -> torch.Tensor:
                        batch = transformations.apply(images[lo:hi].to(device, work, non_blocking=True))
                        if generator is not None:
                            t = self.transformations
                            batch = forward_ad.make_dual(batch, generator.input_tangent(batch, t.interpolation,
                                                                                        t.padding))
                        return batch.to(dtype) if dtype is not None and batch.dtype != dtype else batch

                    batch = kept.batch(images, lo, hi, transformed) if kept is not None else transformed()
                    if self.noise_floor:
                        on_output(INPUT_LAYER, None, batch)
                    capture.start_forward()
                    try:
                        output = forward(batch)
                    except Exception as error:
                        if generator is not None and isinstance(error, NotImplementedError) and running:
                            raise ValueError(
                                f"{generator.group} differentiates the model in forward mode (torch.autograd.forward_ad), "
                                f"and module {running[-1]} runs an op that has no forward-mode derivative in this "
                                f"PyTorch: {error}"
                            ) from error
                        mine = isinstance(error, (LayerMeasureError, lie.TangentError))  # raised by a layer's measure
                        if mine or self._fits or not first:  # explain a first model failure
                            raise
                        raise ValueError(
                            f"the model could not run on the transformed probe batch of shape {list(batch.shape)} "
                            f"(probe samples shaped {list(images.shape[1:])}, {T} transformations): {error}"
                        ) from error
                    if first:
                        self._check_observed(observers, skipped)
                        self._fits = True
                        if "accuracy" in self.measures:
                            self._check_logits(output, batch.shape[0])
                        if "accuracy" in self.measures:  # (unless the default accuracy was just left out)
                            self._check_labels(all_labels, output.shape[1])
                    with fused.call_settings(chunk.compiled):
                        relus.flush(phase)
                    for observer in observers.values():
                        observer.after_forward(phase, chunk)
                    if accuracy is not None and phase == TRANSFORMED and "accuracy" in self.measures:
                        accuracy.update(output, labels[lo:hi].to(device, non_blocking=True))
                    first = False
                if len(shards) > 1:
                    self._close_shard(shard, phase, observers, on_shard_end)

    def _pairs(self, phase: str, device: torch.device, compiled: bool | str, class_index: dict | None,
               samples: int) -> bool:
        """Whether a chunk of ``samples`` may be the first of a pair (``Chunk.hold``; the next one in its shard
        the second): on CPU, where the CPU kernels run (``compiled``, not turned off), with one class, at most
        PAIRED_SAMPLES samples, and no memory budget (which counts one chunk's activations, not two)."""
        return (phase == TRANSFORMED and device.type == "cpu" and bool(compiled) and native.enabled()
                and class_index is None and samples <= PAIRED_SAMPLES and self.memory_budget is None)

    @staticmethod
    def _close_shard(shard: int, phase: str, observers: dict[str, _Observer],
                     on_shard_end: Callable[[int], None] | None) -> None:
        """The end of an error-bar shard: every measure of this phase that has error bars closes it."""
        if on_shard_end is not None:
            on_shard_end(shard)
        for observer in observers.values():
            for m in observer.sharded(phase):
                m.close_shard()

    def _layer_info(self, name: str, index: int, module: nn.Module | None, module_type: str,
                    unit_shape: tuple[int, ...]) -> LayerInfo:
        """How the measures read this output: tokens or channels first, and the patch grid of the layer's
        feature action (ValueError if its tokens do not fit the grid)."""
        tokens = is_token_output(module, unit_shape)
        grid = self.options.actions(name).grid(unit_shape[0]) if tokens else None
        return LayerInfo(name, index, module_type, unit_shape, tokens, grid,
                         sampled_positions(unit_shape, tokens, self.positions))

    @staticmethod
    def _groups(labels, lo, hi, class_index, device) -> list[tuple[int, torch.Tensor | None]]:
        if class_index is None:
            return [(0, None)]
        chunk_labels = labels[lo:hi].tolist()  # host tensor: no device synchronization
        rows: dict[int, list[int]] = {}
        for row, label in enumerate(chunk_labels):
            rows.setdefault(class_index[label], []).append(row)
        return [(k, torch.tensor(r, device=device)) for k, r in sorted(rows.items())]

    def _check_observed(self, observers: dict[str, _Observer], skipped: set[str]) -> None:
        if not observers:
            raise ValueError(
                "none of the selected layers produced a measurable tensor output "
                f"(skipped: {', '.join(sorted(skipped)) or 'none called'})"
            )
        if self.explicit:
            seen = {name.split("#")[0] for name in observers}
            missing = [name for name, _ in self.modules if name not in seen]
            if missing:
                raise ValueError(f"layer(s) {', '.join(missing)} were not called during the forward pass")

    def finalize(
        self,
        observers: dict[str, _Observer],
        accuracy: AccuracyState | None,
        num_samples: int,
        classes: list[int] | None,
    ) -> MeasureResult:
        """One host copy per activation; non-finite values are reported with a warning naming the layers.

        The states tell what went wrong, with no check on the chunk path: NaN in them means NaN or infinite
        activations (inf − inf is NaN too); inf without NaN means finite activations whose sums or squared
        deviations overflowed the activations' precision (float32 beyond ~1e19). (Components can also be NaN
        with finite states, e.g. a class without two samples; the outside of the equivariance error's disk is
        NaN by definition.)"""
        components: dict[str, dict] = {g: {} for g in self.groups}
        shards: dict[str, dict] = {g: {} for g in self.groups}
        nan_layers, inf_layers, other_layers = [], [], []
        for name, observer in observers.items():
            values_of, nan_states, inf_states = observer.finalize()
            for group, (names, values, shard_values) in values_of.items():
                components[group][name] = (names, values)
                if shard_values is not None:
                    shards[group][name] = shard_values
            if nan_states:
                nan_layers.append(name)
            elif inf_states:
                inf_layers.append(name)
            elif any(np.isnan(v).any() for g, (_, v, _) in values_of.items() if g not in self.masked_groups):
                other_layers.append(name)
        for layers, why in (
            (nan_layers, "the model produced NaN or infinite activations there; those units are reported as NaN"),
            (inf_layers, "their sums or squared deviations overflowed the activations' precision (float32: values "
                         "beyond ~1e19), so those units are inf or NaN; scale the probe (or the model's inputs) "
                         "down, or measure a float64 copy of the model"),
            (other_layers, "those units are reported as NaN"),
        ):
            if layers:
                what = "inf" if layers is inf_layers else "NaN"
                warnings.warn(f"{what} in the measures of layer(s) {', '.join(layers)}: {why}", RuntimeWarning,
                              stacklevel=caller.stacklevel())
        layers, derived_from = self._with_derived({name: o.info for name, o in observers.items()}, components, shards)
        return MeasureResult(
            layers,
            self.transformations,
            num_samples,
            components,
            accuracy.compute().cpu().numpy() if accuracy is not None and "accuracy" in self.measures else None,
            classes,
            masked_groups=self.masked_groups,
            shards={g: layers for g, layers in shards.items() if layers},
            derived=derived_from,
        )

    def _with_derived(self, infos: dict[str, LayerInfo], components: dict[str, dict], shards: dict[str, dict]
                      ) -> tuple[list[LayerInfo], dict[str, str]]:
        """Add the BatchNorms ``discover`` left out to ``components`` and ``shards`` (``derived.Derived``: each one's
        |s| kept, its input's components scaled when read); every layer in the network's order, and {BatchNorm:
        its input} of those added."""
        added: dict[str, str] = {}
        for name, (source, module_type) in self._derived.items():  # in the network's order: a source first
            if source in infos:  # (else its input did not run)
                infos[name] = dataclasses.replace(infos[source], name=name, module_type=module_type)
                added[name] = source
        if components and added:
            modules = dict(self._selected)
            scales = derived.scales([modules[name.split("#")[0]] for name in added])
            scaled = {name: (source, s) for (name, source), s in zip(added.items(), scales)}
            T = len(self.transformations)
            for group in components:
                names = GROUPS[group].components
                components[group] = derived.Derived(components[group], scaled, names, T)
                shards[group] = derived.Derived(shards[group], scaled, names, T, replicates=True)
        ordered = sorted(infos.values(), key=lambda info: self._order.get(info.name, len(self._order)))
        return [dataclasses.replace(info, index=index) for index, info in enumerate(ordered)], added

    @property
    def masked_groups(self) -> tuple[str, ...]:
        """Groups whose values are NaN by definition at excluded positions."""
        return ("equivariance_error",) if self.options.disk else ()
