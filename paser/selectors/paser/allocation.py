"""CDAIS budget allocation: how many of the B samples each cluster gets.

n_k = ⌊B · w_k / Σ_j w_j⌋, capped at the cluster's size, where w_k comes from the cluster weight c_k
(PASER: the capability degradation score, CDS = mean divergence of the cluster) by ``rule``:

    proportional  w = c                       (the paper)
    equal         w = 1
    sqrt          w = √c
    log           w = ln(1 + c / mean(c))     (divided by the mean so the rule does not depend on the
                                               scale of c; ln(1 + c) alone is ≈ c for small JSDs)

If every weight is zero (e.g. the pruned model equals the original) the cluster sizes are used instead.
``redistribute=False`` is the paper's bare formula: the samples lost to flooring and to the caps are not
given out, so Σ n_k ≤ B (at most K short at the paper's scale, but 20% short on a small pool). ``redistribute=True`` hands the remainder to clusters that still have room, in
proportion to their weights, then one by one by largest fractional share, until B or the pool is used up.
"""

from __future__ import annotations

import logging

import numpy as np

from paser.errors import ConfigError

log = logging.getLogger(__name__)
RULES = ("proportional", "equal", "sqrt", "log")


def rule_weights(cluster_weights: np.ndarray, rule: str) -> np.ndarray:
    c = np.asarray(cluster_weights, dtype=np.float64)
    if rule not in RULES:
        raise ConfigError(f"selector.allocation='{rule}' is unknown; allowed: {list(RULES)}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError(f"cluster weights must be finite and >= 0, got {c}")
    if rule == "proportional":
        return c
    if rule == "equal":
        return np.ones_like(c)
    if rule == "sqrt":
        return np.sqrt(c)
    mean = c.mean()
    return np.log1p(c / mean) if mean > 0 else c


def allocate_budget(cluster_weights: np.ndarray, cluster_sizes: np.ndarray, budget: int,
                    rule: str = "proportional", redistribute: bool = False) -> np.ndarray:
    """Samples per cluster n_k (int64), with n_k <= cluster_sizes[k] and Σ n_k <= budget."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    w = rule_weights(cluster_weights, rule)
    if w.shape != sizes.shape:
        raise ValueError(f"{len(w)} cluster weights but {len(sizes)} cluster sizes")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if w.sum() <= 0:
        log.warning("all cluster weights are zero: allocating in proportion to cluster size")
        w = sizes.astype(np.float64)
    n = np.minimum(np.floor(budget * w / w.sum()).astype(np.int64), sizes)
    if not redistribute:
        return n
    while True:
        left = int(budget - n.sum())
        room = (sizes - n) * (w > 0)
        if left <= 0 or room.sum() == 0:
            return n
        share = left * np.where(room > 0, w, 0.0) / w[room > 0].sum()
        extra = np.minimum(np.floor(share).astype(np.int64), room)
        if extra.sum() == 0:  # every share is below one sample: largest fractional share first
            for k in np.lexsort((np.arange(len(w)), -share))[:left]:
                if room[k] > 0:
                    extra[k] = 1
        n += extra
