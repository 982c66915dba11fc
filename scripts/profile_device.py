"""Where the time goes on a device: perplexity, PASER's JSD and LoRA steps against bare forward passes, at
several batch sizes, plus a profile of one LoRA step, on a random model of SmolLM2-135M's shape.

    python scripts/profile_device.py --device cuda            # ~2 min on one H200
    python scripts/profile_device.py --device cpu --layers 2  # the script itself, a 2-layer model

The model is a seeded random LlamaForCausalLM with SmolLM2-135M's configuration (30 layers, hidden 576,
9 query heads on 3 KV heads, intermediate 1536, vocabulary 49,152, tied embeddings) in bf16, and the tokens
are random: the speed of a forward pass does not depend on the weights' or tokens' values, so no model file
or data is needed. Each stage runs the project's own code (``window_nll``, ``sample_divergences``,
``LoraRecovery._optimizer_step``) and, on the same batches, its floor: bare forwards in inference mode (the
whole model, LM head included, as in bench_recovery.py and bench_paser.py); and the trained LoRA model's
perplexity, unmerged and merged as the pipeline evaluates it, against the model without adapters. Also:
whether the pruners' masks on the device equal the CPU's when scores tie (as |W| of bf16 weights do).
Prints tables and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.data import EncodedSample
from paser.evaluation.perplexity import window_nll
from paser.hardware import host_facts
from paser.pruners.common import prune_mask
from paser.recovery import LoraRecovery, MasterWeights
from paser.scoring import pad_right, token_nll
from paser.selectors.paser.divergence import jsd, sample_divergences

SMOLLM2 = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
           "vocab_size": 49152, "max_position_embeddings": 2048, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}


def smollm2_shaped(layers: int, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SMOLLM2))
    return model.to(device, torch.bfloat16).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def bare_forwards(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask, use_cache=False)


def random_samples(n: int, g: torch.Generator, lo: int = 64, hi: int = 256) -> list[EncodedSample]:
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [EncodedSample(torch.randint(10, 49000, (k,), generator=g).tolist(), int(k * 0.4), False)
            for k in lengths]


def padded(samples, size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for s in range(0, len(samples), size):
        ids, mask = pad_right([e.input_ids for e in samples[s:s + size]], 0)
        out.append((ids.to(device), mask.to(device)))
    return out


def perplexity_rows(model, device: str, g: torch.Generator, windows: int) -> list[dict]:
    w = torch.randint(10, 49000, (windows, 128), generator=g)
    rows = []
    for bs in (8, 32, 128):
        batches = [(w[s:s + bs].to(device), torch.ones_like(w[s:s + bs]).to(device)) for s in range(0, len(w), bs)]
        t = timed(lambda bs=bs: window_nll(model, w, bs), device)
        full = timed(lambda b=batches: full_logits_nll(model, b), device)
        floor = timed(lambda b=batches: bare_forwards(model, b), device)
        for stage, secs in (("perplexity", t), ("perplexity, full-logits NLL", full)):
            rows.append({"stage": stage, "batch": bs, "tok_s": w.numel() / secs, "floor_tok_s": w.numel() / floor,
                         "ratio": secs / floor})
    return rows


@torch.inference_mode()
def full_logits_nll(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The NLL as perplexity computed it before window_token_nll: log-softmax of the full [B, T, V] logits."""
    for ids, _ in batches:
        token_nll(model(ids, use_cache=False).logits, ids).double().sum()


def jsd_rows(model, device: str, g: torch.Generator, n: int) -> list[dict]:
    samples = sorted(random_samples(n, g), key=lambda e: -len(e.input_ids))
    seqs = [e.input_ids for e in samples]
    bounds = [(e.prompt_len - 1, len(e.input_ids) - 1) for e in samples]
    pruned = copy.deepcopy(model)
    tokens = sum(len(s) for s in seqs)
    rows = []
    for bs in (8, 32):
        batches = padded(samples, bs, device)
        t = timed(lambda bs=bs: sample_divergences(model, pruned, seqs, bounds, jsd, batch_size=bs), device)
        floor = timed(lambda b=batches: (bare_forwards(model, b), bare_forwards(pruned, b)), device)
        rows.append({"stage": "jsd (2 models)", "batch": bs, "tok_s": tokens / t, "floor_tok_s": tokens / floor,
                     "ratio": t / floor})
    return rows


