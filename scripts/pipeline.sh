#!/usr/bin/env bash
# Set up and run the main job on the embedded default (report in runs/pipeline/). Extra flags go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR="${RAY_TMPDIR:-$(mktemp -d /tmp/rc-ray-XXXX)}"
raycache pipeline "$@"
