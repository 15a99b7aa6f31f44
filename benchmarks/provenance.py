"""Which code a benchmark measured: recorded with every result."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_version() -> str:
    """The git commit of the measured code, "+dirty" if the package or the frontend has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "tm_tensorboard", "frontend") else "")
