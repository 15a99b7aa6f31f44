"""Blocks above 32 MB during a measurement under a memory budget on CPU: kept for the next chunk, within a cap.

Without a budget the C heap serves every block and keeps what a chunk frees for the next (``heap.py``).
Under a budget it cannot: glibc sets no bound on what it keeps, and keeping blocks above 32 MB took an
ImageNet ResNet-50 at width 1 to 5.3 GB for a 4 GB budget (and a check of the resident set that trimmed
the heap still let one run of three reach 4.35-4.47 GB: benchmarks/README.md, stop 42). Mapped apart by
glibc instead, a chunk's activations were page-faulted in anew at every chunk: 44.5 M page faults and
100 s for that measurement, 48 s with this pool (stop 43). The pool is torch's CPU allocator while it
serves: blocks of at least 32 MB are mapped by it and, once freed, kept for the next request they can
hold (the smallest kept block of at least the size asked, if at most twice that), so a chunk's activations
reuse the previous chunk's pages; never more than ``cap`` bytes mapped in all, in use or kept, but for
blocks in use at once (those are the measurement's and are never refused): a new block that would pass
the cap unmaps kept ones first, a block freed past it is unmapped. The cap is the plan's working memory
of one chunk (``memory.working_bytes``), which the budget already counts. Smaller blocks, and all blocks
while it does not serve (or inside ``heap.mapped_apart``: a measurement's states, kept to its end), go to
the allocator it wraps, as before.

Built like native.py's kernels (Inductor's C++ toolchain, once per machine); installed as torch's CPU
allocator the first time it serves and left installed (it only passes allocations on while not serving:
a block it mapped may be freed at any later time, by its own deleter). Where it cannot be built, or where
torch's CPU allocator is not the default one (a higher priority set it), a budgeted measurement warns
once and maps large blocks apart as before. TM_TENSORBOARD_KEEP_FREED_MEMORY=0 turns it off with the
heap's settings. POSIX only (``mmap``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

from . import caller, heap, native

__all__ = ["serving", "bypassed", "statistics", "build", "kernels", "THRESHOLD"]

THRESHOLD = heap.MMAP_THRESHOLD  # the blocks glibc maps apart (32 MB on 64-bit Linux)

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <unistd.h>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

class BlockPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (!serving_.load() || bypass_.load() > 0 || n < threshold_.load()) return wrapped_->allocate(n);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t size = (n + page - 1) / page * page;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto fit = kept_.lower_bound(size);
      if (fit != kept_.end() && fit->first <= 2 * size) {  // the smallest kept block that holds it, at most twice
        p = fit->second;
        kept_bytes_ -= fit->first;
        kept_.erase(fit);
        ++hits_;
      } else {
        while (held_ + size > cap_ && !kept_.empty()) unmap(std::prev(kept_.end()));  // largest kept first
        p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return wrapped_->allocate(n);  // (its own out-of-memory error)
        sizes_[p] = size;
        held_ += size;
        peak_ = held_ > peak_ ? held_ : peak_;
        ++maps_;
      }
    }
    return {p, p, &BlockPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockPool::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* p);

  void give_back(void* p) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto found = sizes_.find(p);
    if (found == sizes_.end()) {  // the wrapped allocator's (raw_allocate's blocks come back through here)
      lock.unlock();
      wrapped_delete_(p);
      return;
    }
    if (serving_.load() && held_ <= cap_) {
      kept_.emplace(found->second, p);
      kept_bytes_ += found->second;
    } else {
      munmap(p, found->second);
      held_ -= found->second;
      sizes_.erase(found);
      ++unmaps_;
    }
  }

  bool install() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (wrapped_ == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != c10::GetDefaultCPUAllocator() || current->raw_deleter() == nullptr) return false;
      wrapped_ = current;
      wrapped_delete_ = current->raw_deleter();
      c10::SetCPUAllocator(this, 0);
    }
    return c10::GetCPUAllocator() == this;
  }

  void serve(int64_t cap, int64_t threshold) {
    std::lock_guard<std::mutex> lock(mutex_);
    cap_ = static_cast<size_t>(cap);
    threshold_.store(static_cast<size_t>(threshold));
    peak_ = held_;
    serving_.store(true);
  }

  void stop() {
    std::lock_guard<std::mutex> lock(mutex_);
    serving_.store(false);
    while (!kept_.empty()) unmap(std::prev(kept_.end()));
  }

  void bypass(int64_t change) { bypass_.fetch_add(change); }

  void report(int64_t* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t values[] = {static_cast<int64_t>(held_), static_cast<int64_t>(kept_bytes_),
                              static_cast<int64_t>(peak_), hits_, maps_, unmaps_,
                              c10::GetCPUAllocator() == this};
    std::memcpy(out, values, sizeof(values));
  }

 private:
  void unmap(std::multimap<size_t, void*>::iterator block) {  // a kept block (the mutex held)
    munmap(block->second, block->first);
    held_ -= block->first;
    kept_bytes_ -= block->first;
    sizes_.erase(block->second);
    kept_.erase(block);
    ++unmaps_;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> kept_;  // freed blocks kept mapped, by size
  std::unordered_map<void*, size_t> sizes_;  // every block mapped: in use or kept
  size_t held_ = 0, kept_bytes_ = 0, peak_ = 0, cap_ = 0;
  int64_t hits_ = 0, maps_ = 0, unmaps_ = 0;
  std::atomic<bool> serving_{false};
  std::atomic<size_t> threshold_{SIZE_MAX};
  std::atomic<int64_t> bypass_{0};
  c10::Allocator* wrapped_ = nullptr;
  c10::DeleterFnPtr wrapped_delete_ = nullptr;
};

BlockPool* pool = new BlockPool();  // never destroyed: blocks may be freed at exit, after static destructors
void BlockPool::release(void* p) { pool->give_back(p); }

}  // namespace

// op 0: statistics; 1: install and serve (a = cap, b = threshold); 2: stop serving; 3: bypass += a.
// out: bytes mapped, bytes kept, peak bytes mapped while serving, reuses, maps, unmaps, installed.
extern "C" void kernel(const int64_t op, const int64_t a, const int64_t b, int64_t* out) {
  if (op == 1 && pool->install()) pool->serve(a, b);
  if (op == 2) pool->stop();
  if (op == 3) pool->bypass(a);
  pool->report(out);
}
"""

