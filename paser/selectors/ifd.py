"""IFD, Instruction-Following Difficulty (Li et al. 2024, "From Quantity to Quality", Cherry LLM).

IFD(x, y) = s(y | x) / s(y), with s the mean cross-entropy of the answer tokens: conditioned on the
Alpaca-templated instruction, and unconditioned (after only a start token, as in the paper's formula;
Cherry_LLM's code puts "### Response:" there, which is ``unconditioned_prefix: "### Response:"``).
Both losses are taken over the same answer tokens (the answer is cut where the templated sample reaches
the cutoff). Samples with IFD > 1 (the instruction does not help at all) are dropped, as in the
reference; the highest IFD are kept.
"""

from __future__ import annotations

import time

import numpy as np

from paser.selectors.clustered import Scored, ScoredSelector, describe
from paser.selectors.lm_scores import answer_losses, check_model_choice


class IFDSelector(ScoredSelector):
    name = "ifd"

    def __init__(self, model: str = "pruned", unconditioned_prefix: str = "", drop_above_one: bool = True,
                 cluster: str | None = None, clustering: dict | None = None):
        super().__init__(cluster, clustering)
        self.model = check_model_choice(model)
        self.unconditioned_prefix = unconditioned_prefix or ""
        self.drop_above_one = bool(drop_above_one)

    def score(self, pool, ctx) -> Scored:
        t0 = time.perf_counter()
        cond = answer_losses(ctx, pool.rows, self.model, conditioned=True)
        t1 = time.perf_counter()
        uncond = answer_losses(ctx, pool.rows, self.model, conditioned=False, prefix=self.unconditioned_prefix)
        t2 = time.perf_counter()
        with np.errstate(divide="ignore", invalid="ignore"):
            ifd = cond / uncond
        ifd[~np.isfinite(ifd)] = np.nan  # no answer token left after truncation
        key = ifd.copy()
        if self.drop_above_one:
            key[ifd > 1] = np.nan
        return Scored(scores=ifd, rank_key=key, diagnostics={
            "model": self.model,
            "above_one": int((ifd > 1).sum()),
            "no_answer_tokens": int(np.isnan(ifd).sum()),
            "loss_conditioned": describe(cond),
            "loss_unconditioned": describe(uncond),
            "time_s": {"loss_conditioned": round(t1 - t0, 3), "loss_unconditioned": round(t2 - t1, 3)},
        })
