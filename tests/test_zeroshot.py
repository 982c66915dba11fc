"""ZeroShotEvaluator on the tiny random Llama: metrics for every task, limits, peft models, errors, and the
shared-context scorer against lm-eval's own HFLM."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DATA_DIR, requires_shared_data
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from paser.errors import ConfigError, DataError
from paser.evaluation.shared_context_lm import SharedContextHFLM
from paser.evaluation.zeroshot import ACCURACY_TASKS, DEFAULT_METRICS, ZeroShotEvaluator
from paser.models import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@requires_shared_data()
def test_local_run_reports_every_task_and_respects_limit(tiny):
    ev = ZeroShotEvaluator(tasks=list(ACCURACY_TASKS), limit=3, batch_size=4, data_dir=str(DATA_DIR))
    res = ev.evaluate(*tiny)
    assert set(res["tasks"]) == set(ACCURACY_TASKS)
    for name, r in res["tasks"].items():
        assert r["n"] == 3 and r["subset"] and r["n_total"] > 3, name
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key)
        assert r["metric"] == DEFAULT_METRICS[name] and r["score"] == r[r["metric"]] and r["wall_time_s"] >= 0
    assert res["mean"] == pytest.approx(sum(r["score"] for r in res["tasks"].values()) / len(ACCURACY_TASKS))
    assert res["subset"] and res["limit"] == 3 and res["limit_mode"] == "first" and res["wall_time_s"] > 0


@requires_shared_data()
def test_random_limit_is_seeded_and_per_task(tiny):
    ev = ZeroShotEvaluator(tasks=["arc_easy", "openbookqa"], limit=5, limit_mode="random", seed=1,
                           data_dir=str(DATA_DIR))
    tasks = ev.task_manager.load(ev.tasks)["tasks"]
    picked = ev._sample_indices(tasks)
    assert picked == ev._sample_indices(tasks)  # reproducible
    assert picked["arc_easy"] != list(range(5)) and len(picked["openbookqa"]) == 5
    assert picked != ZeroShotEvaluator(tasks=ev.tasks, limit=5, limit_mode="random", seed=2,
                                       data_dir=str(DATA_DIR))._sample_indices(tasks)
    res = ev.evaluate(*tiny)
    assert [r["n"] for r in res["tasks"].values()] == [5, 5] and res["limit_mode"] == "random"


@requires_shared_data()
def test_per_document_correctness_matches_the_scores(tiny):
    """evaluate_with_samples: each scored document's index and 0/1 acc / acc_norm, from lm-eval's sample
    log; their means are the reported accuracies."""
    ev = ZeroShotEvaluator(tasks=["arc_easy", "piqa"], limit=6, limit_mode="random", seed=1, data_dir=str(DATA_DIR))
    picked = ev._sample_indices(ev.task_manager.load(ev.tasks)["tasks"])
    res, docs = ev.evaluate_with_samples(*tiny)
    for task in ("arc_easy", "piqa"):
        assert docs[f"{task}/doc_id"].tolist() == picked[task]
        for m in ("acc", "acc_norm"):
            assert docs[f"{task}/{m}"].dtype.name == "int8" and set(docs[f"{task}/{m}"].tolist()) <= {0, 1}
            assert docs[f"{task}/{m}"].mean() == pytest.approx(res["tasks"][task][m])


@requires_shared_data()
def test_metric_choice_and_lm_eval_wikitext(tiny):
    ev = ZeroShotEvaluator(tasks=["piqa", "wikitext"], metrics={"piqa": "acc_norm"}, limit=1,
                           data_dir=str(DATA_DIR))
    res = ev.evaluate(*tiny)
    assert res["tasks"]["piqa"]["score"] == res["tasks"]["piqa"]["acc_norm"]
    wt = res["tasks"]["wikitext"]
    assert wt["word_perplexity"] > 1 and wt["bits_per_byte"] > 0 and "score" not in wt
    assert res["mean_over"] == ["piqa"]


def _peft(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # a trained adapter, not the identity of a fresh one
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return peft_model.eval()


def _requests():
    pairs = [("The quick brown fox", " jumps over"), ("The quick brown fox", " sleeps"),
             ("The quick brown fox", " x"), ("Give three tips", " for staying healthy."),
             ("Give three tips", " no"), ("What are", " the three primary colors?")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def test_shared_context_scores_equal_hflm_also_for_peft():
    model, tok = tiny_llama(seed=3)
    base = [ll for ll, _ in HFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(_requests())]
    peft_model = _peft(model)
    plain = HFLM(pretrained=peft_model, tokenizer=tok, batch_size=4).loglikelihood(_requests())
    shared = SharedContextHFLM(pretrained=peft_model, tokenizer=tok, batch_size=2).loglikelihood(_requests())
    assert [g for _, g in shared] == [g for _, g in plain]
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(base, (ll for ll, _ in plain))) > 1e-2  # the adapter is applied


def test_shared_context_falls_back_to_hflm_for_overlong_requests():
    model, tok = tiny_llama(max_position_embeddings=16)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=("word " * 20, " end"), idx=0),
            Instance(request_type="loglikelihood", doc={}, arguments=("short", " end"), idx=1)]
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=2).loglikelihood(reqs)
    shared = SharedContextHFLM(pretrained=model, tokenizer=tok, batch_size=2).loglikelihood(reqs)
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in plain], abs=1e-4)


@requires_shared_data()
def test_peft_model_is_evaluated_in_memory():
    model, tok = tiny_llama()
    res = ZeroShotEvaluator(tasks=["winogrande"], limit=2, data_dir=str(DATA_DIR)).evaluate(_peft(model), tok)
    assert res["tasks"]["winogrande"]["n"] == 2


def test_config_errors_name_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="allowed: .*boolq.*openbookqa"):
        ZeroShotEvaluator(tasks=["boolq", "mmlu"])
    with pytest.raises(ConfigError, match="local.*hub"):
        ZeroShotEvaluator(source="web")
    with pytest.raises(ConfigError, match="allowed: acc, acc_norm"):
        ZeroShotEvaluator(metrics={"piqa": "f1"})
    with pytest.raises(ConfigError, match="first"):
        ZeroShotEvaluator(limit=3, limit_mode="last")
    with pytest.raises(ConfigError, match="limit"):
        ZeroShotEvaluator(limit=0)


def test_missing_data_says_where_it_looked(tmp_path, tiny):
    with pytest.raises(DataError, match=str(tmp_path / "piqa" / "valid.jsonl")):
        ZeroShotEvaluator(tasks=["piqa"], data_dir=str(tmp_path)).evaluate(*tiny)
