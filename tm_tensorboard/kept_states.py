"""The memory of a measurement's streaming states, kept for the next: the same session's, or measure()'s (CPU).

A Monitor measures the same layers every ``every`` steps, and every measurement allocates the same
states. On CPU they came fresh from the operating system each time, page by page: on this project's
2-core VM 0.2-1.2 s per GB, and with error bars (K + 1 sets when that was measured; K now where the CPU
kernels finalize) that is ~1 GB on the reference case with the default measures, +1.1 s a measurement
(``benchmarks/README.md``, "Roofline"). ``KeptStates`` serves a session's measurement the blocks its
previous measurement used, zeroed in place (resident memory: streaming stores where the CPU kernels are at
hand), and holds them in between: what a Monitor holds between steps is its last measurement's states, and
blocks that measurement did not use again are let go. A GPU needs none of this: PyTorch's caching allocator
already keeps freed blocks, where training can use them too.

One-off measurements (``measure()``) share one ``KeptStates`` per process (``one_off``): a call on the same
model object, on samples of the same shape, reuses the state memory of the calls before it, as a session's
measurement does (a notebook measuring the same model again, checkpoints loaded into it in a loop; the
first call pages its states in, as before), the way PyTorch's caching allocator keeps freed blocks on a GPU;
a call on another model (or sample shape) lets them go first. It holds at most ONE_OFF_BYTES between calls:
the last call's blocks first, then those of calls before it that the last did not use. ``release``
(``tm.release_memory()``) lets them go, a measurement under a memory budget lets them go before it
allocates, and TM_TENSORBOARD_KEEP_FREED_MEMORY=0 keeps none.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import weakref
from typing import Iterator

import torch

from . import heap, native

__all__ = ["KeptStates", "zeros", "one_off", "let_go_one_off", "release", "MIN_BYTES", "ONE_OFF_BYTES"]

MIN_BYTES = 1 << 20  # smaller states come from the C heap as before: nothing to page in
ONE_OFF_BYTES = 2 * 10**9  # the most one-off measurements keep between calls (the first blocks leased, up to it)
_SERVING: contextvars.ContextVar["KeptStates | None"] = contextvars.ContextVar("kept_states", default=None)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero state tensor: from the ``KeptStates`` serving this measurement, if any, else ``torch.zeros``."""
    kept = _SERVING.get()
    if kept is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return kept.zeros(shape, dtype, device)


class KeptStates:
    """State blocks of earlier measurements, handed out again (zeroed) by the next one: a session's last
    measurement's (``cap`` None, ``keep_unused`` False), or up to ``cap`` bytes of them, the last one's first."""

    def __init__(self, cap: int | None = None, keep_unused: bool = False):
        self.cap = cap  # the most bytes held between measurements (None: no bound)
        self.keep_unused = keep_unused  # also hold blocks the last measurement did not use (after those it did)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._leased: list[torch.Tensor] = []
        self.reused = 0  # blocks served again, and blocks allocated anew (for tests and benchmarks)
        self.allocated = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes held for the next measurement."""
        return sum(b.numel() * b.element_size() for blocks in self._free.values() for b in blocks)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Inside: the states a measurement allocates through ``zeros`` come from here. On leaving, its blocks
        are kept for the next measurement and the rest let go. (Its states must be finalized by then: the
        results are copies, on the host.)"""
        token = _SERVING.set(self)
        try:
            yield
        finally:
            _SERVING.reset(token)
            unused = [block for blocks in self._free.values() for block in blocks] if self.keep_unused else []
            self._free, held = {}, 0
            for block in self._leased + unused:
                held += block.numel() * block.element_size()
                if self.cap is None or held <= self.cap:
                    self._free.setdefault((block.numel(), block.dtype), []).append(block)
            self._leased = []

    def let_go(self) -> None:
        """Hold nothing for the next measurement."""
        self._free = {}

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zero tensor of ``shape``: a kept block of its size on CPU, else a new one (kept from now on)."""
        numel = math.prod(shape)
        if torch.device(device).type != "cpu" or numel * dtype.itemsize < MIN_BYTES:
            return torch.zeros(shape, dtype=dtype, device=device)
        free = self._free.get((numel, dtype))
        if free:
            block = free.pop()
            if not native.zero_fill(block):  # (streaming stores: ~3x zero_ on this project's VM)
                block.zero_()
            self.reused += 1
        else:
            block = torch.zeros(numel, dtype=dtype, device=device)
            self.allocated += 1
        self._leased.append(block)
        return block.view(shape)


_ONE_OFF = KeptStates(cap=ONE_OFF_BYTES, keep_unused=True)
_ONE_OFF_LOCK = threading.Lock()
_ONE_OFF_FOR: list = [None, None]  # the model (a weak reference) and the sample shape its blocks were kept for


@contextlib.contextmanager
def one_off(model: torch.nn.Module, sample_shape: tuple[int, ...]) -> Iterator[KeptStates]:
    """The ``KeptStates`` of a one-off measurement of ``model`` on samples of ``sample_shape``: the process's,
    with the blocks of the calls before it if they measured the same model object on samples of the same
    shape, else emptied first (another model's blocks, kept, would only keep this call's allocations from
    reusing that memory: on this project's VM every call of two models measured in turn then paged its
    states in, 3-13 % slower than keeping nothing); a new one, keeping nothing, while another thread's
    measurement holds it or TM_TENSORBOARD_KEEP_FREED_MEMORY is 0."""
    if not heap.keeping_enabled() or not _ONE_OFF_LOCK.acquire(blocking=False):
        yield KeptStates(cap=0)
        return
    try:
        kept_for, shape = _ONE_OFF_FOR
        if kept_for is None or kept_for() is not model or shape != tuple(sample_shape):
            _ONE_OFF.let_go()
            _ONE_OFF_FOR[:] = [weakref.ref(model), tuple(sample_shape)]
        yield _ONE_OFF
    finally:
        _ONE_OFF_LOCK.release()


def let_go_one_off() -> None:
    """Let go of the state memory one-off measurements keep for the next, unless a measurement in another
    thread (or this one: it lets go of its own) holds it now."""
    if _ONE_OFF_LOCK.acquire(blocking=False):
        try:
            _ONE_OFF.let_go()
        finally:
            _ONE_OFF_LOCK.release()


def release() -> None:
    """``tm.release_memory()``: let go of the state memory one-off measurements keep for the next call
    (``let_go_one_off``) and give the C heap's free pages back to the operating system."""
    let_go_one_off()
    heap.release_freed_memory()
