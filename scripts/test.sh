#!/usr/bin/env bash
# Set up (scripts/setup.sh, scripts/setup_vllm.sh) and run the whole test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Real vLLM for tests/test_vllm.py (a few minutes the first time); without it that test skips, saying why.
bash scripts/setup_vllm.sh || echo "scripts/setup_vllm.sh failed: tests/test_vllm.py will skip" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
