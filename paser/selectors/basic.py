"""The two reference points: the whole pool, and a seeded random subset."""

from __future__ import annotations

import numpy as np

from paser.components import Selection


class FullSelector:
    """All of D, whatever the budget (the 'full data' row)."""

    uses_budget = False
    uses_scoring = False

    def select(self, pool, budget, ctx) -> Selection:
        return Selection(indices=list(range(len(pool))), diagnostics={"selected": len(pool)})


class RandomSelector:
    """B samples drawn uniformly without replacement (seeded by the run's seed); with a token budget, the
    samples of a seeded random order until the next one would not fit."""

    uses_budget = True
    uses_scoring = False

    def select(self, pool, budget, ctx) -> Selection:
        rng = np.random.default_rng(ctx.seed)
        if budget.in_samples:  # the draw every earlier sample-budget run made
            chosen = rng.choice(len(pool), size=budget.size, replace=False)
        else:
            chosen = budget.fill(rng.permutation(len(pool)))
        indices = sorted(int(i) for i in chosen)
        return Selection(indices=indices, diagnostics={"selected": len(indices), "cost": budget.cost(indices)})
