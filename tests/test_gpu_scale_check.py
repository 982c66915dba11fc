"""scripts/gpu_scale_check.py on the CPU with the tiny shape: every section runs, the JSON is written after
each one (a timeout keeps what finished), the pruned shape is LLM-Pruner's, and the extrapolation to
experiment=table1 follows the workload."""

from __future__ import annotations

import json

import pytest

from scripts import gpu_scale_check as scale

SECTIONS = {"forward_dense", "perplexity_dense", "forward_pruned", "perplexity_pruned", "llm_pruner_gradients",
            "zeroshot_dense", "two_forwards_b8", "jsd_b8", "two_forwards_b32", "jsd_b32",
            *(f"{kind}_micro{m}" for kind in ("forward_backward", "lora_step") for m in (4, 8, 16)),
            "perplexity_lora_unmerged", "perplexity_lora_merged", "hf_trainer_peft_micro4", "knn_2000"}


@pytest.mark.slow  # ~20 s of CPU time (66 s of wall time on the shared 2-core test host)
def test_the_tiny_check_runs_every_section_and_writes_after_each(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    written = []
    record = scale.Check.record

    def spy(self, name, row):
        record(self, name, row)
        written.append(name in json.loads(out.read_text())["sections"])
    monkeypatch.setattr(scale.Check, "record", spy)
    assert scale.main(["--device", "cpu", "--shape", "tiny", "--out", str(out)]) == 0
    assert written and all(written)
    report = json.loads(out.read_text())
    assert report["sections"].keys() == SECTIONS
    for name, row in report["sections"].items():
        assert row["seconds"] > 0 and row["peak_host_rss_gib"] > 0 and row["peak_gpu_memory_gib"] is None, name
        assert "mfu" not in row  # no peak FLOPs known for a CPU
    assert report["sections"]["jsd_b8"]["floor"] == "two_forwards_b8"
    # LLM-Pruner at 0.25 on 4 layers prunes layers 1-3 (4..30 of 32 scaled): one of 2 KV groups with its
    # 3 query heads, and round(0.25 x 128) = 32 MLP channels
    assert report["pruned_shapes"] == [{"q_heads": 6, "kv_heads": 2, "intermediate": 128}] + \
        [{"q_heads": 3, "kv_heads": 1, "intermediate": 96}] * 3
    assert report["params_pruned"] < report["params_dense"]
    assert report["workload"]["lora_steps"] == 326  # ceil(10,400 / 64) x 2 epochs, as the issue counts
    assert set(report["table1"]) >= {"eval_dense", "prune", "eval_pruned", "recover (LoRA, 20% budget)"}


def row(seconds, tokens, **extra):
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "peak_gpu_memory_gib": 1.0,
            "peak_host_rss_gib": 2.0, **extra}


def test_table1_is_extrapolated_from_the_rates_and_the_workload():
    sections = {"forward_dense": row(1, 1000), "perplexity_dense": row(2, 1000), "zeroshot_dense": row(1, 500),
                "forward_pruned": row(1, 2000), "perplexity_pruned": row(1, 1000), "llm_pruner_gradients": row(3, 640),
                "jsd_b8": row(1, 100), "knn_5200": row(2, 5200), "lora_step_micro4": row(4, 800, per_step_s=2.0),
                "perplexity_lora_merged": row(1, 1000, ratio=1.5)}
    sections["perplexity_dense"]["peak_gpu_memory_gib"] = 7.0
    work = {"ppl_tokens": 10_000, "zeroshot_tokens": 5_000, "pool_tokens": 1_000, "lora_steps": 10,
            "lora_steps_full_data": 50, "val_tokens": 4_000}
    t = scale.extrapolate(sections, work)
    assert t["eval_dense"]["seconds"] == pytest.approx(10_000 / 500 + 5_000 / 500)
    assert t["eval_dense"]["peak_gpu_memory_gib"] == 7.0
    # zero-shot on the pruned model at the dense rate times the pruned forward's speed-up (2x)
    assert t["eval_pruned"]["seconds"] == pytest.approx(10_000 / 1000 + 5_000 / 1000)
    assert t["eval_recovered (merged)"]["seconds"] == pytest.approx(1.5 * 15)
    knn = 2 * (scale.POOL / 5200) ** 2
    assert t["select (PASER: JSD + kNN; embedding and clustering not timed)"]["seconds"] == pytest.approx(10 + knn)
    assert t["recover (LoRA, 20% budget)"]["seconds"] == pytest.approx(10 * 2.0 + 4_000 / 2000)
    assert t["recover (LoRA, full data)"]["seconds"] == pytest.approx(50 * 2.0 + 4_000 / 2000)


def test_mfu_is_the_achieved_over_the_peak_flops(tmp_path):
    check = scale.Check(scale.torch.device("cpu"), tmp_path / "x.json", {}, peak_tflops=1e-3)
    r = check.section("work", lambda: sum(range(10_000)), tokens=1_000, flops_per_token=2e6)
    assert r["mfu"] == pytest.approx(1_000 * 2e6 / r["seconds"] / 1e9)


def stage_minutes(text: str) -> dict[str, float]:
    return {cells[1].strip(): float(cells[2].split()[0]) for line in text.splitlines()
            if (cells := line.split("|"))[1:] and "min" in line}


def test_the_estimate_mode_needs_no_device_and_scales_with_the_assumed_mfu(capsys):
    """``--estimate MFU``: the 7B table of docs/gpus-and-clusters.md; LLaMA-2-7B's shape pruned by LLM-Pruner
    at 0.25 has the 5.4B parameters LLM-Pruner reports, and halving the MFU doubles every stage's time."""
    tables = []
    for mfu in ("0.5", "0.25"):
        assert scale.main(["--estimate", mfu, "--peak-tflops", "989", "--shape", "llama2-7b"]) == 0
        out = capsys.readouterr().out
        assert "6.74B dense, 5.42B pruned" in out
        tables.append(stage_minutes(out))
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) == 7
    for stage, minutes in tables[0].items():
        if minutes >= 1:  # two-digit rounding
            assert tables[1][stage] == pytest.approx(2 * minutes, rel=0.06), stage
