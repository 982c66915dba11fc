"""Selection budgets: how much data a selector may choose, counted in samples or in trained tokens.

``budget_unit: samples`` (the paper's): B samples. ``budget_unit: tokens``: B *trained tokens*, where a
sample's tokens are those recovery trains on, the templated prompt + response (+ EOS) after the cutoff
(``recovery.cutoff``; ``scoring.cutoff`` with recovery=none); the loss covers the response only, but a step
costs the whole sequence. Selectors compared at one token budget are compared at equal training compute.

A budget of either unit is a ``Budget``: its size and one cost per candidate (1 in samples, the sample's
tokens in tokens). Selectors walk their ranking through ``Budget.fill``, which takes the longest prefix of
the ranking that fits: the ranking is respected exactly, and a token budget is left short by less than the
cost of the first sample that did not fit (at most one sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from paser.errors import ConfigError

UNITS = ("samples", "tokens")


def resolve_budget(budget: float, total: int, unit: str = "samples") -> int:
    """A budget is a count (int >= 1) or a fraction of ``total`` (0 < float <= 1): of the pool's samples, or
    of its tokens."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ConfigError(f"budget must be a count or a fraction of the pool, got {budget!r}")
    if budget <= 0:
        raise ConfigError(f"budget={budget} must be > 0 (a count, or a fraction in (0, 1])")
    if isinstance(budget, float) and budget <= 1.0:
        return max(1, int(budget * total))
    if budget != int(budget):
        raise ConfigError(f"budget={budget} is neither a fraction in (0, 1] nor a whole count")
    if budget > total:
        raise ConfigError(f"budget={int(budget)} is larger than the pool ({total} {unit})")
    return int(budget)


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ConfigError(f"budget_unit={unit!r}; allowed: {', '.join(UNITS)}")
    return unit


@dataclass(frozen=True, eq=False)
class Budget:
    """``size`` units of ``unit``; ``costs[i]`` is candidate i's cost in tokens (None in samples: one each)."""

    size: int
    unit: str = "samples"
    costs: np.ndarray | None = None

    @classmethod
    def samples(cls, size: int) -> Budget:
        return cls(int(size))

    @classmethod
    def tokens(cls, size: int, token_counts) -> Budget:
        return cls(int(size), "tokens", np.asarray(token_counts, dtype=np.int64))

    @property
    def in_samples(self) -> bool:
        return self.unit == "samples"

    def unit_costs(self, n_candidates: int) -> np.ndarray:
        return np.ones(n_candidates, dtype=np.int64) if self.costs is None else self.costs

    def cost(self, indices) -> int:
        if self.costs is None:
            return len(indices)
        return int(self.costs[np.asarray(indices, dtype=np.int64)].sum()) if len(indices) else 0

    def fill(self, ranking, limit: int | None = None) -> np.ndarray:
        """The longest prefix of ``ranking`` whose cost is at most ``limit`` (default: the whole budget)."""
        ranking = np.asarray(ranking, dtype=np.int64)
        limit = self.size if limit is None else limit
        if self.costs is None:
            return ranking[: max(limit, 0)]
        within = np.cumsum(self.costs[ranking]) <= limit
        return ranking[: len(ranking) if within.all() else int(np.argmin(within))]

    def key(self) -> int | dict:
        """What the selection cache key and record hold: the count, as before token budgets, for samples."""
        return self.size if self.in_samples else {"unit": self.unit, "size": self.size}

    def __str__(self) -> str:
        return f"{self.size} {self.unit}"
