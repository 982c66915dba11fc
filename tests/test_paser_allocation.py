"""CDAIS budget allocation and IES ranking, on crafted cases computed by hand."""

import numpy as np
import pytest

from paser.errors import ConfigError
from paser.selectors.paser.allocation import allocate_budget
from paser.selectors.paser.selector import ies, rank_in_cluster


def test_proportional_floor():
    # B·CDS/ΣCDS = 10·(0.1, 0.2, 0.7) = (1, 2, 7); 11·(...) = (1.1, 2.2, 7.7) → floors (1, 2, 7), one lost
    assert allocate_budget([0.1, 0.2, 0.7], [100, 100, 100], 10).tolist() == [1, 2, 7]
    assert allocate_budget([0.1, 0.2, 0.7], [100, 100, 100], 11).tolist() == [1, 2, 7]
    # scale of the CDS does not matter
    assert allocate_budget([1.0, 2.0, 7.0], [100, 100, 100], 11).tolist() == [1, 2, 7]


def test_caps_and_redistribution():
    # the third cluster only has 3 samples: the paper's floor loses the rest ...
    assert allocate_budget([0.1, 0.2, 0.7], [100, 100, 3], 10).tolist() == [1, 2, 3]
    # ... redistribution: 4 left, shares 4·(1/3, 2/3) = (1.33, 2.67) → +(1, 2); 1 left → largest share (cluster 1)
    assert allocate_budget([0.1, 0.2, 0.7], [100, 100, 3], 10, redistribute=True).tolist() == [2, 5, 3]
    # the pool is smaller than the budget: everything, never more than a cluster holds
    assert allocate_budget([0.1, 0.2, 0.7], [1, 1, 3], 10, redistribute=True).tolist() == [1, 1, 3]
    # the floor remainder is handed out too: 11 → 7.7 +1
    assert allocate_budget([0.1, 0.2, 0.7], [100, 100, 100], 11, redistribute=True).sum() == 11


@pytest.mark.parametrize("rule", ["proportional", "equal", "sqrt", "log"])
@pytest.mark.parametrize("redistribute", [False, True])
def test_never_over_budget_or_size(rule, redistribute):
    rng = np.random.default_rng(1)
    for _ in range(50):
        k = rng.integers(1, 8)
        w, sizes, budget = rng.random(k), rng.integers(0, 40, k), int(rng.integers(0, 120))
        n = allocate_budget(w, sizes, budget, rule, redistribute)
        assert n.sum() <= budget and (n <= sizes).all() and (n >= 0).all()
        if redistribute:
            assert n.sum() == min(budget, sizes[w > 0].sum()) or w.sum() == 0


def test_rules():
    cds, sizes = np.array([1.0, 4.0]), np.array([100, 100])
    assert allocate_budget(cds, sizes, 10, "equal").tolist() == [5, 5]
    assert allocate_budget(cds, sizes, 30, "sqrt").tolist() == [10, 20]  # √1 : √4 = 1 : 2
    # log: ln(1 + c/mean), mean 2.5 → ln 1.4 : ln 2.6 = 0.336 : 0.956 → 100·(0.260, 0.740)
    assert allocate_budget(cds, sizes, 100, "log").tolist() == [26, 73]
    # no degradation anywhere: sizes decide
    assert allocate_budget([0.0, 0.0], [30, 10], 8).tolist() == [6, 2]
    with pytest.raises(ConfigError, match="allowed"):
        allocate_budget(cds, sizes, 10, "cubic")


def test_ies_and_order():
    div = np.array([0.2, 0.2, 0.33, 0.05])
    lengths = np.array([10, 100, 1000, 10])
    # IES = JSD / ln(L²): 0.2/4.605 = 0.0434, 0.2/9.21 = 0.0217, 0.33/13.8 = 0.0239, 0.05/4.605 = 0.0109
    values = ies(div, lengths)
    assert values[0] == pytest.approx(0.2 / (2 * np.log(10)))
    assert rank_in_cluster(np.arange(4), values).tolist() == [0, 2, 1, 3]
    # without the log, length dominates: 0.2/100 > 0.05/100 > 0.2/10⁴ > 0.33/10⁶
    assert rank_in_cluster(np.arange(4), ies(div, lengths, use_log=False)).tolist() == [0, 3, 1, 2]
    # ties keep pool order
    assert rank_in_cluster(np.array([5, 2, 9]), np.ones(10)).tolist() == [2, 5, 9]
