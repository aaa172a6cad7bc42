#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the whole nano-world pipeline (configs/nano.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/thinkfast run --config configs/nano.yaml "$@"
