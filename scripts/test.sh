#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). Slow, scale-sized runs are benchmarks (bench/), not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR="${RAY_TMPDIR:-$(mktemp -d /tmp/rc-ray-XXXX)}"
python -m pytest -m "not slow" -q --timeout 900 "$@" tests
