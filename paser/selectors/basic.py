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
    """B samples drawn uniformly without replacement (seeded by the run's seed)."""

    uses_budget = True
    uses_scoring = False

    def select(self, pool, budget, ctx) -> Selection:
        rng = np.random.default_rng(ctx.seed)
        indices = sorted(rng.choice(len(pool), size=budget, replace=False).tolist())
        return Selection(indices=indices, diagnostics={"selected": len(indices)})
