"""Paired bootstrap of scripts/make_tables.py on synthetic per-window and per-document data with a known
difference, and the per-sample files a run writes beside results.json (also from a cache hit)."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from tests.conftest import DATA_DIR, ROOT, TINY_RUN, requires_shared_data

_spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts" / "make_tables.py")
mt = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_tables", mt)  # dataclasses look their module up there
_spec.loader.exec_module(mt)

TOKENS = 127  # scored tokens per window


def windows(rng, n: int = 400, mean: float = 3.0, spread: float = 0.3) -> np.ndarray:
    """Per-window summed NLL: windows differ a lot in difficulty (spread nats per token between windows)."""
    return TOKENS * (mean + spread * rng.standard_normal(n))


def shifted(rng, a: np.ndarray, shift: float, noise: float = 0.05) -> np.ndarray:
    """The same windows ``shift`` nats per token worse, with per-window noise (nats per token)."""
    return a + TOKENS * (shift + noise * rng.standard_normal(len(a)))


def ppl(nll: np.ndarray) -> float:
    return math.exp(nll.sum() / (TOKENS * len(nll)))


def tok(n: int) -> np.ndarray:
    return np.full(n, TOKENS)


def test_a_known_perplexity_shift_is_covered_and_significant():
    rng = np.random.default_rng(0)
    a = windows(rng)
    b = shifted(rng, a, 0.1)
    truth = ppl(a) * (math.exp(0.1) - 1)  # the shift without its noise
    res = mt.paired_interval([mt.ppl_stratum(b, tok(len(b)), a, tok(len(a)))], iters=2000, seed=0)
    assert res["lo"] < truth < res["hi"] and res["lo"] > 0 and res["significant"]
    assert res["diff"] == pytest.approx(ppl(b) - ppl(a))
    assert res["seeds"] == 1 and res["units"] == [len(a)]


def test_no_shift_is_not_significant():
    rng = np.random.default_rng(1)
    a = windows(rng)
    b = shifted(rng, a, 0.0)
    res = mt.paired_interval([mt.ppl_stratum(b, tok(len(b)), a, tok(len(a)))], iters=2000, seed=0)
    assert res["lo"] < 0 < res["hi"] and not res["significant"]


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    """40 synthetic data sets (seeded): the 95% interval holds the population's difference (windows of mean
    difficulty 3 nats per token, 0.1 worse) in ~38; with no shift it excludes 0 in ~2."""
    covered = false_alarms = 0
    for k in range(40):
        rng = np.random.default_rng(100 + k)
        a = windows(rng, n=200)
        b = shifted(rng, a, 0.1)
        res = mt.paired_interval([mt.ppl_stratum(b, tok(200), a, tok(200))], iters=500, seed=k)
        covered += res["lo"] < math.exp(3.1) - math.exp(3.0) < res["hi"]
        null = shifted(rng, a, 0.0)
        false_alarms += mt.paired_interval([mt.ppl_stratum(null, tok(200), a, tok(200))], iters=500,
                                            seed=k)["significant"]
    assert covered >= 34 and false_alarms <= 6


def test_wrong_pairing_gives_a_wider_interval():
    rng = np.random.default_rng(2)
    a = windows(rng)
    b = shifted(rng, a, 0.1)
    paired = mt.paired_interval([mt.ppl_stratum(b, tok(len(b)), a, tok(len(a)))], iters=2000, seed=0)
    shuffled = mt.paired_interval([mt.ppl_stratum(rng.permutation(b), tok(len(b)), a, tok(len(a)))],
                                   iters=2000, seed=0)
    assert shuffled["diff"] == pytest.approx(paired["diff"])  # the totals are the same ...
    assert shuffled["hi"] - shuffled["lo"] > 3 * (paired["hi"] - paired["lo"])  # ... the pairing is lost


def test_accuracy_difference_of_paired_documents():
    """B answers correctly every document A does plus 5% more (a latent difficulty shared by both):
    the paired difference is +5 points, tight; unpaired (shuffled documents) the interval is far wider."""
    rng = np.random.default_rng(3)
    u = rng.random(2000)
    a, b = (u < 0.60).astype(np.int8), (u < 0.65).astype(np.int8)
    res = mt.paired_interval([mt.acc_stratum(b, a)], iters=2000, seed=0)
    assert res["diff"] == pytest.approx(100 * (b.mean() - a.mean()))
    assert res["lo"] < 5 < res["hi"] and res["significant"]
    shuffled = mt.paired_interval([mt.acc_stratum(rng.permutation(b), a)], iters=2000, seed=0)
    assert shuffled["hi"] - shuffled["lo"] > 2 * (res["hi"] - res["lo"])
    same = mt.paired_interval([mt.acc_stratum(a, a)], iters=200, seed=0)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and not same["significant"]


def test_seeds_are_the_outer_level():
    """Three seed pairs on the same windows: shifts that vary over seeds widen the interval, around their
    mean; identical seeds leave the evaluation noise alone (the single-seed interval)."""
    rng = np.random.default_rng(4)
    a = windows(rng)
    steady = np.array([shifted(np.random.default_rng(10), a, 0.1)] * 3)
    varying = np.array([shifted(np.random.default_rng(10 + s), a, d) for s, d in enumerate((0.05, 0.1, 0.15))])
    ref, t = np.array([a] * 3), np.full((3, len(a)), TOKENS)
    one = mt.paired_interval([mt.ppl_stratum(steady[0], t[0], a, t[0])], iters=2000, seed=0)
    same = mt.paired_interval([mt.ppl_stratum(steady, t, ref, t)], iters=2000, seed=0)
    spread = mt.paired_interval([mt.ppl_stratum(varying, t, ref, t)], iters=2000, seed=0)
    assert same["seeds"] == 3 and same["hi"] - same["lo"] == pytest.approx(one["hi"] - one["lo"], rel=0.15)
    assert spread["hi"] - spread["lo"] > 3 * (same["hi"] - same["lo"])
    assert spread["lo"] < ppl(a) * (math.exp(0.1) - 1) < spread["hi"]


def test_with_seeds_the_interval_is_a_t_interval_over_their_differences():
    """Windows of equal difficulty within a seed leave no evaluation noise: the interval is the t-interval
    of the per-seed differences, by hand: d = (1, 2, 3), mean 2, sd 1, 2 df, t = 4.302653,
    half-width 4.302653 / sqrt(3) = 2.484138 (a percentile bootstrap over the 3 seeds gave about [1, 3])."""
    n = 50
    ref = np.zeros((3, n))                                     # ppl 1 on every window
    rows = np.array([np.full(n, math.log(c)) for c in (2.0, 3.0, 4.0)]) * TOKENS  # ppl 2, 3, 4
    t = np.full((3, n), TOKENS)
    res = mt.paired_interval([mt.ppl_stratum(rows, t, ref, t)], iters=300, seed=0)
    assert res["diff"] == pytest.approx(2.0) and res["per_seed"] == pytest.approx([1.0, 2.0, 3.0])
    assert res["se_units"] == pytest.approx(0.0, abs=1e-9) and res["df"] == 2
    assert (res["lo"], res["hi"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert not res["significant"] and res["method"].startswith("t over seed pairs")


def test_three_seed_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Each seed pair's true difference varies around the population's (a training effect of 0.04 nats per
    token, sd over seeds); three seed pairs per data set: the interval must cover the mean shift in ~95% of
    60 data sets, as a percentile bootstrap over the three seeds (about their min–max) does not."""
    covered = 0
    for k in range(60):
        rng = np.random.default_rng(500 + k)
        a = windows(rng, n=200)
        b = np.array([shifted(rng, a, 0.1 + 0.04 * rng.standard_normal()) for _ in range(3)])
        ref, t = np.array([a] * 3), np.full((3, 200), TOKENS)
        res = mt.paired_interval([mt.ppl_stratum(b, t, ref, t)], iters=300, seed=k)
        truth = ppl(a) * (math.exp(0.1) - 1)
        covered += res["lo"] < truth < res["hi"]
    assert covered >= 53


