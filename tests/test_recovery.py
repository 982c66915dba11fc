"""LoRA recovery: response-only loss, resume from checkpoints, refusal of unsafe settings."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from paser.data import alpaca_prompt
from paser.errors import ConfigError, TrainingError
from paser.models import tiny_llama
from paser.recovery import LoraRecovery

SAMPLES = [{"instruction": f"Repeat the word number {k}.", "input": "" if k % 2 else "now",
            "output": f"word {k} " * (1 + k % 3)} for k in range(8)]


def recovery(**kw):
    args = {"r": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 1, "batch_size": 4, "micro_batch_size": 2, "cutoff": 512,
                "dtype": "float32", "checkpoint_every": 1, "seed": 0, "warmup_steps": 0, "val_size": 0, "eval_every": 0,
            "keep": "last"}
    args.update(kw)
    return LoraRecovery(**args)


def independent_response_loss(model, tok, samples) -> float:
    """Mean NLL over the response tokens (+ EOS) of each sample, by a plain per-sample loop."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            prompt = tok(alpaca_prompt(s))["input_ids"]
            ids = prompt + tok(s["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            for t in range(len(prompt), len(ids)):
                total -= logp[t - 1, ids[t]].item()
                count += 1
    return total / count


def test_first_step_loss_is_the_response_only_cross_entropy(tmp_path):
    model, tok = tiny_llama()
    # batch order of epoch 0 is a seeded shuffle: the first effective batch is these four samples
    rec = recovery()
    first = [SAMPLES[i] for i in rec._epoch_order(len(SAMPLES), 0)[:4]]
    expected = independent_response_loss(model, tok, first)
    _, report = rec.recover(model, tok, SAMPLES, tmp_path)
    assert report["loss_curve"][0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert report["steps"] == 2 and report["samples"] == 8


def test_training_lowers_the_loss(tmp_path):
    model, tok = tiny_llama()
    rec = recovery(epochs=6, lr=5e-3, batch_size=8)
    _, report = rec.recover(model, tok, SAMPLES, tmp_path)
    losses = [p["loss"] for p in report["loss_curve"]]
    assert losses[-1] < losses[0] - 0.1


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, keep", [("float32", "last"), ("bfloat16", "last"), ("float32", "best")])
def test_resume_after_a_crash_gives_the_same_adapter(tmp_path, monkeypatch, dtype, keep):
    """Also in bf16, where the optimizer's fp32 master weights are what the checkpoint must keep, and with
    keep=best, where the best adapter so far must survive the crash."""
    # keep=best: lr 1.0 puts the lowest validation loss at step 5 of 6, and the crash comes after it
    kw = {"dtype": dtype, "keep": keep, "val_size": 2 if keep == "best" else 0, "eval_every": 1,
          "lr": 1.0 if keep == "best" else 1e-3}
    val = SAMPLES[:2] if keep == "best" else ()
    crash_at = 6 if keep == "best" else 4
    model, tok = tiny_llama()
    clean, _ = recovery(epochs=3, dropout=0.1, **kw).recover(model, tok, SAMPLES, tmp_path / "clean", val)
    expected = trainable(clean)

    calls = {"n": 0}
    original = LoraRecovery._optimizer_step

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(LoraRecovery, "_optimizer_step", crash)
    model, tok = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        recovery(epochs=3, dropout=0.1, **kw).recover(model, tok, SAMPLES, tmp_path / "crash", val)
    monkeypatch.setattr(LoraRecovery, "_optimizer_step", original)
    model, tok = tiny_llama()
    resumed, report = recovery(epochs=3, dropout=0.1, **kw).recover(model, tok, SAMPLES, tmp_path / "crash", val)
    got = trainable(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert [p["step"] for p in report["loss_curve"]] == list(range(1, 7))


def test_bf16_training_keeps_fp32_master_weights(tmp_path):
    """Updates far below a bf16 step of a weight still accumulate; the stored adapter is fp32."""
    model, tok = tiny_llama()
    rec = recovery(epochs=2, lr=1e-6, dtype="bfloat16")  # updates ~1e-6: lost if applied to bf16 weights
    torch.manual_seed(0)  # the adapter's initialisation, as recover() draws it
    before = {n: p.detach().float().clone() for n, p in rec.wrap(tiny_llama()[0]).named_parameters()
              if p.requires_grad}
    trained, _ = rec.recover(model, tok, SAMPLES, tmp_path)
    after = trainable(trained)
    assert all(p.dtype == torch.float32 for p in after.values())
    moved = [n for n in after if "lora_A" in n and not torch.equal(after[n], before[n])]
    assert moved and all(float((after[n] - before[n]).abs().max()) < 1e-4 for n in moved)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    model, tok = tiny_llama()
    monkeypatch.setattr(LoraRecovery, "_optimizer_step", lambda self, *a: math.nan)
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        recovery().recover(model, tok, SAMPLES, tmp_path)


def test_unsafe_or_impossible_settings_are_refused():
    with pytest.raises(ConfigError, match="float16 is refused"):
        recovery(dtype="float16")
    with pytest.raises(ConfigError, match="multiple of"):
        recovery(batch_size=5, micro_batch_size=2)


def test_merged_adapter_evaluates_like_the_unmerged_model():
    """The recovered model is evaluated with its adapter merged (pruned-model speed): same perplexity."""
    import copy

    from peft import LoraConfig, get_peft_model

    from paser.evaluation.perplexity import perplexity
    from paser.recovery import merged

    model, tok = tiny_llama()
    model.to(torch.bfloat16)
    windows = torch.randint(3, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    base = perplexity(model, windows, batch_size=2)["ppl"]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))  # B starts at zero
    unmerged = perplexity(peft.eval(), windows, batch_size=2)["ppl"]
    folded = perplexity(merged(copy.deepcopy(peft)), windows, batch_size=2)["ppl"]
    assert abs(unmerged - base) > 1e-3 * base  # the adapter matters, so the comparison means something
    assert folded == pytest.approx(unmerged, rel=1e-2)  # bf16 rounding of W + BA


def tiny_granite():
    """A tiny random Granite: its logits are the LM head's output divided by ``logits_scaling``."""
    from transformers import GraniteConfig, GraniteForCausalLM

    _, tok = tiny_llama()
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
                           pad_token_id=tok.pad_token_id)
    return GraniteForCausalLM(config), tok


@pytest.mark.parametrize("build", [tiny_llama, tiny_granite], ids=["llama", "granite_logits_scaling"])
def test_response_only_logits_match_the_full_forward_in_bf16(build):
    from paser.data import encode_pool
    from paser.recovery import response_nll

    model, tok = build()
    model.to(torch.bfloat16)
    micro = encode_pool(tok, SAMPLES[:4], 512)
    got = response_nll(model, micro, tok.pad_token_id, "cpu")
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.input_ids) for e in micro], batch_first=True,
                                          padding_value=tok.pad_token_id)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(e.input_ids) for e in micro])[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    want = 0.0
    for row, e in enumerate(micro):
        for t in range(e.prompt_len, len(e.input_ids)):
            want -= torch.log_softmax(logits[row, t - 1], -1)[e.input_ids[t]].item()
    assert got.item() == pytest.approx(want, rel=1e-2)


def test_keep_best_ends_with_the_lowest_validation_loss(tmp_path):
    model, tok = tiny_llama()
    val = SAMPLES[:3]
    settings = {"epochs": 1, "lr": 0.3, "batch_size": 1, "micro_batch_size": 1, "val_size": 3, "eval_every": 1}
    rec = recovery(**settings, keep="best")
    best_model, report = rec.recover(model, tok, SAMPLES[3:], tmp_path / "best", val_samples=val)
    curve = report["val_curve"]
    assert [v["step"] for v in curve] == list(range(1, report["steps"] + 1)) and report["val_size"] == 3
    lowest = min(curve, key=lambda v: v["loss"])
    assert report["best"] == lowest
    assert independent_response_loss(best_model, tok, val) == pytest.approx(lowest["loss"], rel=1e-4)
    model, tok = tiny_llama()
    last_model, last = recovery(**settings, keep="last").recover(
        model, tok, SAMPLES[3:], tmp_path / "last", val_samples=val)
    assert independent_response_loss(last_model, tok, val) == pytest.approx(last["val_curve"][-1]["loss"], rel=1e-4)
    assert lowest["step"] != report["steps"]  # lr 0.3 overshoots: best and last differ, the test means something


def test_loss_and_lr_are_logged_live_every_step(tmp_path, live_calls):
    model, tok = tiny_llama()
    _, report = recovery(val_size=2, eval_every=1).recover(model, tok, SAMPLES[2:], tmp_path, SAMPLES[:2])
    # every point carries its own x value (recovery/step): W&B plots it against that axis
    steps = [m["recovery/step"] for m in live_calls if "recovery/loss" in m]
    assert steps == [p["step"] for p in report["loss_curve"]]
    assert [(m["recovery/step"], m["recovery/val_loss"]) for m in live_calls if "recovery/val_loss" in m] == \
        [(v["step"], v["loss"]) for v in report["val_curve"]]


def test_host_dropout_drops_p_and_scales_the_rest():
    """HostDropout's mask: the drop fraction is p (within 5 binomial standard deviations, at p rounded to
    2^-16), kept entries are x / (1 − p), a seeded generator gives the same mask, eval mode is the identity,
    and peft's LoRA layers use it."""
    from paser.recovery import HostDropout

    x = torch.ones(1000, 1000)
    for p in (0.05, 0.3):
        drop = HostDropout(p).train()
        torch.manual_seed(0)
        y = drop(x)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / x.numel()), (p, dropped)
        assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
        torch.manual_seed(0)
        assert torch.equal(drop(x), y)
        assert torch.equal(drop.eval()(x), x)
    model, _ = tiny_llama()
    layers = [d for m in recovery(dropout=0.05).wrap(model).modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert layers and all(type(d) is HostDropout and d.p == 0.05 for d in layers)


def test_target_modules_the_model_lacks_are_refused_before_wrapping():
    """peft refuses only when no target matches: a name the model lacks (q/k/v fused into one layer, as
    Baichuan's W_pack) must not silently drop those adapters."""
    model, _ = tiny_llama()
    with pytest.raises(ConfigError, match=r"recovery.target_modules names \['W_pack'\].*q_proj"):
        recovery(target_modules=["W_pack", "o_proj"]).wrap(model)


def test_cpu_training_uses_eager_attention_and_restores_the_models_own(tmp_path):
    """SDPA's CPU backward is slow, so the loop trains with eager attention on the CPU (paser.recovery.
    training_attention); the model leaves recovery with its own implementation for evaluation."""
    model, tok = tiny_llama()
    model.set_attn_implementation("sdpa")
    seen = []
    original = LoraRecovery._optimizer_step

    def spy(self, peft_model, *args):
        seen.append(peft_model.get_base_model().config._attn_implementation)
        return original(self, peft_model, *args)

    rec = recovery()
    rec._optimizer_step = spy.__get__(rec)
    trained, report = rec.recover(model, tok, SAMPLES, tmp_path)
    assert seen == ["eager", "eager"] and report["attention"] == "eager"
    assert trained.get_base_model().config._attn_implementation == "sdpa"


def test_eager_and_sdpa_attention_give_the_same_training_loss_in_bf16():
    from paser.data import encode_pool
    from paser.recovery import response_nll

    model, tok = tiny_llama()
    model.to(torch.bfloat16)
    micro = encode_pool(tok, SAMPLES[:4], 512)  # padded: the masks of both paths are exercised
    losses, grads = {}, {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        loss = response_nll(model, micro, tok.pad_token_id, "cpu")
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grads["eager"], grads["sdpa"], dim=0) > 0.999


# ------------------------------------------------------------------ damaged checkpoints (issue #30)


def _crashed_run(tmp_path, monkeypatch, crash_at: int):
    """A run killed in its optimizer step ``crash_at``: checkpoints of steps crash_at - 1 (``checkpoint``) and
    crash_at - 2 (``checkpoint.prev``) are left in ``tmp_path / "crash"``."""
    original = LoraRecovery._optimizer_step
    calls = {"n": 0}

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(LoraRecovery, "_optimizer_step", crash)
    model, tok = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        recovery(epochs=3).recover(model, tok, SAMPLES, tmp_path / "crash")
    monkeypatch.setattr(LoraRecovery, "_optimizer_step", original)
    return tmp_path / "crash"


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, resumed_at", [
    ("flip the newest", 2), ("truncate the newest", 2), ("both damaged", None), ("killed between renames", 3)])
