#!/usr/bin/env bash
# Create .venv and install raycache with its test extras. CPU torch is pinned (an unpinned torch pulls a
# multi-GB CUDA build); on GPU nodes install torch for your CUDA first, then `pip install -e .[vllm]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-cpu.txt
python -m pip install -q -e ".[test]"
