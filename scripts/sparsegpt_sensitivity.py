"""How much SparseGPT's masks move when its Hessians move by floating-point rounding, on one machine.

    python scripts/sparsegpt_sensitivity.py                      # SmolLM2-135M (bf16), gpu_smoke's calibration
    python scripts/sparsegpt_sensitivity.py model=tiny-llama rel=1e-7 windows=8

On the H200 the CUDA and the CPU SparseGPT masks of SmolLM2 differed at 8.7% of the decoder weights
(experiments/gpu_h200). A bug, or the algorithm's own sensitivity? Two devices sum X^T X in different
orders, so their fp32 Hessians differ by rounding (relative ~1e-7), and SparseGPT's column-by-column OBS
updates carry every changed choice along the rest of its row. This script prunes the same model twice
on the CPU, the second time with every Hessian multiplied entrywise by a symmetric (1 + rel * N(0, 1)),
and prints the share of decoder weights whose zero mask differs, the largest relative weight difference
and the perplexity of both on the first ``windows`` windows of WikiText-2 and PTB (gpu_smoke's units
use 8) — the same quantities gpu_smoke prints for CUDA vs CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.cache import StageCache
from paser.compose import compose
from paser.data import calibration_recipe, calibration_set
from paser.evaluation.perplexity import cached_corpus_windows, check_bos, perplexity
from paser.models import load_model
from paser.pruners import sparsegpt
from paser.pruners.common import prunable_weights


class PerturbedSparseGPT(sparsegpt.SparseGPTPruner):
    """SparseGPT with each layer's Hessian scaled entrywise by a symmetric 1 + rel * N(0, 1)."""

    def __init__(self, rel: float, seed: int, **knobs):
        super().__init__(**knobs)
        self.rel, self.gen = rel, torch.Generator().manual_seed(seed)

    def hessian(self, target):
        h = super().hessian(target).float()
        noise = torch.randn(h.shape, generator=self.gen, dtype=torch.float32)
        noise = (noise + noise.T) / 2 ** 0.5
        return h * (1 + self.rel * noise)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                    help="rel=<relative Hessian noise> (1e-7), windows=<count> (8), seed=<int> (0), and Hydra "
                         "overrides of conf/config.yaml (model=...)")
    args = dict(a.split("=", 1) for a in ap.parse_args().settings)
    rel, windows, seed = float(args.pop("rel", 1e-7)), int(args.pop("windows", 8)), int(args.pop("seed", 0))
    overrides = ["logger=none", "pruner=sparsegpt", "pruner.calibration.nsamples=8", "pruner.calibration.seqlen=64",
                 *(f"{k}={v}" for k, v in args.items())]
    cfg = compose(overrides)
    model, tokenizer = load_model(cfg.model, StageCache(cfg.paths.cache_dir), "cpu")
    calib, _ = calibration_set(tokenizer, calibration_recipe(cfg.pruner.calibration, cfg.model.get("context_length")))
    knobs = {k: v for k, v in cfg.pruner.items() if k not in ("_target_", "calibration")}
    exact, twin = copy.deepcopy(model), model
    sparsegpt.SparseGPTPruner(**knobs).prune(exact, calib)
    PerturbedSparseGPT(rel, seed, **knobs).prune(twin, calib)
    a = {n: w.detach() for n, w in prunable_weights(exact)}
    b = {n: w.detach() for n, w in prunable_weights(twin)}
    differ = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in a)
    total = sum(w.numel() for w in a.values())
    largest = max(float((a[n].float() - b[n].float()).abs().max() / a[n].float().abs().max()) for n in a)
    print(f"{cfg.model.name} ({cfg.model.dtype}), SparseGPT {cfg.pruner.sparsity} {cfg.pruner.pattern}, "
          f"Hessians x (1 + {rel:g} N(0,1)): zero masks differ at {differ / total:.2%} of decoder weights, "
          f"largest weight difference {largest:.2g}")
    ppl = cfg.evaluator.ppl
    for corpus in ppl.corpora:
        windows_ = cached_corpus_windows(tokenizer, corpus, cfg.paths.data_dir, ppl.seq_len, check_bos(ppl.bos))[:windows]
        x, y = (perplexity(m, windows_)["ppl"] for m in (exact, twin))
        print(f"  {corpus} perplexity ({len(windows_)} windows): exact Hessians {x:.3f}, perturbed {y:.3f} "
              f"(relative difference {abs(x - y) / x:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
