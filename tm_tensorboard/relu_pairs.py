"""A ReLU right after an observed layer: its states folded from that layer's output in the same pass (CPU).

Convolution then ReLU is the commonest pair of observed layers, and invariance's CPU kernel spends much of its time
reading each output from memory (``native.py``). A ReLU's output is max(x, 0) of its input: where an ``nn.ReLU``
(not in place, no hooks but the measurement's) takes, unchanged, the output the observed layer before it just gave,
that layer's update waits for the ReLU's hook, and one kernel call folds both (``native.relu_update``, or
``relu_both_update`` with per_transformation: the same numbers as two calls, the ReLU's own output never read). A
pair is folded so once it was seen in WATCHED_FORWARDS chunks; an output then changed in place before its ReLU took
it raises (the update that waited would read other values). Only layers measured for invariance, or invariance and
per_transformation, where the CPU kernels run, with one class and chunks not kept in pairs (``Chunk.hold``):
elsewhere every layer updates as before (benchmarks/README.md, "ReLU pairs").
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import native
from .layer_measures import TRANSFORMED, Chunk, InvarianceErrorMeasure, VarianceMeasure, update_with_relu

__all__ = ["WATCHED_FORWARDS", "ReluPairs"]

WATCHED_FORWARDS = 2  # chunks in which a ReLU must take a layer's output before their updates are folded together


@dataclass
class _Output:
    """An observed layer's output in this forward: its observer (``engine._Observer``), the output (a weak
    reference while it is only watched), its version when observed, its chunk."""

    name: str
    observer: Any
    output: Callable[[], torch.Tensor | None]
    version: int
    chunk: Chunk


class ReluPairs:
    """One stream's layers whose output a ReLU takes next: learned from the chunks, then folded with the ReLU's."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], int] = {}
        self._leading: set[str] = set()  # layers whose output their ReLU took in WATCHED_FORWARDS chunks
        self._last: _Output | None = None  # the latest observed output (updated), watched
        self._waiting: _Output | None = None  # a leading layer's output, its update waiting for its ReLU

    def update(self, name: str, module: nn.Module | None, inputs: tuple, observer: Any, phase: str,
               activation: torch.Tensor, chunk: Chunk) -> None:
        """``observer.update(phase, activation, chunk)``; or, for a leading layer, that update held for the ReLU
        that takes ``activation`` next; or, for that ReLU, both folded in one pass over its input."""
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            if self._takes(waiting, module, inputs, observer, activation):
                _fold(waiting, observer, activation, chunk, phase)
                return
            _release(waiting, phase)
        last, self._last = self._last, None
        if last is not None and self._takes(last, module, inputs, observer, activation):
            key = (last.name, name)
            self._seen[key] = seen = self._seen.get(key, 0) + 1
            if seen >= WATCHED_FORWARDS:
                self._leading.add(last.name)
        if not _foldable(observer, phase, activation, chunk):
            observer.update(phase, activation, chunk)
            return
        if name in self._leading:
            self._waiting = _Output(name, observer, lambda output=activation: output, activation._version, chunk)
            return
        observer.update(phase, activation, chunk)
        self._last = _Output(name, observer, weakref.ref(activation), activation._version, chunk)

    def flush(self, phase: str) -> None:
        """After each forward: an update still waiting for a ReLU this forward did not reach, made now."""
        self._last = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            _release(waiting, phase)

    @staticmethod
    def _takes(before: _Output, module: nn.Module | None, inputs: tuple, observer: Any,
               activation: torch.Tensor) -> bool:
        """Whether ``module`` is a ReLU that took ``before``'s output as it was observed, and its own output
        (``activation``, ``observer``'s) can be folded from it."""
        output = before.output()
        return (type(module) is nn.ReLU and not module.inplace and len(module._forward_hooks) == 1
                and not module._forward_pre_hooks and not nn.modules.module._global_forward_hooks
                and not nn.modules.module._global_forward_pre_hooks and len(inputs) == 1
                and output is not None and inputs[0] is output and output._version == before.version
                and observer.measures.keys() == before.observer.measures.keys()
                and _foldable_measure(observer, activation))


_FOLDED = {"invariance": VarianceMeasure, "per_transformation": InvarianceErrorMeasure}


def _foldable_measure(observer: Any, activation: torch.Tensor) -> bool:
    """Whether the observer's measure groups are invariance, or invariance and per_transformation (measured
    together: ``layer_measures.update_together``), of one class, reading ``activation``'s units as they lie
    (``as_it_lies``, which chooses their order on a layer's first chunk)."""
    measures = observer.measures
    return ("invariance" in measures and all(type(m) is _FOLDED.get(g) for g, m in measures.items())
            and all(len(m.per_class) == 1 and m.as_it_lies(activation) is activation for m in measures.values()))


def _foldable(observer: Any, phase: str, activation: torch.Tensor, chunk: Chunk) -> bool:
    """Whether this update may wait for a ReLU or be folded with it: the transformed phase, where the CPU kernels
    run, float32 on CPU, one class, the chunk not kept for a pair."""
    return (phase == TRANSFORMED and bool(chunk.compiled) and not chunk.pairing and len(chunk.groups) == 1
            and chunk.groups[0][1] is None and activation.dtype is torch.float32 and activation.is_cpu
            and _foldable_measure(observer, activation) and native.enabled())


def _fold(waiting: _Output, observer: Any, activation: torch.Tensor, chunk: Chunk, phase: str) -> None:
    """The waiting layer's updates and its ReLU's (``observer``, its output ``activation``) made together."""
    waiting.observer.compiled = observer.compiled = chunk.compiled  # (as ``_Observer.update`` records)
    output = waiting.output()
    if not update_with_relu(waiting.observer.measures, observer.measures, output, activation, chunk):
        waiting.observer.update(phase, output, chunk)
        observer.update(phase, activation, chunk)


def _release(waiting: _Output, phase: str) -> None:
    """The waiting update made alone: its ReLU did not come next in this forward."""
    output = waiting.output()
    if output._version != waiting.version:
        raise RuntimeError(
            f"tm_tensorboard: the output of layer {waiting.name!r} was changed in place after it was observed, though "
            f"not in the first chunks, where the ReLU after it took it unchanged: its update waited for that ReLU's; "
            f"measure with {native.ENVIRONMENT_VARIABLE}=0"
        )
    waiting.observer.update(phase, output, waiting.chunk)
