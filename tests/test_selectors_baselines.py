"""IFD, Nuggets, Instruction Mining and their S²RIC hybrids, on the tiny random Llama.

Golden values are recomputed here without the code under test: one plain forward per sequence and a
hand-written cross-entropy (logsumexp minus the target logit).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from paser.budget import Budget
from paser.cache import StageCache
from paser.components import SelectionContext
from paser.data import Pool, alpaca_prompt
from paser.errors import ConfigError
from paser.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet, exercise regularly and sleep well."},
    {"instruction": "What are the three primary colors?", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Describe the structure of an atom.", "input": "",
     "output": "An atom is made up of a nucleus of protons and neutrons surrounded by electrons."},
    {"instruction": "Write a response.", "input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"instruction": "Give three colors.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Count.", "input": "", "output": "0123456789"},
    {"instruction": "Describe the fox.", "input": "", "output": "The fox is quick and brown."},
    {"instruction": "What is an atom made of?", "input": "",
     "output": "A nucleus of protons and neutrons, and electrons around it."},
    {"instruction": "Give three tips.", "input": "", "output": "Sleep well, exercise and eat a balanced diet."},
    {"instruction": "Describe the dog.", "input": "", "output": "The dog is lazy."},
    {"instruction": "Write the digits.", "input": "", "output": "0 1 2 3 4 5 6 7 8 9"},
    {"instruction": "Complete the request.", "input": "three primary colors", "output": "Red, blue, yellow."},
]


class StubEmbedder:
    """Fixed unit vectors per text: given ones (by instruction) or seeded pseudo-random ones."""

    def __init__(self, vectors: dict[str, np.ndarray] | None = None, dim: int = 8):
        self.vectors, self.dim = vectors or {}, dim

    def encode(self, texts, **kwargs):
        out = []
        for t in texts:
            v = self.vectors.get(t.split("\n")[0])
            if v is None:
                seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
                v = np.random.default_rng(seed).normal(size=self.dim)
            v = np.asarray(v, dtype=np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def make_pool(rows=ROWS) -> Pool:
    return Pool(rows=[dict(r) for r in rows], source="test", fingerprint=hashlib.sha256(repr(rows).encode()).hexdigest()[:16])


_TRAINED = {}


def trained_tiny():
    """The tiny Llama after a few full-batch steps on ROWS, so that instructions help predict answers for
    some samples (IFD < 1) and not for others: a random model has IFD ~ 1 everywhere."""
    if not _TRAINED:
        model, tok = tiny_llama(seed=0)
        seqs = [tok(alpaca_prompt(r) + r["output"])["input_ids"] for r in ROWS]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(0)
        model.train()
        for _ in range(15):
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
        _TRAINED["model"] = model.eval()
    return _TRAINED["model"]


def make_ctx(tmp_path, embedder=None, cutoff=128, batch_size=4, seed=0):
    pruned, tok = trained_tiny(), tiny_llama(seed=0)[1]
    original, _ = tiny_llama(seed=1)
    return SelectionContext(
        tokenizer=tok, original_model=lambda: original, pruned_model=lambda: pruned,
        embedder=lambda: embedder or StubEmbedder(), embedder_name="stub", cache=StageCache(tmp_path / "cache"),
        cache_key={"model": "tiny", "pruner": "p", "pool": "pool"}, seed=seed, cutoff=cutoff, batch_size=batch_size)


# ----------------------------------------------------------------------------- independent reference

def answer_logprobs(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start, from one plain forward and a hand-written softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    out = []
    for t in range(max(start, 1), len(ids)):
        row = logits[t - 1]
        out.append(float(row[ids[t]] - torch.logsumexp(row, 0)))
    return out


CHERRY_PROMPT_DICT = {  # typed from Cherry_LLM's cherry_seletion/data_analysis.py: no newline after "### Response:"
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def cherry_sequences(tok, row, max_length, direct_prefix="### Response:"):
    """What Cherry_LLM scores (data_analysis.py --mod cherry --prompt alpaca, then data_by_IFD.py), per its
    code: ((conditioned ids, answer start), (answer-only ids, answer start)), or None where data_by_IFD.py
    skips the sample. Each text is encoded whole with the tokenizer's BOS and truncated to its max_length;
    the answer starts after the tokens of text[:text.rfind(output)] encoded alone."""
    output = row["output"]
    prompt = CHERRY_PROMPT_DICT["prompt_input" if row["input"] else "prompt_no_input"].format_map(row)
    instruct_len = len(tok(prompt)["input_ids"][:max_length])
    if max_length - instruct_len <= 0:
        return None

    def part(text, length):
        ids = tok(text)["input_ids"][:length]
        return ids, len(tok(text[:text.rfind(output)])["input_ids"])

    alone = part(direct_prefix + output, max_length - instruct_len + 4)
    condition = part(prompt + output, max_length)
    len_1, len_2 = len(alone[0]) - alone[1], len(condition[0]) - condition[1]
    if len_1 <= 0 or len_2 <= 0 or instruct_len + len_1 > max_length:
        return None
    return condition, alone


def reference_ifd(model, tok, row, cutoff, direct_prefix="### Response:"):
    """(IFD, conditioned loss, unconditioned loss) as Cherry_LLM computes them (NaN where it skips)."""
    seqs = cherry_sequences(tok, row, cutoff, direct_prefix)
    if seqs is None:
        return float("nan"), float("nan"), float("nan")
    (cond_ids, cond_start), (alone_ids, alone_start) = seqs
    cond = -np.mean(answer_logprobs(model, cond_ids, cond_start))
    uncond = -np.mean(answer_logprobs(model, alone_ids, alone_start))
    return cond / uncond, cond, uncond


def reference_ifd_ours(model, tok, row, cutoff, prefix=""):
    """The ``prompt_format: alpaca, truncation: same_answer`` option: the Alpaca-templated text encoded whole,
    cut at the cutoff; the unconditioned loss over exactly its answer tokens after <s> and the prefix."""
    text = tok(alpaca_prompt(row) + row["output"])["input_ids"][:cutoff]  # the tiny tokenizer puts <s> first
    start = min(len(tok(alpaca_prompt(row))["input_ids"]), cutoff)    # byte-level: it splits at the newline
    answer = text[start:]
    if not answer:
        return float("nan"), float("nan"), float("nan")
    head = [tok.bos_token_id] + (tok(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
    cond = -np.mean(answer_logprobs(model, text, start))
    uncond = -np.mean(answer_logprobs(model, head + answer, len(head)))
    return cond / uncond, cond, uncond


# --------------------------------------------------------------------------------------------- IFD

def test_ifd_matches_per_sample_cross_entropy(tmp_path):
    from paser.selectors.ifd import IFDSelector

    cutoff = 90  # three answers are cut short; the two samples with an input have no answer token left
    ctx = make_ctx(tmp_path, cutoff=cutoff)
    pool = make_pool()
    sel = IFDSelector(model="pruned").select(pool, Budget.samples(3), ctx)
    expected = np.array([reference_ifd(ctx.pruned_model, ctx.tokenizer, r, cutoff)[0] for r in pool.rows])
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-4, equal_nan=True)
    eligible = [i for i in range(len(pool)) if expected[i] <= 1]
    assert 3 < len(eligible) < len(pool) - np.isnan(expected).sum()  # both sides of IFD = 1 occur
    best = sorted(eligible, key=lambda i: -expected[i])[:3]
    assert sel.indices == sorted(best)
    assert all(expected[i] <= 1 for i in sel.indices)
    d = sel.diagnostics
    assert d["selected"] == 3 and d["above_one"] == int((expected > 1).sum())
    assert d["unscored"] == int(np.isnan(expected).sum())
    assert {"loss_conditioned", "loss_unconditioned", "score", "time_s"} <= set(d)


def test_ifd_original_model_and_prefix_change_scores(tmp_path):
    from paser.selectors.ifd import IFDSelector

    ctx = make_ctx(tmp_path)
    pool = make_pool()
    pruned = IFDSelector(model="pruned").select(pool, Budget.samples(3), ctx).scores
    original = IFDSelector(model="original").select(pool, Budget.samples(3), ctx).scores
    expected = [reference_ifd(ctx.original_model, ctx.tokenizer, r, ctx.cutoff)[0] for r in pool.rows]
    np.testing.assert_allclose(original, expected, rtol=1e-4, equal_nan=True)
    assert not np.allclose(pruned, original)
    bare = IFDSelector(unconditioned_prefix="").select(pool, Budget.samples(3), ctx).scores  # the paper's s(answer)
    expected = [reference_ifd(ctx.pruned_model, ctx.tokenizer, r, ctx.cutoff, direct_prefix="")[0] for r in pool.rows]
    np.testing.assert_allclose(bare, expected, rtol=1e-4, equal_nan=True)
    assert not np.allclose(pruned, bare)


@pytest.mark.parametrize("prefix", ["", "### Response:"])
def test_ifd_our_template_and_truncation_option(tmp_path, prefix):
    from paser.selectors.ifd import IFDSelector

    cutoff = 90
    ctx = make_ctx(tmp_path, cutoff=cutoff)
    pool = make_pool()
    sel = IFDSelector(prompt_format="alpaca", truncation="same_answer", unconditioned_prefix=prefix).select(pool, Budget.samples(3), ctx)
    expected = [reference_ifd_ours(ctx.pruned_model, ctx.tokenizer, r, cutoff, prefix)[0] for r in pool.rows]
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-4, equal_nan=True)
    cherry = IFDSelector().select(pool, Budget.samples(3), ctx).scores  # the same cache: the options must key apart
    assert not np.allclose(sel.scores, cherry, equal_nan=True)


def test_ifd_deterministic_and_cached(tmp_path):
    from paser.selectors.ifd import IFDSelector

    pool = make_pool()
    first = IFDSelector().select(pool, Budget.samples(4), make_ctx(tmp_path / "a"))
    again = IFDSelector().select(pool, Budget.samples(4), make_ctx(tmp_path / "b"))
    assert first.indices == again.indices and len(first.indices) == 4
    ctx = make_ctx(tmp_path / "a")
    ctx._factories["pruned_model"] = lambda: pytest.fail("cached scores must not load the model")
    assert IFDSelector().select(pool, Budget.samples(4), ctx).indices == first.indices


def test_ifd_bad_config():
    from paser.selectors.ifd import IFDSelector

    with pytest.raises(ConfigError, match="selector.model"):
        IFDSelector(model="teacher")
    with pytest.raises(ConfigError, match="selector.cluster"):
        IFDSelector(cluster="kmeans")
    with pytest.raises(ConfigError, match="clustering"):
        IFDSelector(cluster="s2ric", clustering={"n_cluster": 3})
    with pytest.raises(ConfigError, match=r"selector.prompt_format='wiz' is unknown; allowed: \['alpaca', 'cherry'\]"):
        IFDSelector(prompt_format="wiz")
    with pytest.raises(ConfigError, match=r"selector.truncation='left' is unknown; allowed: \['cherry', 'same_answer'\]"):
        IFDSelector(truncation="left")
    with pytest.raises(ConfigError, match="selector.unconditioned_prefix=3 must be a string"):
        IFDSelector(unconditioned_prefix=3)


# ----------------------------------------------------------------------------------------- Nuggets

TWO_GROUPS = {  # two tight groups of instructions: k-means with 2 centres splits them exactly
    r["instruction"]: np.array([1.0, 0.1 * i, 0, 0]) if i < 6 else np.array([0, 0, 1.0, 0.1 * (i - 6)])
    for i, r in enumerate(ROWS)
}


def reference_golden(model, tok, rows, anchor_ids, cutoff=128, separator="", zero_shot_bos=False):
    """Golden score of every row against the given anchors, with plain per-sequence forwards, as pldlgb/nuggets
    builds them (tasks/loader.py, instruction_main.py): the anchor's prompt + answer encoded whole without
    special tokens, its answer after the prompt's own tokens; zero-shot: the anchor alone (no BOS); one-shot:
    the demonstration encoded with its BOS, the anchor's tokens directly after it. ``separator`` and
    ``zero_shot_bos`` are our options."""
    sep = tok(separator, add_special_tokens=False)["input_ids"] if separator else []
    head = tok("")["input_ids"] if zero_shot_bos else []

    def anchor(r):
        query = alpaca_prompt(r)
        return (tok(query + r["output"], add_special_tokens=False)["input_ids"][:cutoff],
                len(tok(query, add_special_tokens=False)["input_ids"]))

    zero = []
    for a in anchor_ids:
        seq, start = anchor(rows[a])
        zero.append(sum(answer_logprobs(model, head + seq, len(head) + start)))
    golden = []
    for r in rows:
        demo = tok(alpaca_prompt(r) + r["output"])["input_ids"][:cutoff + 1] + sep  # <s> + the text (cut at the cutoff)
        wins = []
        for a, z in zip(anchor_ids, zero):
            seq, start = anchor(rows[a])
            wins.append(sum(answer_logprobs(model, demo + seq, len(demo) + start)) > z)
        golden.append(np.mean(wins))
    return np.array(golden)


@pytest.mark.parametrize("reuse_prefix_kv,separator,zero_shot_bos",
                         [(True, "", False), (False, "", False), (True, "\n\n", True), (False, "\n\n", False)])
def test_nuggets_two_anchor_golden_scores(tmp_path, reuse_prefix_kv, separator, zero_shot_bos):
    from paser.selectors.nuggets import NuggetsSelector

    ctx = make_ctx(tmp_path, embedder=StubEmbedder(TWO_GROUPS))
    pool = make_pool()
    sel = NuggetsSelector(n_anchors=2, reuse_prefix_kv=reuse_prefix_kv, separator=separator,
                          zero_shot_bos=zero_shot_bos).select(pool, Budget.samples(4), ctx)
    anchors = sel.diagnostics["anchors"]
    # the sample nearest each group's mean: rows 2..3 of the first group (0.25 away), rows 8..9 of the other
    assert sorted(anchors) in ([2, 8], [2, 9], [3, 8], [3, 9])
    expected = reference_golden(ctx.pruned_model, ctx.tokenizer, pool.rows, anchors, separator=separator,
                                zero_shot_bos=zero_shot_bos)
    assert set(np.unique(expected)) <= {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(sel.scores, expected)
    order = sorted(range(len(pool)), key=lambda i: (-expected[i], i))
    assert sel.indices == sorted(order[:4])
    assert sel.diagnostics["anchor_evaluations"] == len(pool) * 2


def test_nuggets_resumes_after_interruption(tmp_path, monkeypatch):
    from paser.selectors import nuggets

    pool = make_pool(ROWS[:8])
    full = nuggets.NuggetsSelector(n_anchors=2, chunk_size=3).select(pool, Budget.samples(3), make_ctx(tmp_path / "ref"))
    calls, fail = [], [True]
    real = nuggets.golden_scores

    class Killed(Exception):
        pass

    def flaky(model, tok, rows, *args, **kwargs):
        calls.append(len(rows))
        if fail[0] and len(calls) == 2:
            fail[0] = False
            raise Killed  # the run dies while scoring the second chunk
        return real(model, tok, rows, *args, **kwargs)

    monkeypatch.setattr(nuggets, "golden_scores", flaky)
    with pytest.raises(Killed):
        nuggets.NuggetsSelector(n_anchors=2, chunk_size=3).select(pool, Budget.samples(3), make_ctx(tmp_path / "run"))
    calls.clear()
    resumed = nuggets.NuggetsSelector(n_anchors=2, chunk_size=3).select(pool, Budget.samples(3), make_ctx(tmp_path / "run"))
    assert calls == [3, 2]  # the first chunk of 3 candidates came from disk
    np.testing.assert_array_equal(resumed.scores, full.scores)
    assert resumed.indices == full.indices


def test_nuggets_diagnostics_equal_cold_and_warm(tmp_path):
    from paser.selectors.nuggets import NuggetsSelector

    ctx = make_ctx(tmp_path)
    cold = NuggetsSelector(n_anchors=2, chunk_size=4).select(make_pool(), Budget.samples(3), ctx)
    warm = NuggetsSelector(n_anchors=2, chunk_size=4).select(make_pool(), Budget.samples(3), ctx)  # every score from the cache

    def untimed(diag):
        return {k: v for k, v in diag.items() if k != "time_s"}

    assert untimed(warm.diagnostics) == untimed(cold.diagnostics)
    assert cold.diagnostics["anchor_zero_shot_logprob"]["n"] == 2 and warm.indices == cold.indices


def test_nuggets_prefilter_is_the_cheap_mode(tmp_path):
    from paser.selectors.nuggets import NuggetsSelector, stratified_prefilter

    labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
    picked = stratified_prefilter(labels, 4, seed=0)
    assert len(set(picked.tolist())) == 4 and np.bincount(labels[picked]).tolist() == [2, 1, 1]
    pool = make_pool()
    sel = NuggetsSelector(n_anchors=2, prefilter=6).select(pool, Budget.samples(3), make_ctx(tmp_path))
    assert np.isfinite(sel.scores).sum() == 6 and len(sel.indices) == 3
    assert all(np.isfinite(sel.scores[i]) for i in sel.indices)
    with pytest.raises(ConfigError, match="prefilter"):
        NuggetsSelector(n_anchors=2, prefilter=2).select(pool, Budget.samples(3), make_ctx(tmp_path))
    with pytest.raises(ConfigError, match="n_anchors"):
        NuggetsSelector(n_anchors=50).select(pool, Budget.samples(3), make_ctx(tmp_path))
    with pytest.raises(ConfigError, match="prompt_format"):
        NuggetsSelector(prompt_format="chatml")
    with pytest.raises(ConfigError, match="selector.separator=3 must be a string"):
        NuggetsSelector(separator=3)
    with pytest.raises(ConfigError, match="selector.zero_shot_bos='yes' must be true or false"):
        NuggetsSelector(zero_shot_bos="yes")


# ------------------------------------------------------------------------------ Instruction Mining

def test_instruction_mining_linear_rule_on_fixed_indicators(tmp_path, monkeypatch):
    from paser.selectors import instruction_mining as im

    a = np.arange(12, dtype=float)                 # 0..11
    b = np.array([5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9.0])
    monkeypatch.setitem(im.INDICATORS, "fixed_a", lambda sel, pool, ctx: a)
    monkeypatch.setitem(im.INDICATORS, "fixed_b", lambda sel, pool, ctx: b)
    sel = im.InstructionMiningSelector(coefficients={"fixed_a": 0.5, "fixed_b": -1.0, "unused": 0},
                                       intercept=2.0).select(make_pool(), Budget.samples(3), make_ctx(tmp_path))
    predicted = 2.0 + 0.5 * a - b                  # [-3, 2.5, 3, ..., 7.5, -2.5]
    np.testing.assert_allclose(sel.scores, predicted)
    assert sel.indices == [0, 1, 11]               # the three lowest predicted losses: -3, -2.5, 2.5
    assert sel.diagnostics["coefficients_used"] == {"fixed_a": 0.5, "fixed_b": -1.0}


def test_instruction_mining_module_indicator(tmp_path, monkeypatch):
    from paser.selectors.instruction_mining import InstructionMiningSelector

    (tmp_path / "my_indicators.py").write_text(
        "import numpy as np\ndef minus_index(pool, ctx):\n    return -np.arange(len(pool), dtype=float)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sel = InstructionMiningSelector(coefficients={"my_indicators:minus_index": 1.0}).select(
        make_pool(), Budget.samples(2), make_ctx(tmp_path))
    assert sel.indices == [10, 11]


def test_knn_distance_by_hand():
    from paser.selectors.instruction_mining import knn_distance

    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(knn_distance(x, 1)[0], [1, 1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(knn_distance(x, 2)[0], [3, 2, 3, 5], atol=1e-6)
    y = np.random.default_rng(0).standard_normal((300, 4))
    approx, info = knn_distance(y, 3, exact_max=100)  # S²RIC's approximate search, with its recall
    assert info["knn_index"] == "faiss_ivf_flat" and 0 < info["knn_recall"] <= 1
    assert np.abs(approx - knn_distance(y, 3)[0]).max() < 0.5


def test_instruction_mining_paper_rule_offline_skips_reward(tmp_path, caplog):
    from paser.selectors.instruction_mining import InstructionMiningSelector, knn_distance

    ctx = make_ctx(tmp_path)
    pool = make_pool()
    with caplog.at_level(logging.WARNING):
        sel = InstructionMiningSelector(reward_model=str(tmp_path / "no-such-reward-model")).select(pool, Budget.samples(4), ctx)
    assert "reward" in sel.diagnostics["skipped_indicators"] and "skipping indicator 'reward'" in caplog.text
    emb = StubEmbedder().encode([r["instruction"] + (f"\n{r['input']}" if r["input"] else "") for r in pool.rows])
    out_len = np.array([len(ctx.tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in pool.rows])
    expected = 1.0694 + 8.257e-5 * out_len - 0.9350 * knn_distance(emb, 6)[0]
    assert sel.diagnostics["indicators"]["knn6"]["knn_index"] == "faiss_flat"  # exact at this size
    np.testing.assert_allclose(sel.scores, expected, rtol=1e-5)
    assert sel.indices == sorted(np.argsort(expected, kind="stable")[:4].tolist())


def test_instruction_mining_without_reward_model_is_another_method(tmp_path, monkeypatch):
    from paser.selectors import instruction_mining as im

    checks = []
    real = im.reward_unavailable
    monkeypatch.setattr(im, "_hub_reachable", lambda: False)  # offline
    monkeypatch.setattr(im, "reward_unavailable", lambda model_id: checks.append(model_id) or real(model_id))
    offline = im.InstructionMiningSelector()  # the paper's rule, with its hub reward model
    assert offline.environment() == {"method": "instruction_mining_no_reward", "reward_term": False}
    sel = offline.select(make_pool(), Budget.samples(4), make_ctx(tmp_path))
    assert sel.diagnostics["method"] == "instruction_mining_no_reward" and "reward" in sel.diagnostics["skipped_indicators"]
    assert len(checks) == 1  # decided once: the key and the scores agree
    assert im.InstructionMiningSelector(coefficients={"knn6": -1.0}).environment() == {}
    local = im.InstructionMiningSelector(reward_model=str(tmp_path))  # a local folder: used, not checked further
    assert local.environment() == {"method": "instruction_mining", "reward_term": True}
    with pytest.raises(RuntimeError, match="could not load reward model"):  # never silently without it
        local.select(make_pool(), Budget.samples(4), make_ctx(tmp_path))


def test_instruction_mining_perplexity_shares_ifd_cache(tmp_path):
    from paser.selectors.ifd import IFDSelector
    from paser.selectors.instruction_mining import InstructionMiningSelector

    ctx = make_ctx(tmp_path)
    pool = make_pool()
    sel = InstructionMiningSelector(coefficients={"perplexity": 1.0}, intercept=0.0).select(pool, Budget.samples(3), ctx)
    cond = np.array([reference_ifd_ours(ctx.pruned_model, ctx.tokenizer, r, ctx.cutoff)[1] for r in pool.rows])
    np.testing.assert_allclose(sel.scores, np.exp(cond), rtol=1e-4)
    entries = tmp_path / "cache" / "scores" / "answer_nll_conditioned"
    IFDSelector(prompt_format="alpaca").select(pool, Budget.samples(3), ctx)  # the same template: the same array
    assert len(list(entries.iterdir())) == 1
    IFDSelector().select(pool, Budget.samples(3), ctx)  # Cherry's template: its own
    assert len(list(entries.iterdir())) == 2


def test_instruction_mining_bad_config():
    from paser.selectors.instruction_mining import InstructionMiningSelector

    with pytest.raises(ConfigError, match="unknown indicator 'vibes'"):
        InstructionMiningSelector(coefficients={"vibes": 1.0})
    with pytest.raises(ConfigError, match="no non-zero"):
        InstructionMiningSelector(coefficients={"knn6": 0})
    with pytest.raises(ConfigError, match="numbers"):
        InstructionMiningSelector(coefficients={"knn6": "big"})


# -------------------------------------------------------------------------------------- hybrids

def _allocation():
    return pytest.importorskip("paser.selectors.paser.allocation")


def test_select_within_clusters_respects_allotments():
    allocate_budget = _allocation().allocate_budget
    from paser.selectors.clustered import select_within_clusters

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    key = np.array([5, 4, 3, 2, 1, 0, 9, np.nan, 7, 1, 2, 3], dtype=float)
    idx, info = select_within_clusters(key, labels, Budget.samples(6))
    # weights = cluster sizes 6:3:3 -> floor(3, 1.5, 1.5) = 3, 1, 1; the leftover slot goes to the largest
    # fractional share (cluster 0, the largest weight)
    n_k = allocate_budget(np.array([6.0, 3, 3]), np.array([6, 2, 3]), 6, redistribute=True)
    assert n_k.tolist() == [4, 1, 1]
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 6, 11]   # the best of each cluster
    assert [info["per_cluster"][str(c)]["selected"] for c in range(3)] == n_k.tolist()
    assert info["topped_up"] == 0
    # a cluster without enough eligible samples gives its share to the others
    idx, info = select_within_clusters(key, labels, Budget.samples(11))
    assert len(idx) == 11 and 7 not in idx.tolist()


def selector_config(name: str):
    """The shipped selector node as Hydra composes it (its defaults list included)."""
    from tests.conftest import compose_config

    return compose_config([f"selector={name}"]).selector


@pytest.mark.parametrize("name", ["ifd", "nuggets", "instruction_mining"])
def test_hybrids_pick_top_scored_inside_s2ric_clusters(tmp_path, monkeypatch, name):
    _allocation()
    import hydra.utils

    from paser.selectors.paser import clustering

    labels = np.array([0, 1, 2] * 4)
    seen = {}

    def fake_cluster(embeddings, **kwargs):
        seen.update(kwargs)
        return labels, {"n_clusters": 3}

    monkeypatch.setattr(clustering, "cluster_embeddings", fake_cluster)
    cfg = selector_config(name)
    cfg.cluster = "s2ric"
    if name == "nuggets":
        cfg.n_anchors = 2
    if name == "ifd":  # on the tiny model, Cherry's "### Response:" leaves too few IFD < 1 for two per cluster
        cfg.unconditioned_prefix = ""
    if name == "instruction_mining":
        cfg.reward_model = None
    selector = hydra.utils.instantiate(cfg)
    sel = selector.select(make_pool(), Budget.samples(6), make_ctx(tmp_path))
    assert seen["reducer"] == "diffusion" and seen["n_components"] == 16 and seen["n_neighbors"] == 10
    info = sel.diagnostics["clustering"]
    assert len(sel.indices) == 6 and info["n_clusters"] == 3
    for c in range(3):
        members = np.flatnonzero(labels == c)
        n = info["per_cluster"][str(c)]["allotted"]
        assert info["per_cluster"][str(c)]["selected"] == n == 2
        key = sel.scores if name != "instruction_mining" else -sel.scores
        key = np.where(np.isnan(key) | ((key > 1) if name == "ifd" else False), -np.inf, key)
        best = members[np.lexsort((members, -key[members]))][:n]
        assert sorted(best.tolist()) == [i for i in sel.indices if labels[i] == c]


def test_hybrid_with_real_s2ric(tmp_path):
    _allocation()
    from paser.selectors.instruction_mining import InstructionMiningSelector

    rows = [dict(ROWS[i % len(ROWS)], instruction=f"{ROWS[i % len(ROWS)]['instruction']} ({i})")
            for i in range(40)]
    sel = InstructionMiningSelector(coefficients={"output_length": 1.0}, cluster="s2ric",
                                    clustering={"n_clusters": 3, "n_neighbors": 5, "n_components": 4}).select(
        make_pool(rows), Budget.samples(10), make_ctx(tmp_path))
    info = sel.diagnostics["clustering"]
    assert len(sel.indices) == 10 and info["n_clusters"] == 3
    assert sum(c["selected"] for c in info["per_cluster"].values()) == 10


# ------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("name", ["ifd", "nuggets", "instruction_mining"])
def test_shipped_configs_instantiate(name):
    import hydra.utils

    for cluster in (None, "s2ric"):
        cfg = selector_config(name)
        cfg.cluster = cluster
        selector = hydra.utils.instantiate(cfg)
        assert selector.name == name and selector.cluster == cluster and selector.uses_budget


# ------------------------------------------------------------------------------ real model (slow)

@pytest.mark.slow
def test_ifd_on_smollm2(tmp_path):
    from paser.models import load_model
    from paser.selectors.ifd import IFDSelector

    model, tok = load_model(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml"),
                            StageCache(ROOT / ".cache" / "paser"))
    ctx = make_ctx(tmp_path)
    ctx.tokenizer = tok
    ctx.__dict__["pruned_model"] = model
    pool = make_pool()
    sel = IFDSelector().select(pool, Budget.samples(4), ctx)
    ref = [reference_ifd(model, tok, r, ctx.cutoff)[0] for r in pool.rows]  # no BOS: "### Response:" starts it
    np.testing.assert_allclose(sel.scores, ref, rtol=2e-2, equal_nan=True)  # bf16, batched vs single
    assert len(sel.indices) == 4 and np.nanmedian(sel.scores) < 1
