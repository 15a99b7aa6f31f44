"""Fused per-chunk updates: one function of tensors per measure group, run eagerly or compiled.

Each measure group writes its per-chunk update once, in torch ops (``statistics.fold_*``). Run eagerly,
it is vectorized: a constant number of ops whatever T and the chunk size. Run through ``torch.compile``
(Inductor), it becomes one compiled region of a few fused kernels that read the activations once or
twice. Shapes are compiled symbolically (batch, units, T, feature-map size), so one compilation serves
every layer of a given rank and every chunk size. The graphs are compiled ahead of time and called
directly (no Dynamo frame evaluation per call: the host's time, not the launches, is what a chunk of
small kernels waits on), and stored on disk for later processes.

Compiling costs seconds once per process, so it is used when it pays (``engine.compile_pays``). ``NATIVE``
runs ``native``'s CPU kernels where they apply and the eager functions elsewhere, no graph: what
``compile=None`` runs on CPU where those kernels do all the per-chunk work (as fast as with the graphs
besides them, and built once per machine), and elsewhere where compiling does not pay and they were built
(``engine.automatic_kernels``). A
compiler that is missing or fails warns once and the eager path takes over for the rest of the process:
a measurement never fails because of the compiler, and both paths give the same numbers up to float
rounding.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import caller, native

__all__ = ["FusedFunction", "fused", "compiling", "call_settings", "compile_available", "compiled_seconds",
           "mode_from_environment", "NATIVE"]

ENVIRONMENT_VARIABLE = "TM_TENSORBOARD_COMPILE"
# ``compiled`` of a fused call: True (the CPU kernels, else the compiled graphs), False (eager), or this: the
# CPU kernels where they apply, else eager (no graph compiled or loaded)
NATIVE = "native"


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
            stacklevel=caller.stacklevel(),
        )


_COMPILER = _Compiler()


def compile_available() -> bool:
    """False once compiling failed in this process (the eager kernels run instead)."""
    return _COMPILER.failed is None and hasattr(torch, "compile")


def compiled_seconds() -> float:
    """Seconds spent compiling fused updates (and building the native kernel) in this process so far."""
    return _COMPILER.seconds + native.build_seconds()


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
    much as a small compiled call, so a hook enters them once for all its layer's calls (``call_settings``);
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


def call_settings(compiled: bool | str) -> contextlib.AbstractContextManager:
    """What a layer's hook enters around its measure groups' fused calls: nothing when they run eagerly or
    by graphs compiled ahead of time (compiling one enters the settings itself), else, for Dynamo's calls,
    the compiler settings, once for all of them."""
    return compiling() if compiled is True and _AHEAD.failed is not None else contextlib.nullcontext()


class FusedFunction:
    """A function of tensors and sizes, ``fn(*args, scratch=...)``: a per-chunk update that mutates its
    state tensors in place, or a finalization that returns a tensor.

    ``f(compiled, *args, scratch=scratch)``: when ``compiled`` (True or ``NATIVE``), a hand-written ``native``
    kernel where one takes the arguments (it returns False where it does not apply: ``native.py``), else
    (``compiled`` True, the compiler works and no dispatch mode is active) a graph compiled ahead of time whose
    guards the arguments pass (or, where that is unavailable, Dynamo's compiled region), else the eager function
    with its scratch buffer.
    """

    def __init__(self, fn: Callable, native: Callable[..., bool] | None = None):
        self.fn = fn
        self.native = native
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Callable | None = None
        self._ahead: dict[tuple, list] = {}  # per kind of arguments, the graphs compiled ahead of time for it
        self._served: dict[tuple, Callable] = {}  # per kind and sizes of arguments, the graph that served them

    def __call__(self, compiled: bool | str, *args, scratch=None):
        if compiled and self.native is not None and self.native(*args):
            return None
        if compiled is NATIVE and self.native is not None:
            native.report_failure("the eager kernels")  # one that failed to build (no graph here says so)
        if compiled is True and compile_available() and not _in_dispatch_mode():
            try:
                out = self._run_compiled(args)
                native.report_failure()  # a native kernel that failed to build where Inductor's code builds
                return out
            except Exception as error:  # any compiler failure: never fail the measurement for it
                _COMPILER.give_up(error)
        return self.fn(*args, scratch=scratch)

    def _run_compiled(self, args: tuple):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        graph = self._ahead_of_time(args)
        if graph is not None:
            return graph(*args, scratch=None)
        start = time.perf_counter()
        graphs_before = _graph_count()
        with compiling():
            out = self._compiled(*args, scratch=None)
        if _graph_count() != graphs_before:
            _COMPILER.seconds += time.perf_counter() - start
        return out

    def _ahead_of_time(self, args: tuple) -> Callable | None:
        """The graph compiled ahead of time (``aot_compile``) whose guards these arguments pass, compiled now
        if none does yet; None where that is not available (then Dynamo's call serves). Called directly,
        a graph costs the host ~40 µs a call where Dynamo's frame evaluation took ~100 µs (on a GPU the
        host's time per layer and chunk, not the launches, is what a chunk waits on)."""
        if _AHEAD.failed is not None:
            return None
        kind = _kind(args)
        start = time.perf_counter()
        try:
            graphs = self._ahead.get(kind)
            if graphs is None:  # this process's first call of this kind: the graphs an earlier one stored
                with _torch_deprecations_ignored():
                    graphs = self._ahead[kind] = _AHEAD.load(self.fn, kind)
                _COMPILER.seconds += time.perf_counter() - start
            sizes = _sizes(args) if len(graphs) > 1 else None
            served = self._served.get((kind, sizes)) if sizes is not None else None
            if served is not None and served.guard_check(*args, scratch=None):
                return served
            for graph in graphs:
                if graph is not served and graph.guard_check(*args, scratch=None):
                    if sizes is not None:
                        self._remember(kind, sizes, graph)
                    return graph
            if len(graphs) >= AHEAD_OF_TIME_GRAPHS:
                return None
            start = time.perf_counter()
            with compiling(), _torch_deprecations_ignored():
                graph = self._compiled.aot_compile((args, {"scratch": None}))
            graph.disable_guard_check()  # checked here, before each call
            _COMPILER.seconds += time.perf_counter() - start
            if not graph.guard_check(*args, scratch=None):
                return None
        except Exception as error:  # an older torch, or arguments it cannot compile so: Dynamo's call serves
            _AHEAD.failed = f"{type(error).__name__}: {error}"
            return None
        graphs.append(graph)
        _AHEAD.store(self.fn, kind, len(graphs) - 1, graph)
        return graph

    def _remember(self, kind: tuple, sizes: tuple, graph: Callable) -> None:
        """Check ``graph`` first for arguments of this kind and these sizes from now on: where one kind has
        several graphs, their guards split sizes (on ResNet18Style, a graph of invariance's update for layers of
        8,192 units or more and one for smaller layers), and a guard check that fails costs the host ~14 µs."""
        if len(self._served) >= SERVED_SIZES:
            self._served.clear()
        self._served[(kind, sizes)] = graph


class _AheadOfTime:
    """Graphs compiled ahead of time, and their store on disk: compiling one ahead of time bypasses
    Inductor's caches (~3 s a graph in every process, where Dynamo's call of a graph Inductor had cached
    compiled in 0.6 s), while loading a stored one takes ~15 ms. Stored in Inductor's cache directory,
    under a key of this package's source (and the function's file), torch's and Python's versions, the
    function, the kind of arguments and the machine (its CPU's vector instructions, or the GPU's compute
    capability), so that no changed code or other machine loads them."""

    def __init__(self):
        self.failed: str | None = None  # why compiling ahead of time was given up in this process, once it was
        self.counts = {"compiled": 0, "loaded": 0}
        self._directory: Path | None = None
        self._source: str | None = None

    def directory(self) -> Path:
        """Where the graphs are stored; hashes this package's source once per process."""
        if self._directory is None:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            self._directory = Path(cache_dir()) / "tm_tensorboard"
            package = Path(__file__).resolve().parent
            digest = hashlib.sha256()
            for path in sorted(package.glob("*.py")):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
            self._source = digest.hexdigest()
        return self._directory

    def _path(self, fn: Callable, kind: tuple, index: int) -> Path:
        directory = self.directory()
        devices = sorted({str(part[2]) for part in kind if isinstance(part, tuple)})
        machine = [torch.cuda.get_device_capability(d) if d.startswith("cuda") else torch.backends.cpu.get_cpu_capability()
                   for d in devices]
        key = repr((self._source, _file_digest(fn.__code__.co_filename), torch.__version__,
                    sys.implementation.cache_tag, platform.machine(), fn.__module__, fn.__qualname__, kind, machine))
        return directory / f"{fn.__name__}-{hashlib.sha256(key.encode()).hexdigest()[:32]}-{index}.graph"

    def load(self, fn: Callable, kind: tuple) -> list:
        """The graphs stored for ``fn`` and this kind of arguments, in the order they were compiled."""
        graphs = []
        for index in range(AHEAD_OF_TIME_GRAPHS):
            path = self._path(fn, kind, index)
            try:
                with open(path, "rb") as file:
                    graph = torch.compiler.load_compiled_function(file, f_globals=fn.__globals__)
                graph.disable_guard_check()
            except Exception:  # none stored (further), or unreadable (e.g. another torch build): compiled anew
                break
            graphs.append(graph)
            self.counts["loaded"] += 1
        return graphs

    def store(self, fn: Callable, kind: tuple, index: int, graph) -> None:
        """Keep a graph just compiled for later processes (best effort)."""
        self.counts["compiled"] += 1
        try:
            path = self._path(fn, kind, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            graph.save_compiled_function(str(path))  # written to a temporary file, then renamed
        except Exception:  # a read-only cache directory, a graph that does not serialize: compiled next time too
            pass


@contextlib.contextmanager
def _torch_deprecations_ignored() -> Iterator[None]:
    """Compiling (and loading compiled graphs) imports parts of torch that warn of their own deprecations
    (``torch.jit.script_method``, from ``torch.utils.mkldnn``): not the user's warnings, and under
    ``warnings.simplefilter("error")`` they failed the first compile of a process."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


@functools.lru_cache(maxsize=None)
def _file_digest(filename: str) -> str:
    """The source file of a fused function (this package's are in the key already; a test's are not)."""
    try:
        return hashlib.sha256(Path(filename).read_bytes()).hexdigest()
    except OSError:
        return ""


_AHEAD = _AheadOfTime()
AHEAD_OF_TIME_GRAPHS = 8  # per function and kind of arguments (sizes that a graph's guards tell apart)
SERVED_SIZES = 4096  # the most sizes of arguments a function remembers the serving graph of (layers × chunk sizes)


def _kind(args: tuple) -> tuple:
    """What no graph of symbolic sizes serves at once: each tensor's dtype, rank and device, each other
    argument's type, and the grad mode."""
    return (torch.is_grad_enabled(), *(
        (a.dtype, a.dim(), a.device) if isinstance(a, torch.Tensor) else type(a) for a in args
    ))


def _sizes(args: tuple) -> tuple | None:
    """Each tensor argument's shape and each other argument as it is; None where one is not hashable (a list of
    the shards' states: those functions run once per layer and measurement)."""
    sizes = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
    try:
        hash(sizes)
    except TypeError:
        return None
    return sizes


def _in_dispatch_mode() -> bool:
    """Whether a Python dispatch mode (a ``TorchDispatchMode``: an op counter, ``FlopCounterMode``, a fake-tensor
    mode) is active. No compiled graph serves under one: a stored graph's guards fail there, a graph compiled there
    passes only such a mode's and would fill the store's slots, and Dynamo's call finds no frame to compile (an
    error under ``fullgraph``, which gave up compiling for the whole process). The eager function serves that call."""
    return torch._C._len_torch_dispatch_stack() > 0


def _graph_count() -> int:
    """Graphs Dynamo has compiled in this process (a call that adds one compiled)."""
    from torch._dynamo.utils import counters  # imported by torch.compile already: a lookup, not an import

    return counters["stats"]["unique_graphs"]


def fused(fn: Callable | None = None, *, native: Callable[..., bool] | None = None):
    """Decorator: make ``fn`` a FusedFunction (``@fused``, or ``@fused(native=kernel)``)."""
    if fn is None:
        return lambda f: FusedFunction(f, native)
    return FusedFunction(fn, native)
