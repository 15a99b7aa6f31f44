"""Shared fixtures."""
from __future__ import annotations

import pytest

from tm_tensorboard import fused


@pytest.fixture(params=["eager", "compiled"])
def kernels(request, monkeypatch):
    """Run a test with the eager and with the compiled fused updates (the TM_TENSORBOARD_COMPILE default,
    which spawned worker processes inherit too). A compiler failure must fail the compiled run, not fall
    back silently."""
    monkeypatch.setenv(fused.ENVIRONMENT_VARIABLE, "1" if request.param == "compiled" else "0")
    yield request.param
    if request.param == "compiled":
        assert fused.compile_available(), "the fused updates fell back to eager: compiling failed"
