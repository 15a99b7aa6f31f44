#!/usr/bin/env bash
# Create the benchmark environment benchmarks/.work/venv (git-ignored): our package plus the reference
# implementation tmeasures 1.2.11, kept apart from the development / test venv.
# Usage (from anywhere): bash benchmarks/tmeasures_env.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/benchmarks/.work/venv"

python3 -m venv "$venv"
# The pinned CPU torch first: an unpinned requirement would pull a multi-GB CUDA build.
"$venv/bin/pip" install torch==2.13.0
"$venv/bin/pip" install -e "$root[bench]"
"$venv/bin/python" -c "import tmeasures, tm_tensorboard, torch, numpy; print('benchmark env ready: torch', torch.__version__, '| numpy', numpy.__version__, '| tmeasures imports')"
