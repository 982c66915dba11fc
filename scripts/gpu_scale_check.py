"""Paper scale on one GPU, measured in minutes: every stage of experiment=table1 timed on a randomly
initialised model of a 7B shape, each section with its own peak-memory reset, then extrapolated to the
whole experiment.

    python scripts/gpu_scale_check.py --shape llama2-7b --out scale_check.json   # ~5-8 min on one H100
    python scripts/gpu_scale_check.py --device cpu --shape tiny                  # the script itself (tests)

Shapes: llama2-7b, llama3-8b, qwen2.5-7b (their published configurations) and tiny (paser's test model).
Speed does not depend on the weights' values, so no checkpoint is read: the model is built on ``meta``,
materialised on the device in bf16 with random weights, and pruned to the shape the project's LLM-Pruner
gives at the table's ratio (0.25, its default layer range; the shape code run on the meta model with random
importance). Sample lengths come from Alpaca (paths: ``--data-dir``, default ../shared/data), templated as
the pipeline does, counted at ``--chars-per-token``; without the file, from a fixed length distribution.

Sections, each timed after a warm-up and written to the JSON as soon as it finishes (a timeout keeps what
finished): bare forwards (dense, pruned), perplexity (dense, pruned), the LLM-Pruner gradient pass, zero-shot
scoring (the shared-context scorer), PASER's JSD at scoring batch 8 and 32 next to two bare forwards, LoRA
optimizer steps at micro-batch 4/8/16 next to a bare forward+backward and HF Trainer + peft (bf16, gradient
accumulation, group_by_length) on the same samples, the LoRA model's forward unmerged and merged, and the
kNN graph over 520K points. Each row: seconds, tokens/s, the ratio to its floor, peak GPU memory (torch's
allocations) and host resident set, and the MFU against the GPU's dense bf16 peak (``--peak-tflops``).

Then: the time and peak memory of each stage of ``experiment=table1`` (PASER, 20% budget, LoRA recipe of
conf/recovery/lora.yaml, evaluator=full) on this GPU, extrapolated from the rows by the stage's workload
(tokens of WikiText-2, PTB and the zero-shot tasks, optimizer steps), all estimates: the workload's token
counts are characters / --chars-per-token, and the selector's embedding and clustering are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser import hardware
from paser.data import EncodedSample, alpaca_prompt
from paser.evaluation.perplexity import window_nll
from paser.evaluation.shared_context_lm import SharedContextHFLM
from paser.models import layer_shapes, tiny_llama
from paser.pruners.llm_pruner import LLMPruner, default_layer_range
from paser.recovery import LoraRecovery, MasterWeights, response_nll
from paser.scoring import pad_right
from paser.selectors.paser.clustering import knn_graph
from paser.selectors.paser.divergence import jsd, sample_divergences

# published configurations (the hub's config.json of each model)
SHAPES = {
    "llama2-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}),
    "llama3-8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                            "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    "qwen2.5-7b": ("qwen2", {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                             "tie_word_embeddings": False}),
    "tiny": ("llama", None),  # paser.models.tiny_llama's configuration
}
PRUNE_RATIO = 0.25           # conf/pruner/llm_pruner.yaml, Table 1
CUTOFF, EFFECTIVE_BATCH = 256, 64  # conf/recovery/lora.yaml
# dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched on the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
# table1's workload: ppl = WikiText-2 test + PTB validation; zero-shot = the seven tasks' files; pool = Alpaca
PPL_FILES = ("wikitext2/wiki.test.raw", "ptb/ptb.valid.txt")
ZEROSHOT_FILES = ("boolq/validation.jsonl", "piqa/valid.jsonl", "hellaswag/validation.jsonl",
                  "winogrande/dev.jsonl", "arc/arc_easy_test.jsonl", "arc/arc_challenge_test.jsonl",
                  "openbookqa/test.jsonl")
# without ../shared/data: the characters of those files, counted once (python over the files above)
FALLBACK_CHARS = {"ppl": 1_288_556 + 399_782, "zeroshot": 13_372_023, "zeroshot_docs": 20_465}
POOL, VAL_SIZE, BUDGET, EPOCHS, EVAL_EVERY = 52_002, 2_000, 0.2, 2, 100


# ------------------------------------------------------------------------------------------ models

def config_of(shape: str):
    family, values = SHAPES[shape]
    if values is None:
        return tiny_llama()[0].config
    from transformers import LlamaConfig, Qwen2Config

    return (LlamaConfig if family == "llama" else Qwen2Config)(**values)


def build(config, device: torch.device, shapes: list[dict] | None = None, seed: int = 0):
    """A causal LM of ``config`` (and the given per-layer shapes) built on meta and materialised on ``device``
    in bf16 with random weights: N(0, 0.02) matrices, unit norms, zero biases; tied weights stay tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from paser.models import apply_layer_shapes

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if shapes is not None:
        apply_layer_shapes(model, shapes)
    g = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
                if p.dim() > 1:
                    t.normal_(0.0, 0.02, generator=g)
                else:
                    t.fill_(1.0 if "norm" in f"{module_name}.{name}" else 0.0)
                made[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
    return model.to(device).eval()


def pruned_shapes(config) -> list[dict]:
    """The per-layer shapes LLM-Pruner (ratio 0.25, default layer range) leaves: its own code on a meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    LLMPruner(ratio=PRUNE_RATIO, importance="random").remove(model, None)
    return layer_shapes(model)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ workload

def sample_lengths(data_dir: Path, chars_per_token: float, n: int, rng: np.random.Generator) -> tuple[list, str]:
    """(prompt tokens, total tokens) of ``n`` templated Alpaca samples at the cutoff, and where they came from."""
    path = data_dir / "alpaca" / "alpaca_data.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pairs = [(len(alpaca_prompt(r)) / chars_per_token, (len(alpaca_prompt(r)) + len(r["output"])) / chars_per_token + 1)
                 for r in rows]
        source = f"alpaca ({len(rows)} samples, {chars_per_token} characters per token)"
    else:  # the shape of Alpaca's distribution: prompts ~40% of 60-256-token samples
        pairs = [(0.4 * t, t) for t in np.linspace(60, 256, 64)]
        source = "fixed distribution (no alpaca file)"
    chosen = rng.choice(len(pairs), size=n, replace=len(pairs) < n)
    return [(max(1, min(int(pairs[i][0]), CUTOFF - 1)), max(2, min(int(pairs[i][1]), CUTOFF))) for i in chosen], source


def workload(data_dir: Path, chars_per_token: float, lengths: list[tuple[int, int]]) -> dict:
    """Table 1's token counts and optimizer steps, from the data files when present."""
    def chars(o) -> int:
        if isinstance(o, str):
            return len(o)
        return sum(map(chars, o.values() if isinstance(o, dict) else o)) if isinstance(o, (dict, list)) else 0

    ppl_files = [data_dir / f for f in PPL_FILES]
    zs_files = [data_dir / f for f in ZEROSHOT_FILES]
    if all(f.is_file() for f in ppl_files + zs_files):
        ppl_chars = sum(len(f.read_text()) for f in ppl_files)
        zs_rows = [json.loads(line) for f in zs_files for line in f.read_text().splitlines() if line.strip()]
        zs_chars, docs, source = sum(map(chars, zs_rows)), len(zs_rows), "data files"
    else:
        ppl_chars, zs_chars, docs = FALLBACK_CHARS["ppl"], FALLBACK_CHARS["zeroshot"], FALLBACK_CHARS["zeroshot_docs"]
        source = "counts of the data files (absent here)"
    mean_tokens = float(np.mean([t for _, t in lengths]))
    selected = int(BUDGET * POOL)
    steps = math.ceil(selected / EFFECTIVE_BATCH) * EPOCHS
    return {"source": source, "ppl_tokens": int(ppl_chars / chars_per_token),
            "zeroshot_tokens": int(zs_chars / chars_per_token), "zeroshot_docs": docs,
            "pool_tokens": int((POOL - VAL_SIZE) * mean_tokens), "mean_sample_tokens": mean_tokens,
            "lora_steps": steps, "lora_steps_full_data": math.ceil((POOL - VAL_SIZE) / EFFECTIVE_BATCH) * EPOCHS,
            "val_tokens": int(VAL_SIZE * mean_tokens) * (steps // EVAL_EVERY + 1)}


# ------------------------------------------------------------------------------------------ timing

class Check:
    """Runs the sections, each with its own peak-memory reset, and writes the JSON after every one."""

    def __init__(self, device: torch.device, out: Path, head: dict, peak_tflops: float | None):
        self.device, self.out, self.peak_flops = device, out, peak_tflops and peak_tflops * 1e12
        self.report = {**head, "sections": {}}
        self.peaks = hardware.StagePeaks(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def section(self, name: str, fn, tokens: int, flops_per_token: float | None = None, repeats: int = 1,
                floor: str | None = None, steps: int | None = None, **extra) -> dict:
        """Time ``fn`` (seconds per call after one warm-up call; per optimizer step too with ``steps``) and
        record it as ``name``."""
        row = {"tokens": tokens, **extra}
        with self.peaks.measure(row):
            fn()
            self.sync()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            self.sync()
            seconds = (time.perf_counter() - start) / repeats
        row.update(seconds=seconds, tok_s=tokens / seconds)
        if steps:
            row["per_step_s"] = seconds / steps
        if floor is not None:
            row["floor"], row["ratio"] = floor, seconds / self.report["sections"][floor]["seconds"]
        if flops_per_token and self.peak_flops:
            row["mfu"] = tokens * flops_per_token / seconds / self.peak_flops
        self.record(name, row)
        return row

    def record(self, name: str, row: dict) -> None:
        self.report["sections"][name] = row
        self.out.write_text(json.dumps(self.report, indent=1, default=str))
        mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
        ratio = f", {row['ratio']:.2f}x {row['floor']}" if "ratio" in row else ""
        gpu = row.get("peak_gpu_memory_gib")
        unit = "rows" if "rows" in row else "tok"
        print(f"{name:<34} {row['seconds']:9.3f} s  {row['tok_s']:>12,.0f} {unit}/s{ratio}{mfu}"
              f"  peak {gpu if gpu is not None else '-'} GiB device, {row['peak_host_rss_gib']} GiB host", flush=True)


def forward_flops(model):
    """FLOPs of a forward per token as a function of the sequence length: 2 per weight of every matmul (the
    LM head included, the embedding lookup not) plus causal attention's QK^T and AV."""
    c, embedding = model.config, model.get_input_embeddings().weight.numel()
    matmuls = params(model) - embedding + (embedding if c.tie_word_embeddings else 0)
    attention_width = sum(s["q_heads"] for s in layer_shapes(model)) * (c.hidden_size // c.num_attention_heads)
    return lambda seq: 2 * matmuls + 4 * attention_width * seq / 2


def random_ids(g: torch.Generator, vocab: int, *shape) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=g)


def samples_of(lengths, g: torch.Generator, vocab: int) -> list[EncodedSample]:
    return [EncodedSample(random_ids(g, vocab, total).tolist(), prompt, False) for prompt, total in lengths]


def padded(samples, size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for s in range(0, len(samples), size):
        ids, mask = pad_right([e.input_ids for e in samples[s:s + size]], 0)
        out.append((ids.to(device), mask.to(device)))
    return out


@torch.inference_mode()
def bare_forwards(model, batches) -> None:
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask, use_cache=False)


# ------------------------------------------------------------------------------------------ sections

def forwards_and_perplexity(check: Check, dense, pruned, flops, g, sizes) -> None:
    vocab = dense.config.vocab_size
    windows = random_ids(g, vocab, sizes["windows"], 128)  # the ppl evaluator's 128-token windows, batch 8
    batches = [(windows[s:s + 8].to(check.device), None) for s in range(0, len(windows), 8)]
    for label, model in (("dense", dense), ("pruned", pruned)):
        check.section(f"forward_{label}", lambda m=model: bare_forwards(m, batches), windows.numel(),
                      flops[label](128))
        check.section(f"perplexity_{label}", lambda m=model: window_nll(m, windows, 8), windows.numel(),
                      flops[label](128), floor=f"forward_{label}")


def gradient_pass(check: Check, dense, flops, g) -> None:
    """LLM-Pruner's Taylor gradient pass (param_first, 10 x 64 calibration tokens) over the pruned range."""
    pruner = LLMPruner(ratio=PRUNE_RATIO)
    calib = random_ids(g, dense.config.vocab_size, 10, 64)
    layers = dense.model.layers
    start, end = default_layer_range(len(layers))
    weights = [getattr(m, n).weight for layer in layers[start:end]
               for m, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                (layer.mlp, ("gate_proj", "up_proj", "down_proj"))) for n in names]
    check.section("llm_pruner_gradients", lambda: pruner.scorer(dense, calib, weights), calib.numel(),
                  3 * flops["dense"](64))  # forward, the inputs' and the weights' gradients
    for p in dense.parameters():
        p.grad = None


def zeroshot(check: Check, model, flops, g, sizes) -> None:
    """The shared-context scorer on documents shaped like the tasks' (a context and 4 choices), batch 16."""
    lm = SharedContextHFLM.__new__(SharedContextHFLM)  # the packed scorer alone, without lm-eval's setup
    lm._model = model
    vocab = model.config.vocab_size
    requests, groups = [], []
    for d in range(sizes["docs"]):
        ctx = tuple(random_ids(g, vocab, 80).tolist())
        idx = []
        for _ in range(4):
            idx.append(len(requests))
            requests.append((None, list(ctx), random_ids(g, vocab, 20).tolist()))
        groups.append((ctx, idx))
    batches = [groups[s:s + 16] for s in range(0, len(groups), 16)]
    tokens = sum(len(ctx) + sum(len(requests[i][2]) for i in idx) for ctx, idx in groups)
    check.section("zeroshot_dense", lambda: [lm._score_packed(b, requests) for b in batches], tokens,
                  flops["dense"](160))


def divergence(check: Check, dense, pruned, flops, lengths, g, sizes) -> None:
    samples = sorted(samples_of(lengths[:sizes["jsd"]], g, dense.config.vocab_size), key=lambda e: -len(e.input_ids))
    seqs = [e.input_ids for e in samples]
    bounds = [(e.prompt_len - 1, len(e.input_ids) - 1) for e in samples]
    tokens = sum(map(len, seqs))
    both = flops["dense"](CUTOFF // 2) + flops["pruned"](CUTOFF // 2)
    for bs in (8, 32):
        batches = padded(samples, bs, check.device)
        check.section(f"two_forwards_b{bs}", lambda b=batches: (bare_forwards(dense, b), bare_forwards(pruned, b)),
                      tokens, both)
        check.section(f"jsd_b{bs}", lambda bs=bs: sample_divergences(dense, pruned, seqs, bounds, jsd, batch_size=bs),
                      tokens, both, floor=f"two_forwards_b{bs}")


def lora(check: Check, pruned, flops, lengths, g, sizes) -> torch.nn.Module:
    """paser's LoRA optimizer steps at micro-batch 4/8/16 (effective batch 64), each against a bare forward
    + backward of the same micro-batches; returns the trained peft model."""
    batch = sizes["lora_batch"]
    steps = [samples_of(lengths[s * batch:(s + 1) * batch], g, pruned.config.vocab_size) for s in range(sizes["steps"])]
    tokens = sum(len(e.input_ids) for b in steps for e in b)
    per_token = 2 * flops["pruned"](CUTOFF // 2)  # frozen weights: forward + the inputs' gradients
    recipe = {"batch_size": batch, "dtype": "bfloat16", "warmup_steps": 0, "val_size": 0, "keep": "last"}
    peft_model = LoraRecovery(**recipe).wrap(pruned)
    peft_model.train()

    def forward_backward(micro: int):  # the floor: the same micro-batches, without masters or optimizer
        for b in steps:
            ordered = sorted(b, key=lambda e: -len(e.input_ids))
            for s in range(0, len(ordered), micro):
                response_nll(peft_model, ordered[s:s + micro], 0, check.device).backward()
        peft_model.zero_grad(set_to_none=True)

    for micro in (4, 8, 16):
        micro = min(micro, batch)
        check.section(f"forward_backward_micro{micro}", lambda m=micro: forward_backward(m), tokens, per_token)
        rec = LoraRecovery(**recipe, micro_batch_size=micro)
        masters = MasterWeights(peft_model)
        optimizer = torch.optim.AdamW(masters.tensors(), lr=1e-4)
        check.section(f"lora_step_micro{micro}",
                      lambda r=rec, m=masters, o=optimizer: [r._optimizer_step(peft_model, m, o, b, 0) for b in steps],
                      tokens, per_token, floor=f"forward_backward_micro{micro}", steps=len(steps),
                      micro_batch=micro, effective_batch=batch)
        masters.finish()
    return peft_model.eval()


def hf_trainer(check: Check, base, lengths, g, sizes) -> None:
    """What a user would run instead: HF Trainer + peft (bf16 autocast on a GPU, gradient accumulation,
    group_by_length) on the same samples and micro-batch 4."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batch = sizes["lora_batch"]
    rows = []
    for prompt, total in lengths[:batch * (sizes["steps"] + 1)]:
        ids = random_ids(g, base.config.vocab_size, total).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = {"input_ids": 0, "labels": -100}
        out = {k: torch.tensor([f[k] + [pad[k]] * (width - len(f[k])) for f in features]) for k in pad}
        out["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                              for f in features])
        return out

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            check.sync()
            self.times.append(time.perf_counter())

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    cuda = check.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=4, gradient_accumulation_steps=batch // 4,
                                 max_steps=sizes["steps"] + 1, learning_rate=1e-4, bf16=cuda, use_cpu=not cuda,
                                 train_sampling_strategy="group_by_length", report_to=[], save_strategy="no", logging_strategy="no",
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
        timer = StepTimes()
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[timer])
        row = {"micro_batch": 4, "effective_batch": batch}
        with check.peaks.measure(row):
            trainer.train()
    per_step = float(np.mean(np.diff(timer.times)))  # after the first step (warm-up)
    tokens = sum(len(r["input_ids"]) for r in rows[batch:]) / sizes["steps"]
    row.update(seconds=per_step, per_step_s=per_step, tokens=tokens, tok_s=tokens / per_step,
               floor="lora_step_micro4", ratio=per_step / check.report["sections"]["lora_step_micro4"]["per_step_s"])
    check.record("hf_trainer_peft_micro4", row)
    model.unload()


def merged_forwards(check: Check, peft_model, flops, g, sizes) -> torch.nn.Module:
    from paser.recovery import merged

    windows = random_ids(g, peft_model.config.vocab_size, sizes["windows"], 128)
    check.section("perplexity_lora_unmerged", lambda: window_nll(peft_model, windows, 8), windows.numel(),
                  flops["pruned"](128), floor="perplexity_pruned")
    model = merged(peft_model)
    check.section("perplexity_lora_merged", lambda: window_nll(model, windows, 8), windows.numel(),
                  flops["pruned"](128), floor="perplexity_pruned")
    return model


def knn(check: Check, rows: int, dim: int = 384) -> None:
    """S²RIC's kNN graph (k=10) over ``rows`` points of the sentence embedder's width, on the device."""
    x = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    row = {"rows": rows, "dim": dim}
    with check.peaks.measure(row):
        start = time.perf_counter()
        _, _, info = knn_graph(x, 10, device=check.device)
        check.sync()
        row["seconds"] = time.perf_counter() - start
    row.update(info, tokens=rows, tok_s=rows / row["seconds"])
    check.record(f"knn_{rows}", row)


# ------------------------------------------------------------------------------------------ extrapolation

def extrapolate(sections: dict, work: dict) -> dict:
    """Seconds and peak memory of each stage of experiment=table1 (selector=paser) on this device."""
    s = sections

    def rate(name):
        return s[name]["tok_s"]

    def peak(*names):
        return {key: max((s[n][key] for n in names if s[n].get(key) is not None), default=None)
                for key in ("peak_gpu_memory_gib", "peak_host_rss_gib")}

    pruned_zs = rate("zeroshot_dense") * rate("forward_pruned") / rate("forward_dense")
    eval_pruned = work["ppl_tokens"] / rate("perplexity_pruned") + work["zeroshot_tokens"] / pruned_zs
    knn_rows = next(int(k.split("_")[1]) for k in s if k.startswith("knn_"))
    knn_s = s[f"knn_{knn_rows}"]["seconds"] * (POOL / knn_rows) ** 2  # exact search: N^2
    step_s = s["lora_step_micro4"]["per_step_s"]
    recover = work["lora_steps"] * step_s + work["val_tokens"] / rate("forward_pruned")
    stages = {
        "eval_dense": (work["ppl_tokens"] / rate("perplexity_dense") + work["zeroshot_tokens"] / rate("zeroshot_dense"),
                       peak("forward_dense", "perplexity_dense", "zeroshot_dense")),
        "prune": (s["llm_pruner_gradients"]["seconds"], peak("llm_pruner_gradients")),
        "eval_pruned": (eval_pruned, peak("forward_pruned", "perplexity_pruned")),
        "select (PASER: JSD + kNN; embedding and clustering not timed)":
            (work["pool_tokens"] / rate("jsd_b8") + knn_s, peak("jsd_b8", f"knn_{knn_rows}")),
        "recover (LoRA, 20% budget)": (recover, peak("lora_step_micro4")),
        "eval_recovered (merged)": (eval_pruned * s["perplexity_lora_merged"]["ratio"], peak("perplexity_lora_merged")),
    }
    out = {name: {"seconds": secs, **mem} for name, (secs, mem) in stages.items()}
    out["recover (LoRA, full data)"] = {**out["recover (LoRA, 20% budget)"],
                                        "seconds": work["lora_steps_full_data"] * step_s
                                        + work["val_tokens"] / rate("forward_pruned")}
    return out


# time / bare forwards at the pipeline's default batches, measured on one H200 (experiments/gpu_h200,
# profile_h200.json): perplexity at batch 8, PASER's JSD at scoring batch 8
H200_RATIOS = {"perplexity": 1.554, "jsd_b8": 1.394}


def assumed_sections(flops: dict, work: dict, flops_per_s: float) -> dict:
    """``--estimate``: the sections extrapolate() reads, every forward at the assumed achieved FLOP/s, the
    perplexity and JSD overheads as measured on the H200, LoRA steps and the gradient pass at their compute
    floor (frozen weights: forward + inputs' gradients; the gradient pass also the weights'), zero-shot at a
    bare forward, the kNN graph free; no memory."""
    def row(seconds, tokens, **extra):
        return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "peak_gpu_memory_gib": None,
                "peak_host_rss_gib": None, **extra}

    seq, step_tokens = CUTOFF // 2, EFFECTIVE_BATCH * work["mean_sample_tokens"]
    fwd = {k: row(f(128) / flops_per_s, 1) for k, f in flops.items()}
    two = (flops["dense"](seq) + flops["pruned"](seq)) / flops_per_s
    return {"forward_dense": fwd["dense"], "forward_pruned": fwd["pruned"],
            **{f"perplexity_{k}": row(H200_RATIOS["perplexity"] * v["seconds"], 1) for k, v in fwd.items()},
            "zeroshot_dense": row(flops["dense"](160) / flops_per_s, 1),
            "jsd_b8": row(H200_RATIOS["jsd_b8"] * two, 1),
            "llm_pruner_gradients": row(640 * 3 * flops["dense"](64) / flops_per_s, 640),
            "lora_step_micro4": row(1, 1, per_step_s=step_tokens * 2 * flops["pruned"](seq) / flops_per_s),
            "knn_52002": row(1e-9, 1), "perplexity_lora_merged": row(1, 1, ratio=1.0)}


def print_table(name: str, stages: dict, work: dict) -> None:
    print(f"\nexperiment=table1 at the {name} shape on this device (ESTIMATES: extrapolated from the sections; "
          f"workload from {work['source']}, {work['lora_steps']} LoRA steps):")
    print("| stage | time | peak device GiB | peak host GiB |\n|---|---|---|---|")
    def gib(value):
        return "-" if value is None else f"{value:.1f}"

    for stage, v in stages.items():
        print(f"| {stage} | {v['seconds'] / 60:.1f} min | {gib(v['peak_gpu_memory_gib'])} | "
              f"{gib(v['peak_host_rss_gib'])} |")
    total = sum(v["seconds"] for k, v in stages.items() if "full data" not in k)
    print(f"| one run (PASER) | {total / 3600:.2f} h | | |")


def sizes_for(shape: str, device: torch.device) -> dict:
    if shape == "tiny":
        return {"windows": 16, "docs": 8, "jsd": 16, "lora_batch": 16, "steps": 1, "knn_rows": 2_000}
    return {"windows": 256, "docs": 64, "jsd": 256, "lora_batch": EFFECTIVE_BATCH, "steps": 2,
            "knn_rows": 520_000 if device.type == "cuda" else 20_000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--chars-per-token", type=float, default=3.8,
                    help="workload token counts from characters (LLaMA-2's tokenizer: about 3.8 on English text)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (MFU)")
    ap.add_argument("--knn-rows", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("scale_check.json"))
    ap.add_argument("--estimate", type=float, metavar="MFU", default=None,
                    help="no GPU, nothing timed: the table1 stages with every forward at this MFU of "
                         "--peak-tflops (assumed_sections)")
    args = ap.parse_args(argv)
    if args.estimate is not None:
        return estimate(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = sizes_for(args.shape, device)
    if args.knn_rows:
        sizes["knn_rows"] = args.knn_rows
    facts = hardware.host_facts(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in (facts.get("gpu") or "")), None)
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    lengths, length_source = sample_lengths(args.data_dir, args.chars_per_token, 4096, rng)
    work = workload(args.data_dir, args.chars_per_token, lengths)
    config = config_of(args.shape)
    shapes = pruned_shapes(config)
    check = Check(device, args.out, {"shape": args.shape, "host": facts, "peak_tflops": peak, "sizes": sizes,
                                     "lengths": length_source, "workload": work, "pruned_shapes": shapes}, peak)
    print(f"host: {facts.get('gpu') or facts['cpu']}; shape {args.shape}; lengths from {length_source}", flush=True)
    start = time.perf_counter()
    dense, pruned = build(config, device), build(config, device, shapes, seed=1)
    check.report.update(params_dense=params(dense), params_pruned=params(pruned), build_s=time.perf_counter() - start)
    print(f"built on {device} in {check.report['build_s']:.1f} s: {params(dense) / 1e9:.2f}B dense, "
          f"{params(pruned) / 1e9:.2f}B pruned", flush=True)
    flops = {"dense": forward_flops(dense), "pruned": forward_flops(pruned)}
    forwards_and_perplexity(check, dense, pruned, flops, g, sizes)
    gradient_pass(check, dense, flops, g)
    zeroshot(check, dense, flops, g, sizes)
    divergence(check, dense, pruned, flops, lengths, g, sizes)
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trained = lora(check, pruned, flops, lengths, g, sizes)
    base = merged_forwards(check, trained, flops, g, sizes)
    hf_trainer(check, base, lengths, g, sizes)
    del base, trained, pruned
    knn(check, sizes["knn_rows"])
    check.report["table1"] = extrapolate(check.report["sections"], work)
    args.out.write_text(json.dumps(check.report, indent=1, default=str))
    print_table(args.shape, check.report["table1"], work)
    return 0


def estimate(args) -> int:
    if not args.peak_tflops:
        raise SystemExit("--estimate needs --peak-tflops (e.g. 989 for an H100 SXM)")
    lengths, _ = sample_lengths(args.data_dir, args.chars_per_token, 4096, np.random.default_rng(0))
    work = workload(args.data_dir, args.chars_per_token, lengths)
    config = config_of(args.shape)
    models = {}
    for label, shapes in (("dense", None), ("pruned", pruned_shapes(config))):
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            models[label] = AutoModelForCausalLM.from_config(config)
        if shapes:
            from paser.models import apply_layer_shapes

            apply_layer_shapes(models[label], shapes)
    flops = {k: forward_flops(m) for k, m in models.items()}
    stages = extrapolate(assumed_sections(flops, work, args.peak_tflops * 1e12 * args.estimate), work)
    print(f"{args.shape}: {params(models['dense']) / 1e9:.2f}B dense, {params(models['pruned']) / 1e9:.2f}B pruned; "
          f"every forward at {args.estimate:.0%} of {args.peak_tflops:g} TFLOP/s; workload {json.dumps(work)}")
    print_table(args.shape, stages, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
