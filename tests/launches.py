"""Counting what a GPU would launch, on the CPU: the ops a measurement dispatches, from torch.profiler.

Counted (the issue's rule): every ``aten::`` op that no other counted op called, plus one for each
compiled region (``Torch-Compiled Region`` when Dynamo calls it, its graph's ``## Call CompiledFxGraph``
when called as compiled ahead of time), whose inside is one fused launch sequence. Every counted op is at
most one kernel launch on a GPU (views launch none, so this is an upper bound).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from torch.profiler import ProfilerActivity, profile

COMPILED_REGION = "Torch-Compiled Region"
COMPILED_GRAPH = "## Call CompiledFxGraph"


def _counted(name: str) -> bool:
    return name.startswith("aten::") or name.startswith(COMPILED_REGION) or name.startswith(COMPILED_GRAPH)


def top_level_ops(fn: Callable[[], object]) -> Counter:
    """Run ``fn`` under the profiler and count its top-level ops by name (compiled regions as one name)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for event in prof.events():
        if not _counted(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _counted(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            compiled = event.name.startswith(COMPILED_REGION) or event.name.startswith(COMPILED_GRAPH)
            counts[COMPILED_REGION if compiled else event.name] += 1
    return counts