def lora_rows(model, device: str, g: torch.Generator, steps: int) -> tuple[list[dict], str, torch.nn.Module]:
    """LoRA steps at two micro-batch sizes against bare forwards; the profile of one step; the last trained
    peft model (for the recovered-model evaluation)."""
    rows, profile = [], ""
    batches = [random_samples(16, g) for _ in range(steps)]
    tokens = sum(len(e.input_ids) for b in batches for e in b)
    for micro in (4, 16):
        rec = LoraRecovery(batch_size=16, micro_batch_size=micro, dtype="bfloat16")
        peft_model = rec.wrap(copy.deepcopy(model))
        peft_model.train()
        masters = MasterWeights(peft_model)
        optimizer = torch.optim.AdamW(masters.tensors(), lr=1e-4)

        def train(rec=rec, peft_model=peft_model, masters=masters, optimizer=optimizer):
            for batch in batches:
                rec._optimizer_step(peft_model, masters, optimizer, batch, 0)

        t = timed(train, device, repeats=1)  # after a warm-up pass over the same steps
        micro_batches = [mb for b in batches for mb in padded(sorted(b, key=lambda e: -len(e.input_ids)),
                                                              micro, device)]
        floor = timed(lambda b=micro_batches: bare_forwards(model, b), device)
        rows.append({"stage": "lora step", "batch": f"16 (micro {micro})", "tok_s": tokens / t,
                     "floor_tok_s": tokens / floor, "ratio": t / floor, "step_s": t / steps})
        if micro == 4:
            profile = profile_step(rec, peft_model, masters, optimizer, batches[0], device)
        masters.finish()
    return rows, profile, peft_model.eval()


def recovered_eval_rows(model, peft_model, device: str, g: torch.Generator, windows: int) -> list[dict]:
    """Perplexity of the trained LoRA model, unmerged and merged as the pipeline evaluates it
    (``paser.recovery.merged``), against the same windows on the model without adapters (the floor here)."""
    from paser.recovery import merged

    w = torch.randint(10, 49000, (windows, 128), generator=g)
    base = timed(lambda: window_nll(model, w, 32), device)
    rows = []
    for label, m in (("unmerged", peft_model), ("merged", merged(peft_model))):
        t = timed(lambda m=m: window_nll(m, w, 32), device)
        rows.append({"stage": f"perplexity, LoRA {label}", "batch": 32, "tok_s": w.numel() / t,
                     "floor_tok_s": w.numel() / base, "ratio": t / base})
    return rows


def profile_step(rec, model, masters, optimizer, batch, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        rec._optimizer_step(model, masters, optimizer, batch, 0)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if device.startswith("cuda") else 0
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    head = (f"one LoRA step (16 samples, micro-batch 4) under the profiler: wall {wall * 1e3:.1f} ms, "
            f"device kernels {device_us / 1e3:.1f} ms, kernel launches {launches}\n")
    return head + events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48)


def tie_check(device: str, g: torch.Generator) -> dict:
    """Masks of tied scores (as |W| of bf16 weights) on the device vs the CPU: prune_mask, and plain topk."""
    score = torch.randint(0, 4, (512, 576), generator=g).float()
    k = 288
    cpu_topk = torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.topk(score, k, 1, largest=False).indices, True)
    dev_topk = torch.zeros_like(score, dtype=torch.bool, device=device).scatter_(
        1, torch.topk(score.to(device), k, 1, largest=False).indices, True).cpu()
    return {"topk_rows_differing": int((cpu_topk != dev_topk).any(1).sum()),
            "prune_mask_rows_differing": int((prune_mask(score, 0.5, None)
                                              != prune_mask(score.to(device), 0.5, None).cpu()).any(1).sum()),
            "prune_mask_2_4_rows_differing": int((prune_mask(score, 0.5, (2, 4))
                                                  != prune_mask(score.to(device), 0.5, (2, 4)).cpu()).any(1).sum()),
            "rows": score.shape[0]}


STAGES = ("perplexity", "jsd", "lora", "ties")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--windows", type=int, default=1024, help="perplexity windows of 128 tokens")
    ap.add_argument("--samples", type=int, default=256, help="JSD samples (64-256 tokens)")
    ap.add_argument("--steps", type=int, default=5, help="timed LoRA steps of 16 samples")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="what to time (lora includes the trained model's evaluation)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    facts = host_facts(torch.device(args.device))
    print("host:", json.dumps(facts))
    model = smollm2_shaped(args.layers, args.device)
    rows, profile, ties = [], "", None
    if "perplexity" in args.stages:
        rows += perplexity_rows(model, args.device, g, args.windows)
    if "jsd" in args.stages:
        rows += jsd_rows(model, args.device, g, args.samples)
    if "lora" in args.stages:
        lora, profile, trained = lora_rows(model, args.device, g, args.steps)
        rows += lora + recovered_eval_rows(model, trained, args.device, g, args.windows)
    if "ties" in args.stages:
        ties = tie_check(args.device, g)
    print(f"\nSmolLM2-135M-shaped random model ({args.layers} layers), bf16, on {args.device}")
    print("| stage | batch | tok/s | bare-forward tok/s | time / bare forwards |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['tok_s']:,.0f} | {r['floor_tok_s']:,.0f} | {r['ratio']:.2f} |")
    if ties is not None:
        print("\nmasks with tied scores, device vs cpu:", json.dumps(ties))
    if profile:
        print("\n" + profile)
    if args.out:
        args.out.write_text(json.dumps({"host": facts, "layers": args.layers, "rows": rows, "ties": ties,
                                        "profile": profile}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