def test_several_strata_average_their_differences():
    """The zero-shot mean: tasks resampled each on its own documents, differences averaged over tasks."""
    rng = np.random.default_rng(5)
    u1, u2 = rng.random(1500), rng.random(800)
    t1 = mt.acc_stratum((u1 < 0.7).astype(int), (u1 < 0.6).astype(int))  # +10 points
    t2 = mt.acc_stratum((u2 < 0.5).astype(int), (u2 < 0.5).astype(int))  # no difference
    res = mt.paired_interval([t1, t2], iters=2000, seed=0)
    assert res["diff"] == pytest.approx(100 * ((u1 < 0.7).mean() - (u1 < 0.6).mean()) / 2)
    assert res["lo"] < 5 < res["hi"] and res["significant"] and res["units"] == [1500, 800]


def test_the_bootstrap_is_seeded():
    rng = np.random.default_rng(6)
    a = windows(rng)
    b = shifted(rng, a, 0.02)
    s = [mt.ppl_stratum(b, tok(len(b)), a, tok(len(a)))]
    assert mt.paired_interval(s, iters=300, seed=7) == mt.paired_interval(s, iters=300, seed=7)
    assert mt.paired_interval(s, iters=300, seed=7)["lo"] != mt.paired_interval(s, iters=300, seed=8)["lo"]


