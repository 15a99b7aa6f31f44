"""The C heap while measuring on CPU (``heap.py``): freed memory kept for the next chunk, given back after."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tm_tensorboard as tm
from tm_tensorboard import heap

glibc = pytest.mark.skipif(heap._libc() is None, reason="glibc's allocator only")

_CHILD = textwrap.dedent(
    """
    import json, os, resource, torch
    torch.set_num_threads(2)
    from tm_tensorboard import heap
    from tm_tensorboard.examples.models import SimpleCNN

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.manual_seed(0)
    model, x = SimpleCNN(1, 5, width=0.5).eval(), torch.rand(256, 1, 32, 32)  # activations of 16.8 MB

    def faults_per_forward(n=3):
        before = faults()
        with torch.no_grad():
            for _ in range(n):
                model(x)
        return (faults() - before) / n

    def kept_after_freeing():  # 8 blocks of 24 MB (under glibc's 32 MB: from the heap): growth, and what stays freed
        before = resident()
        blocks = [torch.ones(6 * 2**20) for _ in range(8)]
        grown = resident() - before
        del blocks
        return grown, resident() - before

    def big_block():  # 48 MB, above glibc's largest mmap threshold (32 MB): mapped apart by glibc's own rules
        return torch.ones(12 * 2**20)

    def faults_of_big_block_again():  # a big block freed, then one of the same size: faults of the second
        block = big_block()
        del block
        before = faults()
        block = big_block()
        return faults() - before

    def big_block_kept():  # growth of the resident set with a big block, and what stays of it once freed
        before = resident()
        block = big_block()
        grown = resident() - before
        del block
        return grown, resident() - before

    out = {"outside": [faults_per_forward() for _ in range(2)], "big_outside": faults_of_big_block_again()}
    with heap.freed_memory_kept(large_blocks=False):  # (a measurement under a memory budget; first: a heap
        out["big_bounded"] = faults_of_big_block_again()  # holding free memory serves big blocks from it)
    with heap.freed_memory_kept():
        with heap.mapped_apart():  # (a measurement's states; the heap holds no free memory to serve them yet)
            out["big_apart"] = big_block_kept()
        faults_per_forward(1)  # the heap grows to what a forward needs
        out["inside"] = faults_per_forward()
        out["kept_inside"] = kept_after_freeing()
        out["big_inside"] = faults_of_big_block_again()
    out["kept_after"] = kept_after_freeing()
    print(json.dumps(out))
    """
)


def _child(**env) -> dict:
    environment = {**os.environ, **env}
    environment.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_freed_memory_is_kept_while_measuring_and_given_back_after():
    """A fresh process's forwards page-fault their activations in anew every time (glibc trims the top of
    its heap); inside ``freed_memory_kept`` they reuse the heap (no faults), 192 MB freed stays, and after
    it the same freed memory goes back to the system (glibc's own 64 MB trim threshold again)."""
    run = _child()
    assert min(run["outside"]) > 2000, run  # glibc's own thresholds: ~8 k faults (32 MB) per forward here
    assert run["inside"] < 0.02 * min(run["outside"]), run
    grown, kept = run["kept_inside"]
    assert grown > 100 * 2**20 and kept > 0.9 * grown, run
    assert run["kept_after"][1] < 80 * 2**20, run  # (what was kept inside is reused, then given back too)


@glibc
def test_blocks_above_32_mb_come_from_the_heap_while_measuring_but_states_are_mapped_apart():
    """Outside, a 48 MB block is mapped apart and unmapped when freed, so one of the same size faults in
    anew (~12 k pages); inside ``freed_memory_kept`` it is served again from the heap, without faults; and
    inside ``mapped_apart`` (a measurement's states), where the heap has no free memory to serve it, it is
    mapped apart and given back when freed, as glibc's own rules do. Under a memory budget
    (``large_blocks=False``) blocks above 32 MB are mapped apart as glibc would."""
    run = _child()
    assert run["big_outside"] > 1000
    assert run["big_inside"] < 0.02 * run["big_outside"]
    assert run["big_bounded"] > 0.5 * run["big_outside"]
    grown, kept = run["big_apart"]
    assert grown > 40 * 2**20 and kept < 4 * 2**20


@glibc
def test_switched_off_by_its_environment_variable():
    run = _child(**{heap.ENVIRONMENT_VARIABLE: "0"})
    assert run["inside"] > 0.5 * min(run["outside"])
    assert run["big_inside"] > 0.5 * run["big_outside"]
    grown, kept = run["kept_inside"]
    assert grown > 100 * 2**20 and kept < 80 * 2**20


def test_left_alone_when_the_user_configured_glibc(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert not heap._enabled()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")
    assert heap._enabled()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert not heap._enabled()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv(heap.ENVIRONMENT_VARIABLE, "maybe")
    with pytest.raises(ValueError, match=heap.ENVIRONMENT_VARIABLE):
        heap._enabled()


def test_a_measurement_on_cpu_runs_inside_it_and_leaves_it():
    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    model[1].register_forward_hook(lambda *args: seen.append((heap._DEPTH[0], heap._BOUNDED[0])))
    for budget in (None, "1GB"):
        tm.measure(model, torch.rand(8, 1, 8, 8), tm.transforms.rotations(4), measures=("invariance",),
                   compile=False, memory_budget=budget)
    on = heap._libc() is not None and heap._enabled()
    assert seen and set(seen) == ({(1, 0), (1, 1)} if on else {(0, 0)})
    assert heap._DEPTH[0] == 0 and heap._BOUNDED[0] == 0 and heap._APART[0] == 0


class _RecordedLibc:
    """glibc's two functions as ``heap`` calls them, recorded instead of called."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1

    def malloc_trim(self, pad):
        return 1


@pytest.mark.parametrize("setting", ["off", "user"])
def test_glibc_is_left_alone_where_it_is_off(monkeypatch, setting):
    """Switched off, or with the user's own glibc settings, a measurement sets nothing (a mallopt would
    also stop glibc adjusting its thresholds for the rest of the process); on, it ends with glibc's own
    settings back."""
    libc = _RecordedLibc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    measure = lambda: tm.measure(model, torch.rand(8, 1, 8, 8), tm.transforms.rotations(4), compile=False,  # noqa: E731
                                 measures=("invariance", "same_equivariance"), error_bars=2)
    if setting == "off":
        monkeypatch.setenv(heap.ENVIRONMENT_VARIABLE, "0")
    else:
        monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    measure()
    assert libc.calls == []
    monkeypatch.setenv(heap.ENVIRONMENT_VARIABLE, "1")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    measure()
    last = dict(libc.calls)  # each parameter's last value
    assert last == {heap._M_MMAP_THRESHOLD: heap.MMAP_THRESHOLD, heap._M_TRIM_THRESHOLD: heap.TRIM_THRESHOLD,
                    heap._M_MMAP_MAX: heap.MMAP_MAX}
    assert (heap._M_MMAP_MAX, 0) in libc.calls
