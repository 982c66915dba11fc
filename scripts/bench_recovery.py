"""LoRA recovery throughput against its hardware floor, in one process on this machine.

    python scripts/bench_recovery.py [--steps 4] [--model smollm2-135m]

A fixed workload: a seeded 16 x (steps + 1) Alpaca samples (templated, cutoff 256), LoRA with the default
recipe (r 8 on all seven projections, bf16, micro-batch 4, effective batch 16), ``--steps`` optimizer steps
after one warm-up step. The floor is a bare bf16 forward pass over the same micro-batches (inference mode),
grouped by length as the loop groups them.
Also timed: the same steps as the loop ran before this benchmark existed (fp32 adapters, the loss over
every position's full-vocabulary logits, the model's SDPA attention), and this loop with the model's own
attention instead of the one it trains with on the CPU (eager), for the speed-up of those changes.
Prints the host first and, as its last line, ``train/forward throughput ratio: X`` (train tokens/s over
forward tokens/s; a training step costs ~3 forwards, so ~0.33 is the natural ceiling).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from paser.cache import StageCache
from paser.data import encode_pool, load_pool
from paser.hardware import host_facts
from paser.models import load_model
from paser.recovery import LoraRecovery, response_nll, training_attention
from paser.scoring import pad_right

ROOT = Path(__file__).resolve().parents[1]


def full_logits_nll(model, micro, pad_id, device):
    """The former loss: fp32 cross-entropy over every position's logits, prompt positions included."""
    ids, mask = pad_right([e.input_ids for e in micro], pad_id)
    labels = ids.clone()
    labels[mask == 0] = -100
    for row, e in enumerate(micro):
        labels[row, :e.prompt_len] = -100
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")


def time_steps(rec, model, batches, pad_id, loss_fn) -> float:
    from paser import recovery

    real = recovery.response_nll
    recovery.response_nll = loss_fn
    try:
        model.train()
        masters = recovery.MasterWeights(model)
        optimizer = torch.optim.AdamW(masters.tensors(), lr=1e-4)
        rec._optimizer_step(model, masters, optimizer, batches[0], pad_id)  # warm-up
        start = time.perf_counter()
        for batch in batches[1:]:
            rec._optimizer_step(model, masters, optimizer, batch, pad_id)
        return time.perf_counter() - start
    finally:
        recovery.response_nll = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    cache = StageCache(ROOT / ".cache" / "paser")
    model, tok = load_model(cfg, cache, "cpu")
    host = host_facts(torch.device("cpu"))
    print(f"host: {host['cpu']}, AMX-BF16 {'yes' if host['amx_bf16'] else 'no'}, {host['cpu_cores']} cores, "
          f"{host['torch_threads']} torch threads, torch {host['torch']}")
    pool = load_pool(f"{args.data_dir}/alpaca/alpaca_data.jsonl", subsample=16 * (args.steps + 1))
    encoded = encode_pool(tok, pool.rows, 256)
    rec = LoraRecovery(batch_size=16, micro_batch_size=4, dtype="bfloat16", lr=1e-4, dropout=0.05)
    steps = [encoded[i:i + 16] for i in range(0, 16 * (args.steps + 1), 16)]
    tokens = sum(len(e.input_ids) for b in steps[1:] for e in b)

    model.to(torch.bfloat16)
    with torch.inference_mode():
        # the micro-batches the loop runs: each step's samples grouped by length, then cut into fours
        grouped = [sorted(b, key=lambda e: -len(e.input_ids)) for b in steps]
        micro = [b[k:k + 4] for b in grouped for k in range(0, 16, 4)]
        model(input_ids=pad_right([e.input_ids for e in micro[0]], tok.pad_token_id)[0])  # warm-up
        start = time.perf_counter()
        for m in micro[4:]:
            ids, mask = pad_right([e.input_ids for e in m], tok.pad_token_id)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        forward_s = time.perf_counter() - start

    from peft import LoraConfig, get_peft_model

    former = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rec.r, lora_alpha=rec.alpha, lora_dropout=rec.dropout, target_modules=rec.target_modules))
    old_s = time_steps(rec, former, steps, tok.pad_token_id, full_logits_nll)
    del former
    peft_model = rec.wrap(model)
    own_s = time_steps(rec, peft_model, steps, tok.pad_token_id, response_nll)  # the model's own attention
    with training_attention(peft_model) as attention:  # as LoraRecovery.recover trains
        train_s = time_steps(rec, peft_model, steps, tok.pad_token_id, response_nll)

    fwd, train, old, own = tokens / forward_s, tokens / train_s, tokens / old_s, tokens / own_s
    print(f"workload: {args.steps} steps x 16 samples, {tokens} tokens ({args.model}, bf16)")
    print(f"bare forward            {forward_s:7.2f} s  {fwd:8.0f} tok/s")
    print(f"LoRA steps (former)     {old_s:7.2f} s  {old:8.0f} tok/s  ratio {old / fwd:.3f}")
    print(f"LoRA steps (own attn.)  {own_s:7.2f} s  {own:8.0f} tok/s  ratio {own / fwd:.3f}  "
          f"({model.config._attn_implementation} attention)")
    print(f"LoRA steps (this loop)  {train_s:7.2f} s  {train:8.0f} tok/s  ratio {train / fwd:.3f}  ({attention} attention)")
    print(f"train/forward throughput ratio: {train / fwd:.3f}")


if __name__ == "__main__":
    main()
