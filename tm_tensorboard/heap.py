"""The C heap during a measurement on CPU: what the chunks free is kept for the next chunk.

glibc gives the top of its heap back to the operating system whenever more than its trim threshold is
free there (twice its mmap threshold, which glibc raises by itself up to 32 MB: so 64 MB at most), and maps
every block above its mmap threshold (32 MB at most) apart, unmapping it when freed. A chunk's activations
of tens of MB each are so handed back at the end of every forward and page-faulted in (and zeroed by the
kernel) anew by the next chunk, ~2 µs a page on this project's 2-core machine (8 k page faults per forward
of the Monitor's example model, ``tests/test_heap.py``; a measurement at batch_size=16 1.3-1.5× slower,
``benchmarks/bench_heap.py``). ``freed_memory_kept`` raises the trim threshold while a measurement runs
and serves every block from the heap (glibc's mmap count limit set to 0: no threshold above 32 MB can be
set), so the heap grows to what one chunk needs and no further. After it, blocks above 32 MB are mapped
apart again, and the heap keeps what the measurement left free in it for the next one: the trim threshold
is set to that plus glibc's own 64 MB (free memory below a block still in use joins the top once that block
is freed: all of it counts), so that the next measurement's chunks (and your training meanwhile, whose
blocks under 32 MB come from the same heap) reuse it instead of page-faulting it in again (``measure()`` of
the example model, training steps between calls: ~17 k page faults, 68 MB, in every call after the first;
now none from the third on: ``tests/test_heap.py``). More freed at the top than that goes back to the system
as glibc would; ``release_freed_memory`` (``tm.release_memory()``) gives it all back, with glibc's own trim
threshold; a measurement under a memory budget keeps nothing after it, nor does a glibc older than 2.33
(no ``mallinfo2`` to say what is free).
Under a memory budget, blocks above 32 MB do not come from the heap: what it would hold free of them is
not in the budget's plan, and glibc bounds it by nothing. ``block_pool.py`` keeps them instead, within the
plan's working memory (glibc maps them apart where the pool is not available).

The measurement's streaming states are another matter: allocated once, kept to the end, then freed. They
are allocated by glibc's own rules (``mapped_apart``): above 32 MB mapped apart unless free heap memory
holds them, and so given back to the system when freed, as before; smaller blocks (a layer's shards' states
under 32 MB) come from the heap and stay there free after the measurement, unless at its top, where the next
measurement, or anything else the process allocates, finds them. (Measured: the resident set after a
measurement 612 MB against 538 MB before on the reference case at batch_size=16, 1.06 against 0.99 GB on
ResNet18Style; the peak the same. With error bars in K sets instead of K + 1, ResNet18Style(0.25)'s
per-layer blocks fell under 32 MB: after a one-off measurement with the default measures at batch_size=16
the resident set is 1.8 GB above its start instead of 0.9-1.6 GB, and the next one pages its states in no
more: 1.4-1.8 s against 1.8-2.3 s, a /tmp timing.) A session measured again (a Monitor) keeps them for its
next measurement instead, and ``measure()`` for its next call (``kept_states.py``).

Setting a threshold stops glibc adjusting both of them to the process, for the rest of the process; so
both are set to where glibc's own adjustment ends (mmap threshold 32 MB, trim threshold 64 MB on 64-bit
Linux). Nothing changes where the allocator is not glibc's, where the user configured it
(``GLIBC_TUNABLES`` with malloc settings, ``MALLOC_*_`` variables), or with
TM_TENSORBOARD_KEEP_FREED_MEMORY=0 (what a program that calls ``mallopt`` itself should set: that cannot
be seen from here).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from typing import Iterator

__all__ = ["freed_memory_kept", "mapped_apart", "release_freed_memory", "kept_trim_threshold", "keeping_enabled",
           "ENVIRONMENT_VARIABLE"]

ENVIRONMENT_VARIABLE = "TM_TENSORBOARD_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's largest own mmap threshold
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc's own trim threshold at that mmap threshold
KEPT_TRIM_THRESHOLD = 2**31 - 1  # while measuring: mallopt takes an int
MMAP_MAX = 65536  # glibc's own limit of blocks mapped apart at once (0 while measuring: none)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose mallopt and malloc_trim these are), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (AttributeError, OSError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = (), _MallInfo2
    return libc


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h): ``fordblks`` is the memory free in its heaps (every arena's)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _free_in_heap(libc) -> int:
    """Bytes free in glibc's heaps (0 where glibc is older than 2.33: no ``mallinfo2``). glibc trims a heap's
    top once more than the trim threshold is free there; free memory below a block in use joins the top when
    that block is freed."""
    mallinfo2 = getattr(libc, "mallinfo2", None)
    return 0 if mallinfo2 is None else int(mallinfo2().fordblks)


def kept_trim_threshold(free: int) -> int:
    """The trim threshold after a measurement that left ``free`` bytes free in the heap: those kept, plus
    glibc's own threshold over them (mallopt takes an int: at most KEPT_TRIM_THRESHOLD)."""
    return min(KEPT_TRIM_THRESHOLD, TRIM_THRESHOLD + free)