# ------------------------------------------------------------------- per-sample files of a run

@requires_shared_data()
def test_a_run_writes_per_sample_files_and_a_cache_hit_reproduces_them(compose_cfg, tmp_path):
    from paser import pipeline

    base = [o for o in TINY_RUN if not o.startswith("recovery.")] + [
        "recovery=none", "+evaluator.zeroshot._target_=paser.evaluation.zeroshot.ZeroShotEvaluator",
        "+evaluator.zeroshot.tasks=[piqa]", "+evaluator.zeroshot.limit=4", "+evaluator.zeroshot.bootstrap_iters=0",
        f"+evaluator.zeroshot.data_dir={DATA_DIR}"]
    cold = pipeline.run(compose_cfg(base), run_dir=tmp_path / "cold")
    warm = pipeline.run(compose_cfg(base), run_dir=tmp_path / "warm")
    assert warm["timings"]["eval_pruned_ppl"]["reused"] and warm["timings"]["eval_dense_zeroshot"]["reused"]
    names = sorted(p.name for p in (tmp_path / "cold" / "per_sample").iterdir())
    assert names == ["dense_ppl.npz", "dense_zeroshot.npz", "pruned_ppl.npz", "pruned_zeroshot.npz"]
    for name in names:
        with np.load(tmp_path / "cold" / "per_sample" / name) as c, np.load(tmp_path / "warm" / "per_sample" / name) as w:
            assert c.files == w.files and all((c[k] == w[k]).all() for k in c.files)
    with np.load(tmp_path / "cold" / "per_sample" / "pruned_ppl.npz") as z:
        m = cold["metrics"]["pruned"]["ppl"]["wikitext2"]
        assert len(z["wikitext2/nll"]) == m["windows"] == 2
        assert math.exp(z["wikitext2/nll"].sum() / z["wikitext2/tokens"].sum()) == pytest.approx(m["ppl"])
    with np.load(tmp_path / "cold" / "per_sample" / "dense_zeroshot.npz") as z:
        assert z["piqa/doc_id"].tolist() == [0, 1, 2, 3]
        assert z["piqa/acc"].mean() == pytest.approx(cold["metrics"]["dense"]["zeroshot"]["tasks"]["piqa"]["acc"])
