#!/usr/bin/env bash
# Device smoke test (scripts/gpu_smoke.py): every pruner, selector, LoRA and both evaluators on a device and
# on the CPU, compared within stated tolerances; prints a markdown table and exits 1 if a unit failed.
#   bash scripts/gpu_smoke.sh                        # cuda vs cpu, tiny-llama and SmolLM2-135M
#   bash scripts/gpu_smoke.sh --device cpu --quick   # the script itself, tiny-llama only
# Other options (--out, --data-dir) go to the Python script; see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
# offline and quiet: no hub lookups (the reward model is checked locally), no W&B, no progress bars
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1
exec python scripts/gpu_smoke.py "$@"
