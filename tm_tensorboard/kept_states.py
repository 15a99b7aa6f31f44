"""The memory of a measurement's streaming states, kept for the next measurement (CPU).

A Monitor measures the same layers every ``every`` steps, and every measurement allocates the same
states. On CPU they came fresh from the operating system each time, page by page: on this project's
2-core VM 0.2-1.2 s per GB, and with error bars (K + 1 sets when that was measured; K now where the CPU
kernels finalize) that is ~1 GB on the reference case with the default measures, +1.1 s a measurement
(``benchmarks/README.md``, "Roofline"). ``KeptStates`` serves a session's measurement the blocks its
previous measurement used, zeroed in place (resident memory: a memset), and holds them in between: what a
Monitor holds between steps is its last measurement's states, and blocks that measurement did not use
again are let go. A GPU needs none of this: PyTorch's caching allocator already keeps freed blocks, where
training can use them too.

One-off ``measure()`` calls share the process's ``OneOffStates``: what each used is kept after it returns,
marked lazily free (Linux's ``madvise(MADV_FREE)``: the system takes such pages back when it runs short of
memory, without writing them anywhere; until then they stay mapped, and writing them again costs no page
fault), and a later call whose states have the same sizes zeroes and reuses them (0.04 s per GB here,
against 0.2-1.45 s per GB for fresh pages). Blocks no call used since are let go least recently used
first once they exceed a quarter of the machine's memory; ``TM_TENSORBOARD_KEEP_STATES=0`` keeps nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import math
import os
import platform
import threading
from typing import Iterator

import torch

__all__ = ["KeptStates", "OneOffStates", "one_off", "zeros", "MIN_BYTES", "ENVIRONMENT_VARIABLE"]

MIN_BYTES = 1 << 20  # smaller states come from the C heap as before: nothing to page in
ENVIRONMENT_VARIABLE = "TM_TENSORBOARD_KEEP_STATES"
_MADV_FREE = 8  # <sys/mman.h> on Linux (4.5 and later)
_SERVING: contextvars.ContextVar["KeptStates | None"] = contextvars.ContextVar("kept_states", default=None)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero state tensor: from the ``KeptStates`` serving this measurement, if any, else ``torch.zeros``."""
    kept = _SERVING.get()
    if kept is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return kept.zeros(shape, dtype, device)


class KeptStates:
    """State blocks of a session's last measurement, handed out again (zeroed) by its next one."""

    def __init__(self):
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._leased: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._busy = False  # serving a measurement (another thread's measurement then gets fresh states)
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
        with self._lock:
            busy, self._busy = self._busy, True
        if busy:  # another thread's measurement holds these blocks: this one allocates its own
            yield
            return
        token = _SERVING.set(self)
        try:
            yield
        finally:
            _SERVING.reset(token)
            self._keep(self._leased)
            self._leased = []
            with self._lock:
                self._busy = False

    def _keep(self, used: list[torch.Tensor]) -> None:
        """After a measurement: keep the blocks it ``used``, let the rest go."""
        self._free = {}
        for block in used:
            self._free.setdefault((block.numel(), block.dtype), []).append(block)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zero tensor of ``shape``: a kept block of its size on CPU, else a new one (kept from now on)."""
        numel = math.prod(shape)
        if torch.device(device).type != "cpu" or numel * dtype.itemsize < MIN_BYTES:
            return torch.zeros(shape, dtype=dtype, device=device)
        free = self._free.get((numel, dtype))
        if free:
            block = free.pop().zero_()
            self.reused += 1
        else:
            block = torch.zeros(numel, dtype=dtype, device=device)
            self.allocated += 1
        self._leased.append(block)
        return block.view(shape)


class OneOffStates(KeptStates):
    """The process's blocks for one-off measurements: each one's kept after it, lazily freed; blocks no
    measurement used since let go, least recently used first, beyond ``unused_bytes``."""

    def __init__(self, unused_bytes: int):
        super().__init__()
        self.unused_bytes = unused_bytes
        self._recency: list[torch.Tensor] = []  # the blocks held, least recently used first

    def _keep(self, used: list[torch.Tensor]) -> None:
        leased = {id(block) for block in used}
        kept, total = [], 0
        for block in reversed([block for block in self._recency if id(block) not in leased]):
            total += block.numel() * block.element_size()
            if total > self.unused_bytes:
                break
            kept.append(block)
        for block in used:
            _lazily_free(block)
        self._recency = kept[::-1] + used
        self._free = {}
        for block in self._recency:
            self._free.setdefault((block.numel(), block.dtype), []).append(block)


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` where pages can be marked lazily free (Linux), else None."""
    if platform.system() != "Linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def _lazily_free(block: torch.Tensor) -> bool:
    """Mark the whole pages inside ``block``'s memory lazily free; False where that cannot be done."""
    madvise = _madvise()
    if madvise is None:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = block.data_ptr(), block.data_ptr() + block.numel() * block.element_size()
    first, last = -(-start // page) * page, end // page * page
    return last <= first or madvise(first, last - first, _MADV_FREE) == 0


def _enabled() -> bool:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower()
    if value not in ("1", "true", "0", "false"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: use 1 (one-off measurements keep their states' memory, "
                         "lazily freed) or 0 (they give it back)")
    return value in ("1", "true")


@functools.lru_cache(maxsize=1)
def _process_pool() -> OneOffStates | None:
    """The process's pool, where pages can be marked lazily free (a probe on one page), else None."""
    probe = torch.zeros(2 * os.sysconf("SC_PAGE_SIZE") // 8, dtype=torch.float64)
    if _madvise() is None or not _lazily_free(probe):
        return None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return OneOffStates(unused_bytes=memory // 4)


def one_off() -> KeptStates:
    """The states' memory for a one-off ``measure()``: the process's pool (``OneOffStates``) where it is on and
    pages can be lazily freed, else a pool of its own (nothing kept once the measurement is gone)."""
    pool = _process_pool() if _enabled() else None
    return pool if pool is not None else KeptStates()