def test_a_damaged_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, caplog,
                                                                                  damage, resumed_at):
    """A damaged newest checkpoint (SafetensorError on every rerun before) is logged and the one before it
    resumed; with none intact the run starts over; one complete but not renamed into place is taken."""
    import logging

    model, tok = tiny_llama()
    clean, _ = recovery(epochs=3).recover(model, tok, SAMPLES, tmp_path / "clean")
    work = _crashed_run(tmp_path, monkeypatch, crash_at=4)
    newest, before = work / "checkpoint", work / "checkpoint.prev"
    assert json.loads((newest / "state.json").read_text())["step"] == 3
    assert json.loads((before / "state.json").read_text())["step"] == 2
    if damage == "flip the newest":
        _flip_middle_byte(newest / "adapter.safetensors")
    elif damage == "truncate the newest":
        (newest / "adapter.safetensors").write_bytes((newest / "adapter.safetensors").read_bytes()[:100])
    elif damage == "both damaged":
        _flip_middle_byte(newest / "trainer_state.pt")
        (before / "state.json").unlink()
    else:  # killed after the newest was moved aside as .prev, before the new one was renamed into place
        shutil.rmtree(before)
        os.replace(newest, before.with_name("checkpoint.tmp"))
    model, tok = tiny_llama()
    with caplog.at_level(logging.INFO, logger="paser.recovery"):
        resumed, report = recovery(epochs=3).recover(model, tok, SAMPLES, work)
    if resumed_at is None:
        assert "recovery: resuming" not in caplog.text
    else:
        assert f"at step {resumed_at}/6" in caplog.text
    assert ("incomplete or damaged" in caplog.text) == damage.startswith(("flip", "truncate", "both"))
    got, expected = trainable(resumed), trainable(clean)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [p["step"] for p in report["loss_curve"]] == list(range(1, 7))


