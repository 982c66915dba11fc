"""Token budgets (``budget_unit: tokens``) and the validation set shared by every selector of a comparison.

Expected selections are worked out by hand from the costs and the rankings, not from the code under test.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from paser import pipeline
from paser.budget import Budget, resolve_budget
from paser.cache import StageCache
from paser.data import Pool, encode_pool, hold_out
from paser.errors import ConfigError
from paser.models import load_tokenizer
from paser.selectors.paser.selector import PaserSelector
from tests.conftest import TINY_RUN
from tests.test_paser_selector import SMALL, make_ctx, make_pool
from tests.test_selectors_baselines import make_ctx as make_baseline_ctx
from tests.test_selectors_baselines import make_pool as make_baseline_pool


def test_fill_takes_the_longest_prefix_of_the_ranking_that_fits():
    budget = Budget.tokens(10, [5, 3, 7, 2])
    assert budget.fill([0, 1, 2, 3]).tolist() == [0, 1]       # 5 + 3 = 8; + 7 = 15 > 10: stop (not skip)
    assert budget.fill([3, 1, 0, 2]).tolist() == [3, 1, 0]    # 2 + 3 + 5 = 10 fits exactly
    assert budget.fill([2, 0], limit=6).tolist() == []        # the first already exceeds the limit
    assert budget.cost([0, 3]) == 7
    samples = Budget.samples(2)
    assert samples.fill([4, 2, 9]).tolist() == [4, 2] and samples.cost([4, 2]) == 2
    assert samples.key() == 2 and budget.key() == {"unit": "tokens", "size": 10}


def test_a_token_budget_can_be_a_fraction_of_the_pool_tokens():
    assert resolve_budget(0.25, 1000, "tokens") == 250
    with pytest.raises(ConfigError, match=r"larger than the pool \(100 tokens\)"):
        resolve_budget(101, 100, "tokens")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="budget"):
            resolve_budget(bad, 100)


def test_validation_rows_are_drawn_by_their_own_seed_and_kept_out_of_the_candidates():
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(30)]
    pool = Pool(rows=rows, source="t", fingerprint="f")
    candidates, held = hold_out(pool, 5, seed=0)
    assert len(held) == 5 and len(candidates) == 25 and not set(held) & set(candidates.positions)
    assert [pool.rows[i] for i in candidates.positions] == candidates.rows
    assert hold_out(pool, 5, seed=0)[1] == held and hold_out(pool, 5, seed=1)[1] != held
    assert hold_out(pool, 0, seed=0) == (pool, [])
    with pytest.raises(ConfigError, match="recovery.val_size=30 leaves no candidates"):
        hold_out(pool, 30, seed=0)


# ------------------------------------------------------------------------------ selectors, called directly

def test_a_scored_selector_walks_its_ranking_until_the_next_sample_does_not_fit(tmp_path, monkeypatch):
    from paser.selectors import instruction_mining as im

    # predicted loss = index: the ranking is 0, 1, 2, ...
    monkeypatch.setitem(im.INDICATORS, "index", lambda sel, pool, ctx: np.arange(len(pool), dtype=float))
    costs = [4, 6, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    sel = im.InstructionMiningSelector(coefficients={"index": 1.0}).select(
        make_baseline_pool(), Budget.tokens(14, costs), make_baseline_ctx(tmp_path))
    assert sel.indices == [0, 1]  # 4 + 6 = 10; sample 2 (5 tokens) would make 15 > 14: the walk stops there
    assert sel.diagnostics["cost"] == 10


def test_random_takes_a_prefix_of_a_seeded_order(tmp_path):
    from paser.selectors.basic import RandomSelector

    costs = np.arange(1, 13)
    sel = RandomSelector().select(make_baseline_pool(), Budget.tokens(30, costs), make_baseline_ctx(tmp_path, seed=3))
    order = np.random.default_rng(3).permutation(12)
    expected = []
    for i in order:  # by hand: the samples of the seeded order until the next would pass 30 tokens
        if sum(costs[expected]) + costs[i] > 30:
            break
        expected.append(int(i))
    assert sel.indices == sorted(expected) and sel.diagnostics["cost"] == sum(costs[expected])


@pytest.mark.parametrize("kw", [{"use_ntm": False}, {}, {"allocate": False, "ies_length": "none", "use_ntm": False}])
def test_paser_spends_a_token_budget_within_one_sample(models, tmp_path, kw):
    pool = make_pool()
    costs = np.random.default_rng(0).integers(1, 40, len(pool))  # widely varying: a skip would find a fit
    budget = Budget.tokens(int(costs.sum() * 0.3), costs)
    sel = PaserSelector(**SMALL, **kw).select(pool, budget, make_ctx(models, tmp_path))
    spent = costs[sel.indices].sum()
    assert spent <= budget.size and budget.size - spent < costs.max()
    assert sel.diagnostics["cost"] == spent and sel.diagnostics["unit"] == "tokens"
    arrays = np.load(io.BytesIO(sel.artifacts["paser_samples.npz"]))
    key, labels = arrays["ies"], arrays["labels"]
    if kw.get("ies_length") == "none":  # JSD alone: the ranking key is the divergence
        np.testing.assert_array_equal(key, arrays["divergence"])
    if not kw.get("use_ntm", True):  # each cluster's picks are a prefix of its ranking (by decreasing key)
        groups = [np.arange(len(pool))] if not kw.get("allocate", True) else \
            [np.flatnonzero(labels == k) for k in range(labels.max() + 1)]
        chosen = set(sel.indices)
        for members in groups:
            ranking = members[np.lexsort((members, -key[members]))]
            picked = [i in chosen for i in ranking]
            assert picked == sorted(picked, reverse=True), "a cluster skipped a better-ranked sample"


def test_jsd_alone_ranks_by_the_divergence_whatever_the_length(models, tmp_path):
    pool = make_pool()
    sel = PaserSelector(**SMALL, use_s2ric=False, use_ntm=False, ies_length="none").select(
        pool, Budget.samples(9), make_ctx(models, tmp_path))
    assert sel.indices == sorted(np.argsort(-sel.scores, kind="stable")[:9].tolist())


# ------------------------------------------------------------------------------ the pipeline

TOKENS_RUN = [o for o in TINY_RUN if not o.startswith(("budget=", "recovery.val_size", "recovery.keep"))] + \
    ["budget_unit=tokens", "budget=400", "recovery.val_size=4", "recovery.val_seed=7", "recovery.keep=best"]


def candidate_costs(cfg) -> tuple[list[int], np.ndarray]:
    parts = pipeline.build_components(cfg)
    tok = load_tokenizer(cfg.model, StageCache(cfg.paths.cache_dir))
    costs = np.array([len(e.input_ids) for e in encode_pool(tok, parts.candidates.rows, cfg.recovery.cutoff)])
    return list(parts.candidates.positions), costs


@pytest.mark.parametrize("selector", ["random", "ifd", "full"])
def test_token_budget_end_to_end(compose_cfg, tmp_path, selector):
    cfg = compose_cfg(TOKENS_RUN + [f"selector={selector}"])
    results = pipeline.run(cfg, run_dir=tmp_path / "r")
    positions, costs = candidate_costs(cfg)
    chosen = json.loads((tmp_path / "r" / "selected_indices.json").read_text())
    spent = sum(costs[positions.index(i)] for i in chosen)
    tokens = results["selection"]["stats"]["tokens"]
    assert tokens["total"] == spent == tokens["prompt"] + tokens["response"]
    if selector == "full":  # ignores the budget: every candidate
        assert len(chosen) == len(positions)
    else:
        assert spent <= 400 and 400 - spent < costs.max()
        assert results["selection"]["budget"] == {"unit": "tokens", "size": 400}


def test_every_selector_and_seed_is_validated_on_the_same_rows(compose_cfg, tmp_path):
    runs = []
    for seed in (0, 1):
        cfg = compose_cfg(TOKENS_RUN + [f"seed={seed}"])
        runs.append(pipeline.run(cfg, run_dir=tmp_path / f"s{seed}"))
        chosen = set(json.loads((tmp_path / f"s{seed}" / "selected_indices.json").read_text()))
        _, held = hold_out(pipeline.build_components(cfg).pool, 4, seed=7)
        assert not chosen & set(held)
        assert runs[-1]["selection"]["validation_indices"] == held
    assert all(r["recovery"]["val_curve"] for r in runs)
