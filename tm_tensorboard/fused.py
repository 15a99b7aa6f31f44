"""Fused per-chunk updates: one function of tensors per measure group, run eagerly or compiled.

Each measure group writes its per-chunk update once, in torch ops (``statistics.fold_*``). Run eagerly,
it is vectorized: a constant number of ops whatever T and the chunk size. Run through ``torch.compile``
(Inductor), it becomes one compiled region of a few fused kernels that read the activations once or
twice. Shapes are compiled symbolically (batch, units, T, feature-map size), so one compilation serves
every layer of a given rank and every chunk size; Inductor caches it on disk for later processes too.

Compiling costs seconds once per process, so it is used when it pays (``engine.compile_pays``). A
compiler that is missing or fails warns once and the eager path takes over for the rest of the process:
a measurement never fails because of the compiler, and both paths give the same numbers up to float
rounding.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from typing import Callable, Iterator

import torch

__all__ = ["FusedFunction", "fused", "compiling", "compile_available", "compiled_seconds", "mode_from_environment"]

ENVIRONMENT_VARIABLE = "TM_TENSORBOARD_COMPILE"


class _Compiler:
    """Process-wide state of torch.compile for the fused updates."""

    def __init__(self):
        self.failed: str | None = None  # why compiling was given up, once it was
        self.seconds = 0.0  # time spent in calls that compiled

    def give_up(self, error: BaseException) -> None:
        self.failed = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        warnings.warn(
            "tm_tensorboard: torch.compile could not build the fused measurement kernels, so measuring goes "
            f"on with the eager kernels (same numbers, slower) for the rest of this process: {self.failed}",
            RuntimeWarning,
            stacklevel=4,
        )


_COMPILER = _Compiler()


def compile_available() -> bool:
    """False once compiling failed in this process (the eager kernels run instead)."""
    return _COMPILER.failed is None and hasattr(torch, "compile")


def compiled_seconds() -> float:
    """Seconds spent compiling fused updates in this process so far."""
    return _COMPILER.seconds


def mode_from_environment() -> bool | None:
    """The ``compile`` default from TM_TENSORBOARD_COMPILE: 1 (always), 0 (never), unset or auto (when it pays)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    modes = {"": None, "auto": None, "1": True, "true": True, "0": False, "false": False}
    if value not in modes:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: use 1 (compile), 0 (eager) or auto")
    return modes[value]


_PATCHES: list = []  # the compiler settings below, built once
_ACTIVE = threading.local()  # whether this thread is inside compiling()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """The compiler settings of the fused functions, around our compiled calls only (they are
    thread-local, and the model's own forward, perhaps compiled by its user, runs outside them): sizes
    compile symbolically without specializing on 0 / 1 or on equal sizes (a one-sample chunk, a 1×1 map
    and a square map reuse the general kernel), a few graphs per function are allowed (one per
    activation rank and dtype), and Inductor compiles in this process instead of starting worker
    processes that would compete with training for the CPU. Entering the settings costs ~25-40 µs, as
    much as a small compiled call, so a layer's hook enters them once for all its measure groups' calls;
    nested, this is free."""
    if getattr(_ACTIVE, "inside", False):
        yield
        return
    if not _PATCHES:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        _PATCHES.extend([
            fx_config.patch(backed_size_oblivious=True, use_duck_shape=False),
            dynamo_config.patch(recompile_limit=32),
            inductor_config.patch(compile_threads=1),
        ])
    with contextlib.ExitStack() as stack:
        for patch in _PATCHES:
            stack.enter_context(patch)
        _ACTIVE.inside = True
        try:
            yield
        finally:
            _ACTIVE.inside = False


class FusedFunction:
    """A function of tensors and sizes, ``fn(*args, scratch=...)``: a per-chunk update that mutates its
    state tensors in place, or a finalization that returns a tensor.

    ``f(compiled, *args, scratch=scratch)``: the compiled region when ``compiled`` (and the compiler
    works), else the eager function with its scratch buffer.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Callable | None = None

    def __call__(self, compiled: bool, *args, scratch=None):
        if compiled and compile_available():
            try:
                return self._run_compiled(args)
            except Exception as error:  # any compiler failure: never fail the measurement for it
                _COMPILER.give_up(error)
        return self.fn(*args, scratch=scratch)

    def _run_compiled(self, args: tuple):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        start = time.perf_counter()
        graphs_before = _graph_count()
        with compiling():
            out = self._compiled(*args, scratch=None)
        if _graph_count() != graphs_before:
            _COMPILER.seconds += time.perf_counter() - start
        return out


def _graph_count() -> int:
    """Graphs Dynamo has compiled in this process (a call that adds one compiled)."""
    from torch._dynamo.utils import counters  # imported by torch.compile already: a lookup, not an import

    return counters["stats"]["unique_graphs"]


def fused(fn: Callable) -> FusedFunction:
    """Decorator: make ``fn`` a FusedFunction."""
    return FusedFunction(fn)