def test_checkpoint_files_reach_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced, renamed = [], []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b), len(synced))), replace(a, b))[1])
    model, tok = tiny_llama()
    recovery(epochs=1, batch_size=4).recover(model, tok, SAMPLES, tmp_path)  # one checkpoint, after step 1
    tmp = str(tmp_path / "checkpoint.tmp")
    (_src, dst, synced_before), = [r for r in renamed if r[0] == tmp]
    assert dst == str(tmp_path / "checkpoint")
    names = {"adapter.safetensors", "trainer_state.pt", "state.json", "digests.json"}
    assert {os.path.basename(p) for p in synced[:synced_before] if os.path.dirname(p) == tmp} == names
    assert tmp in synced[:synced_before] and str(tmp_path) in synced[synced_before:]


# ------------------------------------------------------------------ the contract, and full fine-tuning


def full_ft(**kw):
    import functools

    from paser.recovery import FullFineTuning, linear_warmup_decay

    args = {"optimizer": functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
            "scheduler": functools.partial(linear_warmup_decay, warmup_steps=0), "epochs": 1, "batch_size": 4,
            "micro_batch_size": 2, "cutoff": 512, "dtype": "float32", "checkpoint_every": 1, "seed": 0,
            "val_size": 0, "eval_every": 0, "keep": "last"}
    args.update(kw)
    return FullFineTuning(**args)


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_full_fine_tuning_trains_every_weight_and_resumes_after_a_crash(tmp_path, monkeypatch):
    from paser.recovery import FullFineTuning

    model, tok = tiny_llama()
    before = weights(model)
    clean, report = full_ft(epochs=3).recover(model, tok, SAMPLES, tmp_path / "clean")
    expected = weights(clean)
    assert report["steps"] == 6
    assert all(not torch.equal(expected[n], before[n]) for n, p in clean.named_parameters())  # every weight moved

    calls = {"n": 0}
    original = FullFineTuning._optimizer_step

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(FullFineTuning, "_optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        full_ft(epochs=3).recover(tiny_llama()[0], tok, SAMPLES, tmp_path / "crash")
    monkeypatch.setattr(FullFineTuning, "_optimizer_step", original)
    resumed, report = full_ft(epochs=3).recover(tiny_llama()[0], tok, SAMPLES, tmp_path / "crash")
    got = weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [p["step"] for p in report["loss_curve"]] == list(range(1, 7))


def test_full_fine_tuning_stores_the_model_it_trained(tmp_path):
    model, tok = tiny_llama()
    rec = full_ft(dtype="bfloat16")
    trained, _ = rec.recover(model, tok, SAMPLES, tmp_path / "work")
    rec.save(trained, tmp_path / "artifact")
    loaded = rec.load(tiny_llama()[0], tmp_path / "artifact")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.bfloat16
    got, want = weights(loaded), weights(trained)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_lora_stores_its_adapter_and_loads_it_merged(tmp_path):
    from paser.recovery import merged

    model, tok = tiny_llama()
    rec = recovery(epochs=2, lr=5e-3)
    trained, _ = rec.recover(model, tok, SAMPLES, tmp_path / "work")
    rec.save(trained, tmp_path / "artifact")
    loaded = rec.load(tiny_llama()[0], tmp_path / "artifact")
    fresh = merged(trained)
    assert not any("lora" in n for n in weights(loaded))  # merged into the weights
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, fresh(ids).logits, atol=1e-5)