def _user_configured() -> bool:
    """Whether the user set glibc's allocator up (then it is theirs to keep as it is)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(v in os.environ for v in _USER_SETTINGS)


def keeping_enabled() -> bool:
    """Whether TM_TENSORBOARD_KEEP_FREED_MEMORY allows keeping freed memory while measuring (unset or 1: yes)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower()
    if value not in ("1", "true", "0", "false"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: use 1 (keep freed memory while measuring) or 0")
    return value in ("1", "true")


def _enabled() -> bool:
    return keeping_enabled() and not _user_configured()


_LOCK = threading.Lock()
_DEPTH = [0]  # measurements running (the thresholds are the process's, not a thread's)
_BOUNDED = [0]  # of them, those under a memory budget
_APART = [0]  # allocations inside mapped_apart, in any thread
_KEEPING = [False]  # whether the last measurement left a trim threshold that keeps its free memory


def _set_mmap_max(libc: ctypes.CDLL) -> None:
    """Blocks above 32 MB come from the heap while measurements run, unless one is under a memory budget or
    allocating its states."""
    libc.mallopt(_M_MMAP_MAX, 0 if _DEPTH[0] and not _BOUNDED[0] and not _APART[0] else MMAP_MAX)


@contextlib.contextmanager
def freed_memory_kept(large_blocks: bool = True) -> Iterator[None]:
    """While inside: the C heap keeps the memory freed at its top (up to 2 GB) instead of giving it back,
    and, with ``large_blocks``, serves blocks above 32 MB too (none mapped apart but inside
    ``mapped_apart``); on leaving the last one, blocks above 32 MB mapped apart again, and a trim threshold
    that keeps what is free in the heap then, plus glibc's own 64 MB (``kept_trim_threshold``: for the
    next measurement), or, with ``large_blocks=False``, glibc's own 64 MB. Re-entrant; nothing where not glibc.

    ``large_blocks=False`` is for a measurement under a memory budget: large blocks freed into the heap stay
    there as free memory the process holds, and where they are hundreds of MB (ResNet-50 at 224 px, width
    1, 64 images per forward) that was 2 GB over the peak the budget planned (5.3 GB for 4 GB); a measurement
    under a budget keeps them in ``block_pool`` instead."""
    libc = _libc() if _enabled() else None
    if libc is None:
        yield
        return
    with _LOCK:
        if _DEPTH[0] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
        _DEPTH[0] += 1
        _BOUNDED[0] += not large_blocks
        _set_mmap_max(libc)
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            _BOUNDED[0] -= not large_blocks
            _set_mmap_max(libc)
            if _DEPTH[0] == 0:
                _KEEPING[0] = large_blocks
                kept = kept_trim_threshold(_free_in_heap(libc)) if large_blocks else TRIM_THRESHOLD
                libc.mallopt(_M_TRIM_THRESHOLD, kept)


@contextlib.contextmanager
def mapped_apart() -> Iterator[None]:
    """Blocks allocated inside (a measurement's states: kept to its end, then freed) come by glibc's own
    rules: above 32 MB mapped apart unless free heap memory holds them, so that freeing them gives them
    back to the system at once instead of leaving them free in the heap after the measurement; not from
    ``block_pool`` either, which serves a chunk's working memory under a budget. Nothing outside a
    measurement."""
    from . import block_pool  # (which builds on this module)

    with block_pool.bypassed(), _by_glibc_rules():
        yield


@contextlib.contextmanager
def _by_glibc_rules() -> Iterator[None]:
    libc = _libc()
    if libc is None:
        yield
        return
    with _LOCK:
        _APART[0] += 1
        if _DEPTH[0]:  # (only where a measurement set the heap up: else glibc is left as it is)
            _set_mmap_max(libc)
    try:
        yield
    finally:
        with _LOCK:
            _APART[0] -= 1
            if _DEPTH[0]:
                _set_mmap_max(libc)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing),
    and, outside a measurement, glibc's own trim threshold again where one kept memory for the next
    measurement. After the warm-up (a whole measurement's states, for two samples): else its freed memory,
    fragmented, adds to the first measurement's peak. Not after every measurement: the next one would page its
    states in anew (2.5-5 s more for ResNet-50 at width 0.25, 2.8 GB of states, against 10.5 s)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
        with _LOCK:
            if _DEPTH[0] == 0 and _KEEPING[0]:
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                _KEEPING[0] = False
