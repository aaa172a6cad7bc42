#!/usr/bin/env bash
# Create .venv and install thinkfast (editable) with its test extra. Idempotent and quick when done before.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU: try the CPU build of torch first (the build machines keep torch 2.13.0+cpu on local disk).
  # Elsewhere this resolves like any torch>=2.4 requirement would.
  .venv/bin/pip install -q "torch==2.13.0" || true
fi
.venv/bin/pip install -q -e ".[test]"
