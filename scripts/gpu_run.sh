#!/usr/bin/env bash
# The one script to run when a GPU is lent (issues #32 and #35), in two parts, each under its own time limit
# and writing its outputs as it goes into one folder (what finished is kept when a limit or the loan ends):
#   1. scripts/gpu_scale_check.py at a 7B shape: every stage of experiment=table1 timed, with peak memory and
#      MFU, and the whole experiment extrapolated (scale_check.json after every section, scale_check.log);
#   2. a GPU replicate of the fair comparison (experiment=fair_comparison_cpu: Random, PASER and PASER's
#      JSD-only ablation at equal trained tokens), seeds in the outer loop so that a cut-off sweep still holds
#      complete seed pairs; the batch sizes are neutral knobs, raised for a 135M model on a GPU.
#
#   bash scripts/gpu_run.sh [OUT] [all|scale|fair]    # OUT default: outputs/gpu_run_<date-time>
#
# Limits (seconds, environment): SCALE_S (default 360), FAIR_S (default 540); SHAPE (default llama2-7b),
# SEEDS (default 0,1,2,3,4,5,6,7). Afterwards: python scripts/make_tables.py OUT/fair_comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_run_$(date +%Y%m%d-%H%M%S)}
part=${2:-all}
mkdir -p "$out"
# offline and quiet: no hub lookups, no W&B, no progress bars
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null
status=0

if [[ $part == all || $part == scale ]]; then
    timeout "${SCALE_S:-360}" python scripts/gpu_scale_check.py --shape "${SHAPE:-llama2-7b}" \
        --out "$out/scale_check.json" 2>&1 | tee "$out/scale_check.log"
    status=$(( status | PIPESTATUS[0] ))
fi

if [[ $part == all || $part == fair ]]; then
    timeout "${FAIR_S:-540}" python run.py -m experiment=fair_comparison_cpu model.device=cuda evaluator=ppl \
        "seed=${SEEDS:-0,1,2,3,4,5,6,7}" selector=random,paser,paser_jsd_only logger=none \
        evaluator.ppl.batch_size=128 scoring.batch_size=32 recovery.micro_batch_size=16 \
        "paths.output_dir=$out" "hydra.sweep.dir=$out/fair_comparison" 2>&1 | tee "$out/fair_comparison.log"
    status=$(( status | PIPESTATUS[0] ))
fi
echo "outputs in $out (exit status $status; 124 = a time limit cut a part short, its finished outputs are kept)"
exit "$status"
