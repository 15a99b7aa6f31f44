"""Shared fixtures."""
from __future__ import annotations

import pytest

from tm_tensorboard import fused, native


@pytest.fixture(params=["eager", "graphs", "compiled"])
def kernels(request, monkeypatch):
    """Run a test with the eager fused updates, with the compiled graphs alone (what a GPU runs: the CPU
    kernel of ``native.py`` off) and with what a CPU runs compiled (that kernel where it applies), through
    TM_TENSORBOARD_COMPILE and TM_TENSORBOARD_NATIVE (which spawned worker processes inherit too). A
    compiler failure must fail the compiled runs, not fall back silently."""
    monkeypatch.setenv(fused.ENVIRONMENT_VARIABLE, "0" if request.param == "eager" else "1")
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1" if request.param == "compiled" else "0")
    yield request.param
    if request.param != "eager":
        assert fused.compile_available(), "the fused updates fell back to eager: compiling failed"
    if request.param == "compiled":
        assert native.available(), "the CPU kernel fell back to the compiled graphs: building it failed"
