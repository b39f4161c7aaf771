#!/usr/bin/env bash
# Set up and run the main job on the embedded default (report in runs/pipeline/). Extra flags go to it:
#   bash scripts/pipeline.sh --quick
#   bash scripts/pipeline.sh --teacher openai --teacher-model M --endpoint http://host:8000/v1
# Set-up (scripts/setup.sh) is skipped when .venv was set up from the same pyproject.toml and
# requirements-cpu.txt (or with RAYCACHE_SKIP_SETUP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.raycache-setup
want=$(cat pyproject.toml requirements-cpu.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "${RAYCACHE_SKIP_SETUP:-0}" != "1" ] && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; }; then
  bash scripts/setup.sh
  echo "$want" > "$stamp"
fi
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR="${RAY_TMPDIR:-$(mktemp -d /tmp/rc-ray-XXXX)}"
raycache pipeline "$@"
