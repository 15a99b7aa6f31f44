"""Assertions for test suites: is a model, or one layer, equivariant / invariant to a transformation set?

``assert_equivariant(model, transformations)`` checks ψ(φ(g x)) = g ψ(φ(x)) for every observed layer φ and
every transformation g; ``assert_invariant`` checks φ(g x) = φ(x). Both run the model in eval mode without
autograd on given inputs or on seeded random ones, compare element-wise like ``torch.testing.assert_close``
(|a − b| <= atol + rtol·|b|) and raise ``AssertionError`` naming the worst layer, channel and
transformation, so a developer of equivariant layers can put them in pytest.

The comparison moves the transformed features back, g⁻¹ ψ(φ(g x)) against ψ(φ(x)), with the same exact
inverses as the measures (``FeatureAction.undo``). It is exact for transformations that permute pixels
(``rot90()``, ``flips()``, their products): there only float rounding separates an equivariant network
from perfect agreement. Interpolated transformations (``rotations(8)``, scalings, sub-pixel translations)
make no network exactly equivariant; check those with a tolerance that fits the interpolation error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .actions import FeatureAction
from .capture import Capture, LayerSelector, output_tensor, select_modules, unwrap
from .engine import _action_lookup, _model_device, check_model_and_transformations
from .preserve import preserved_training_state
from .transforms import TransformationSet

__all__ = ["assert_equivariant", "assert_invariant"]

# Defaults. An equivariant float32 network still differs from exact agreement by rounding (a conv of
# rot90(x) sums its products in another order). On the p4 example networks (5 p4 convolutions of up to 256
# real channels on 32-128 px, BatchNorm with trained-like running variances) errors reached 1e-5 absolute
# and 4e-5 relative: up to half of what atol = 1e-5, rtol = 1e-4 allow, and at most 7% of what
# atol = rtol = 1e-4 allow. A broken equivariance moves features by a sizeable fraction of their magnitude
# (>= 1e-2 for unit-scale activations), far above either.
ATOL = 1e-4
RTOL = 1e-4
RANDOM_SAMPLES, RANDOM_SIZE = 2, 32  # random inputs of an inferred shape: N, and H = W
TABLE_ROWS = 5  # failing (layer, transformation, channel) triples listed under the first line
MODEL = "model"  # the layer name of the model's own output (select_modules' name for the root module)


def assert_equivariant(
    model: nn.Module,
    transformations: TransformationSet,
    inputs: torch.Tensor | None = None,
    *,
    action: FeatureAction | Mapping[str, FeatureAction] | None = None,
    layers: LayerSelector = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> None:
    """Assert ψ(φ(g x)) = g ψ(φ(x)) for every observed layer φ and every transformation g in the set.

    ``layers``: module names, glob patterns or types as in ``measure``. By default the model's output
    (layer ``"model"``), which is what testing one equivariant layer or block needs; with an action
    mapping, the layers its patterns select. Every observed layer must output feature maps [N, C, H, W],
    or tokens [N, tokens, D] under a ``patch_grid`` action (check logits with ``assert_invariant``); a
    layer returning a tuple is checked on its first tensor.
    ``action``: how g acts on a layer's features (``tm_tensorboard.actions``): one for all layers, or
    {layer name or glob pattern: action} as in ``measure(actions=...)``, e.g. ``{"features.*":
    cyclic_shift(4)}``; unmatched layers get ``identity()`` (g moves positions only).
    ``inputs``: a batch [N, C, H, W]. Without it, standard-normal samples of ``input_shape`` drawn from
    ``seed`` (the global RNG is untouched) in the model's dtype and on its device; without
    ``input_shape`` either, 2 × C × 32 × 32 with C the ``in_channels`` of the first module that has one.
    ``atol``, ``rtol``: every element must satisfy |a − b| <= atol + rtol·|b| (b from the untransformed
    input); the defaults leave room for float32 rounding (see ATOL).

    Raises AssertionError whose first line names the layer, channel (of ψ's output) and transformation
    with the largest error outside the tolerance, followed by the worst few (layer, transformation,
    channel) and the first failing layer in forward order: usually where equivariance breaks, as later
    layers inherit its error. Raises a one-line TypeError / ValueError for arguments it cannot check.
    """
    __tracebackhide__ = True  # pytest shows the caller's line
    actions, layers = _actions(action, layers)
    check = _Check(model, transformations, inputs, layers, atol, rtol, input_shape, seed, actions)
    message = check.run()
    if message:
        raise AssertionError(message)


def assert_invariant(
    model: nn.Module,
    transformations: TransformationSet,
    inputs: torch.Tensor | None = None,
    *,
    layers: LayerSelector = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> None:
    """Assert φ(g x) = φ(x) for every observed layer φ and every transformation g in the set.

    ``layers``: as in ``assert_equivariant``, default the model's output (layer ``"model"``); outputs of
    any shape (logits, feature maps, embeddings). ``inputs``, ``input_shape``, ``seed``, ``atol``,
    ``rtol`` and the errors as in ``assert_equivariant``; the "channel" a failure names is the index along
    the output's second dimension (for logits, the class).
    """
    __tracebackhide__ = True
    check = _Check(model, transformations, inputs, layers, atol, rtol, input_shape, seed, None)
    message = check.run()
    if message:
        raise AssertionError(message)


def _actions(action: object, layers: LayerSelector) -> tuple[Callable[[str], FeatureAction], LayerSelector]:
    """The per-layer action lookup and the layers to observe (an action mapping's patterns by default)."""
    if action is None or isinstance(action, FeatureAction):
        return _action_lookup(action), layers
    if not isinstance(action, Mapping) or not all(
        isinstance(p, str) and isinstance(a, FeatureAction) for p, a in action.items()
    ):
        raise TypeError(
            "action must be a FeatureAction such as tm_tensorboard.actions.cyclic_shift(4) or a "
            f"{{layer name or glob pattern: FeatureAction}} mapping; got {type(action).__name__}"
        )
    if not action:
        raise ValueError("action={} names no layers; pass one FeatureAction or {pattern: action} pairs")
    return _action_lookup(action), list(action) if layers is None else layers


class _LayerError(ValueError):
    """A selected layer cannot be compared (raised inside a forward hook; not wrapped as a model failure)."""


@dataclass(frozen=True)
class _Failure:
    """The element with the largest error outside the tolerance in one (layer, transformation, channel)."""

    layer: str
    order: int  # the layer's position in the forward pass
    transformation: str
    channel: int | None
    error: float
    allowed: float
    severity: float  # the error, NaN counted as +inf (the sort key)


class _Check:
    """One validated comparison: the inputs, the observed modules and how features are compared."""

    def __init__(self, model, transformations, inputs, layers, atol, rtol, input_shape, seed, actions):
        check_model_and_transformations(model, transformations)
        for name, value in (("atol", atol), ("rtol", rtol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.model = unwrap(model)
        self.transformations = transformations
        self.atol, self.rtol = float(atol), float(rtol)
        self.actions = actions  # None: invariance
        if layers is None:
            self.modules = [(MODEL, self.model)]
        else:
            self.modules = select_modules(self.model, layers)[0]
        self.inputs, self.origin = self._inputs(inputs, input_shape, seed)
        transformations.check_input(self.inputs.shape)

    @property
    def what(self) -> str:
        return "invariant" if self.actions is None else "equivariant"

    def _inputs(self, inputs, input_shape, seed) -> tuple[torch.Tensor, str]:
        """The batch to check and where it came from (for error messages)."""
        device = _model_device(self.model, torch.device("cpu"))
        if inputs is not None:
            if input_shape is not None:
                raise ValueError("pass inputs= or input_shape=, not both")
            if not isinstance(inputs, torch.Tensor):
                raise TypeError(f"inputs must be a tensor [N, C, H, W], got {type(inputs).__name__}")
            if inputs.dim() < 1 or inputs.shape[0] < 1:
                raise ValueError(f"inputs must be a batch with at least one sample, got shape {list(inputs.shape)}")
            return inputs.to(device), "the given inputs"
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if input_shape is None:
            channels = next(
                (m.in_channels for m in self.model.modules() if isinstance(getattr(m, "in_channels", None), int)), None
            )
            if channels is None:
                raise ValueError(
                    f"cannot infer the input shape of {type(self.model).__name__} (no module has in_channels); "
                    "pass inputs= or input_shape=(N, C, H, W)"
                )
            shape, origin = (RANDOM_SAMPLES, channels, RANDOM_SIZE, RANDOM_SIZE), "inferred from in_channels"
        else:
            shape, origin = tuple(input_shape), "input_shape"
            if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
                raise ValueError(f"input_shape must be positive ints (N, C, H, W), got {input_shape!r}")
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        generator = torch.Generator().manual_seed(seed)  # drawn in float64: the same values in every dtype
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        return x, f"random inputs of shape {list(shape)} ({origin})"

    def run(self) -> str | None:
        """Forward the inputs and their transformations; the failure message, or None if all agree."""
        b, T = self.inputs.shape[0], len(self.transformations)
        references: dict[str, torch.Tensor] = {}
        module_types: dict[str, str] = {}
        failures: list[_Failure] = []
        compared = 0

        def keep_reference(name: str, module: nn.Module, output: object) -> None:
            output = self._batch(name, module, output, b)
            module_types.setdefault(name, type(module).__name__)
            references[name] = self._features(name, output).clone()  # later in-place ops must not alter it

        def compare(name: str, module: nn.Module, output: object) -> None:
            nonlocal compared
            output = self._batch(name, module, output, b * T)
            if name not in references:
                raise _LayerError(f"layer {name!r} ran on the transformed inputs only; cannot compare it")
            moved = self._moved_back(name, self._features(name, output))
            expected = references[name]
            if moved.shape[1:] != expected.shape[1:]:
                raise _LayerError(
                    f"layer {name!r}: output shape {list(moved.shape[1:])} on transformed inputs differs from "
                    f"{list(expected.shape[1:])} on the inputs; cannot compare them"
                )
            order = list(references).index(name)
            failures.extend(self._failures(name, order, moved, expected))
            compared += T * (expected.shape[1] if expected.dim() > 1 else 1)

        with preserved_training_state(self.model):
            self._forward(self.inputs, keep_reference, "")
            self._forward(self.transformations.apply(self.inputs), compare, "the transformations of ")
        missing = [name for name, _ in self.modules if name not in references]
        if missing:
            raise ValueError(f"layer(s) {', '.join(missing)} were not called during the forward pass")
        return self._message(failures, compared, module_types) if failures else None

    def _forward(self, x: torch.Tensor, callback, what: str) -> None:
        with Capture(self.modules, callback) as capture:
            capture.start_forward()
            try:
                self.model(x)
            except _LayerError as error:
                raise ValueError(str(error)) from None  # one line, without the hook's frames
            except Exception as error:
                raise ValueError(f"the model could not run on {what}{self.origin}: {error}") from error

    def _batch(self, name: str, module: nn.Module, output: object, rows: int) -> torch.Tensor:
        """The layer's output (a tuple's first tensor) as a tensor of ``rows`` samples, or a one-line ValueError."""
        try:
            output = output_tensor(output)
        except TypeError as error:
            raise _LayerError(f"layer {name!r} ({type(module).__name__}) {error}") from None
        if output.dim() < 1 or output.shape[0] != rows:
            raise _LayerError(
                f"layer {name!r} ({type(module).__name__}) returns shape {list(output.shape)} for a batch of "
                f"{rows}; it must keep one row per sample"
            )
        return output

    def _features(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """ψ(output) for equivariance (checking that the layer has feature maps the action fits), else output."""
        if self.actions is None:
            return output
        action = self.actions(name)
        try:
            tokens = output.dim() == 3 and action.grid(output.shape[1]) is not None
            if output.dim() == 4 or tokens:
                action.check(output.shape[2 if tokens else 1], self.transformations)
        except ValueError as error:
            raise _LayerError(f"layer {name!r}: {error}") from None
        if output.dim() != 4 and not tokens:
            raise _LayerError(
                f"layer {name!r} outputs shape {list(output.shape)}, not feature maps [N, C, H, W] (or tokens "
                "[N, tokens, D] with a patch_grid action); equivariance needs them (choose layers=..., or use "
                "assert_invariant for logits)"
            )
        return action.psi(output)

    def _moved_back(self, name: str, features: torch.Tensor) -> torch.Tensor:
        return features if self.actions is None else self.actions(name).undo(features, self.transformations)

    def _failures(self, name: str, order: int, actual: torch.Tensor, expected: torch.Tensor) -> list[_Failure]:
        """For every (transformation, channel) with elements outside the tolerance, the one with the largest error.

        actual: [b·T, C, ...], row i·T + t from transformation t of sample i; expected: [b, C, ...].
        """
        b, T = expected.shape[0], len(self.transformations)
        channels = expected.shape[1] if expected.dim() > 1 else 1
        dtype = torch.promote_types(expected.dtype, torch.float32)
        a = actual.to(dtype).reshape(b, T, channels, -1)
        e = expected.to(dtype).reshape(b, 1, channels, -1)
        error = torch.where(a == e, 0.0, (a - e).abs())  # equal infinities agree; NaN never does
        allowed = (self.atol + self.rtol * e.abs().nan_to_num(posinf=0.0)).expand_as(error)
        # The error of elements outside the tolerance (NaN as +inf), -1 inside: the worst is the largest.
        severity = torch.where(error <= allowed, -1.0, error.nan_to_num(nan=math.inf, posinf=math.inf))

        def per_triple(t: torch.Tensor) -> torch.Tensor:  # [b, T, C, n] -> [T, C, b·n]
            return t.permute(1, 2, 0, 3).reshape(T, channels, -1)

        worst = per_triple(severity).argmax(dim=2, keepdim=True)
        worst_severity = per_triple(severity).gather(2, worst).squeeze(2)
        failing = (worst_severity >= 0).nonzero().tolist()
        if not failing:
            return []
        worst_error = per_triple(error).gather(2, worst).squeeze(2)
        worst_allowed = per_triple(allowed).gather(2, worst).squeeze(2)
        labels = self.transformations.labels
        return [
            _Failure(
                name, order, labels[t], c if expected.dim() > 1 else None,
                worst_error[t, c].item(), worst_allowed[t, c].item(), worst_severity[t, c].item(),
            )
            for t, c in failing
        ]

    def _message(self, failures: list[_Failure], compared: int, module_types: dict[str, str]) -> str:
        failures = sorted(failures, key=lambda f: -f.severity)
        worst = failures[0]
        lines = [
            f"not {self.what}: layer {worst.layer!r} ({module_types[worst.layer]}), {_channel(worst)}, "
            f"transformation {worst.transformation!r}: |error| {worst.error:.3g} > {worst.allowed:.3g} allowed "
            f"(atol={self.atol:g}, rtol={self.rtol:g})",
            f"{len(failures)} of {compared} (layer, transformation, channel) fail; the worst:",
        ]
        rows = [(f.layer, f.transformation, "-" if f.channel is None else str(f.channel), f"{f.error:.3g}",
                 f"{f.allowed:.3g}") for f in failures[:TABLE_ROWS]]
        header = ("layer", "transformation", "channel", "|error|", "allowed")
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        layers = sorted({f.layer: f.order for f in failures}.items(), key=lambda item: item[1])
        first = layers[0][0]
        lines.append(
            f"first failing layer in forward order: {first!r} ({module_types[first]}); "
            f"{len(layers)} failing layer(s): {_names([name for name, _ in layers])}"
        )
        if self.actions is not None:
            actions = sorted({repr(self.actions(name)) for name, _ in layers})
            lines.append(
                f"compared g⁻¹ ψ(φ(g x)) with ψ(φ(x)) under action {', '.join(actions)} on {self.origin}"
            )
        else:
            lines.append(f"compared φ(g x) with φ(x) on {self.origin}")
        return "\n".join(lines)


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _channel(failure: _Failure) -> str:
    return "one value per sample" if failure.channel is None else f"channel {failure.channel}"
