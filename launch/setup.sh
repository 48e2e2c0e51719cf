#!/usr/bin/env bash
# Create .venv and install Flotilla with its dependencies (idempotent: a second run only checks).
# torch is pinned to 2.13.0 and installed first (TORCH_SPEC overrides it, e.g. a CUDA build on a GPU machine:
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"); the rest without build isolation (a package that
# builds against torch in an isolated build would fetch a multi-GB CUDA torch). ".[dev]" brings pytest and the extras
# the tests use (wan: hivemind, plots: matplotlib); a core install is `pip install -e .`, DeepSpeed is `.[sp]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.flotilla-installed
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
echo "setup: creating .venv and installing (torch 2.13.0 CPU, hivemind, ...)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q ${TORCH_SPEC:-"torch==2.13.0"} numpy
.venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
