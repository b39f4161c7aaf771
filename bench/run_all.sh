#!/usr/bin/env bash
# Run every benchmark in turn; each prints its side-by-side table and writes bench/results/<name>.json.
# Usage: bash bench/run_all.sh [--quick]     (--quick: toy sizes, proves the code paths in ~5 min)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR="${RAY_TMPDIR:-$(mktemp -d /tmp/rcb-XXXX)}"
for bench in encode_throughput lookup service decision_quality; do
  echo "=== bench.$bench $*"
  python -m "bench.$bench" "$@"
done