def test_full_ft_yaml_states_the_recoverys_own_defaults():
    """conf/recovery/full_ft.yaml and FullFineTuning built without arguments agree (each default stated once);
    its optimizer and schedule nodes build what the class builds."""
    import inspect

    import hydra
    from omegaconf import OmegaConf

    from paser.recovery import FullFineTuning
    from tests.conftest import CONF

    stated = OmegaConf.to_container(OmegaConf.load(CONF / "recovery" / "full_ft.yaml"))
    assert stated.pop("_target_") == "paser.recovery.FullFineTuning" and stated.pop("seed") == "${seed}"
    params = inspect.signature(FullFineTuning).parameters
    assert set(stated) == set(params) - {"seed"}
    built, default = hydra.utils.instantiate(stated, _convert_="all"), FullFineTuning()
    for key in ("optimizer", "scheduler"):
        assert (built[key].func, built[key].keywords) == (getattr(default, key).func, getattr(default, key).keywords)
    assert {k: v for k, v in stated.items() if k not in ("optimizer", "scheduler")} == \
        {k: p.default for k, p in params.items() if k not in ("optimizer", "scheduler", "seed")}


def test_the_pipeline_knows_no_peft():
    """The pipeline and its stages reach a recovery's artifact only through recover/save/load."""
    from pathlib import Path

    from paser import pipeline, stages

    files = [Path(pipeline.__file__), *Path(stages.__file__).parent.glob("*.py")]
    assert len(files) >= 6
    for path in files:
        assert "peft" not in path.read_text().lower(), path.name


FULL_FT_RUN = ["recovery=full_ft", "recovery.batch_size=2", "recovery.micro_batch_size=2", "recovery.epochs=1",
               "recovery.cutoff=128", "recovery.scheduler.warmup_steps=0", "recovery.val_size=4", "recovery.keep=best",
               "recovery.eval_every=1", "recovery.optimizer.lr=1e-3"]


def test_full_ft_runs_end_to_end_and_a_rerun_reuses_it(compose_cfg, tmp_path):
    from paser import pipeline
    from tests.conftest import TINY_RUN

    overrides = [o for o in TINY_RUN if not o.startswith("recovery.")] + FULL_FT_RUN
    first = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "first")
    assert first["recovery"]["steps"] == 3 and first["recovery"]["val_size"] == 4
    assert first["metrics"]["recovered"]["ppl"] != first["metrics"]["pruned"]["ppl"]
    again = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "again")
    assert again["timings"]["recover"]["reused"] and again["timings"]["eval_recovered"]["reused"]
    assert again["metrics"] == first["metrics"] and again["recovery"] == first["recovery"]
