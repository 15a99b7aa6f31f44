"""Which code a benchmark measured, recorded with every result, and writing the results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_version() -> str:
    """The git commit of the measured code, "+dirty" if the package or the frontend has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "tm_tensorboard", "frontend") else "")


def save_results(figures: dict, output: str | Path) -> None:
    """Print ``figures`` and write them as JSON to ``output`` (its folder made if needed)."""
    text = json.dumps(figures, indent=2)
    print(text)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text + "\n")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU model, for the record."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_generation() -> str:
    """Family, model and vector instructions: a VM's "AMD EPYC" names several generations, whose forward
    passes differ by 2x (AVX-512 convolutions) where the statistics, bound by memory access, differ less."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vectors = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    return f"family {info.get('cpu family', '?')} model {info.get('model', '?')}, {' '.join(vectors) or 'no AVX'}"


def environment() -> dict:
    """The machine and the measured code: CPU (and its generation), cores, torch, tm_tensorboard and its commit."""
    import torch

    import tm_tensorboard

    return {
        "cpu": cpu_name(),
        "cpu_generation": cpu_generation(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "tm_tensorboard": f"{tm_tensorboard.__version__} ({source_version()})",
    }
