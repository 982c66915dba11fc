"""How often a pruning cut falls inside a run of equal scores: magnitude pruning of a model's weights.

    python scripts/mask_ties.py                 # the embedded SmolLM2-135M (bf16), 50% per output row
    python scripts/mask_ties.py model=tiny-llama sparsity=0.5

For every decoder weight matrix, with score |W| and k = int(in * sparsity) weights pruned per row, a row is
*tied at the cut* when its k-th and (k+1)-th smallest scores are equal: which of the equal weights go is
then a tie-break, and ``torch.topk`` leaves that order to the device and its kernel (the H200 and the CPU
chose differently, experiments/gpu_h200). The pruners break ties by index (``paser.pruners.common.lowest``).
Also counted: the rows where this machine's ``torch.topk`` chooses other weights than that rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.cache import StageCache
from paser.compose import compose
from paser.models import load_model
from paser.pruners.common import lowest, prunable_weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                    help="sparsity=<fraction> (default 0.5), and Hydra overrides of conf/config.yaml (model=...)")
    args = dict(a.split("=", 1) for a in ap.parse_args().settings)
    sparsity = float(args.pop("sparsity", 0.5))
    cfg = compose(["logger=none", *(f"{k}={v}" for k, v in args.items())])
    model, _ = load_model(cfg.model, StageCache(cfg.paths.cache_dir), "cpu")
    rows = tied = differ = 0
    for name, w in prunable_weights(model):
        score = w.detach().abs().float()
        k = int(score.shape[1] * sparsity)
        ordered = score.sort(dim=1).values
        tied += int((ordered[:, k - 1] == ordered[:, k]).sum())
        rows += score.shape[0]
        topk = torch.topk(score, k, dim=1, largest=False).indices.sort(dim=1).values
        differ += int((topk != lowest(score, k, dim=1).sort(dim=1).values).any(1).sum())
    print(f"{cfg.model.name} ({cfg.model.dtype}), magnitude {sparsity:.0%} per row: {tied:,} of {rows:,} rows "
          f"({tied / rows:.1%}) tied at the cut; torch.topk on this machine differs from ties-by-index in "
          f"{differ:,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