_KERNEL = native._Kernel("block pool", _SOURCE, ["const int64_t", "const int64_t", "const int64_t", "int64_t*"])
_LOCK = threading.Lock()
_CAPS: list[int] = []  # the caps of the measurements served now (the pool's cap: their sum)
_WARNED = [False]


def _applies() -> bool:
    """Whether the pool may serve here: POSIX (``mmap``), and TM_TENSORBOARD_KEEP_FREED_MEMORY not 0."""
    return os.name == "posix" and heap.keeping_enabled()


def _loaded() -> Callable | None:
    """The pool's entry point, built or loaded on first use; None where it is not available or turned off."""
    if not _applies():
        return None
    if _KERNEL._call is None:
        _global_c10()
    return _KERNEL.get()


def _invoke(call: Callable, op: int, a: int = 0, b: int = 0) -> list[int]:
    """Operation ``op`` of the pool (see its entry point), and its counters after it."""
    out = torch.zeros(7, dtype=torch.int64)
    call(op, a, b, out)
    return out.tolist()


@functools.lru_cache(maxsize=1)
def _global_c10() -> None:
    """The library refers to c10's allocator symbols, which the toolchain does not link: make the c10 that
    torch loaded visible to libraries loaded after it (loading it again with RTLD_GLOBAL)."""
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if os.path.isfile(library):
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)


def build() -> float:
    """Build (or load) the pool now, as a budgeted measurement's warm-up does; the seconds it took."""
    before = _KERNEL.seconds
    _loaded()
    return _KERNEL.seconds - before


def kernels() -> tuple[native._Kernel, ...]:
    """The pool's library, as ``native.build_all`` gives the kernels (none where it does not apply)."""
    return (_KERNEL,) if _applies() else ()


def statistics() -> dict[str, int]:
    """The pool's counters (bytes mapped and kept now, the peak mapped since it last started serving,
    reuses, maps, unmaps, and whether it is torch's CPU allocator); empty where it is not available."""
    call = _loaded()
    names = ("held_bytes", "kept_bytes", "peak_bytes", "reuses", "maps", "unmaps", "installed")
    return {} if call is None else dict(zip(names, _invoke(call, 0)))


@contextlib.contextmanager
def serving(cap: int) -> Iterator[bool]:
    """Blocks of at least THRESHOLD bytes come from the pool, with at most ``cap`` bytes mapped (plus what
    other measurements served at once asked for) but for blocks in use at once; on leaving the last one,
    what it kept is unmapped. Yields whether the pool serves (else: a warning, once, and glibc's rules)."""
    cap = max(int(cap), 0)
    with _LOCK:
        call = _loaded()
        _CAPS.append(cap)
        served = call is not None and _invoke(call, 1, sum(_CAPS), THRESHOLD)[6] == 1
        if not served:
            _CAPS.pop()
    if not served:
        _warn()
    try:
        yield served
    finally:
        if served:
            with _LOCK:
                _CAPS.remove(cap)
                if _CAPS:
                    _invoke(call, 1, sum(_CAPS), THRESHOLD)
                else:
                    _invoke(call, 2)


def _warn() -> None:
    if _WARNED[0] or not _applies():
        return
    _WARNED[0] = True
    why = _KERNEL.failed or "torch's CPU allocator is not its default one"
    warnings.warn(f"tm_tensorboard: the pool that keeps a measurement's blocks above 32 MB under a memory budget "
                  f"is not available, so they are page-faulted in anew at every chunk (same numbers, slower): {why}",
                  RuntimeWarning, stacklevel=caller.stacklevel())


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Blocks allocated inside come from the wrapped allocator even while the pool serves (``heap.mapped_apart``:
    a measurement's states, kept to its end, are not the chunks' working memory the cap is for)."""
    call = _KERNEL._call
    if call is None:  # (not loaded: it serves nothing, nothing to bypass)
        yield
        return
    _invoke(call, 3, 1)
    try:
        yield
    finally:
        _invoke(call, 3, -1)
