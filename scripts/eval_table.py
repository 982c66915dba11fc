"""Evaluate one model with an evaluator preset and write a Markdown table of the zero-shot scores.

    python scripts/eval_table.py                                  # dense SmolLM2-135M, evaluator=quick
    python scripts/eval_table.py evaluator=full                   # all examples (the paper's setting)
    python scripts/eval_table.py evaluator=quick evaluator.zeroshot.limit=300 --out experiments/x.md

Arguments of the form key=value are Hydra overrides of conf/config.yaml (model, paths, evaluator). The
table gives acc and acc_norm with their standard errors, the headline metric, the mean, the wall time per
task and an extrapolation to all examples. Because wall time depends on the host and on what else runs on
it, a plain bf16 forward pass (8 x 128 tokens) is timed before and after, the CPU and load are recorded,
and the time is also given scaled to the reference host of docs/PLATFORM.md (REFERENCE_TOK_S).

    python scripts/eval_table.py evaluator=full --from-json experiments/zeroshot_dense_full.json \
        --out experiments/zeroshot_dense_full.md      # re-render a table from saved results, no evaluation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M bf16 forward, batch 8x128, on the 2-core AMX-BF16 host that docs/PLATFORM.md measured idle
REFERENCE_TOK_S = 2700


def forward_throughput(model, reps: int = 3) -> float:
    """Tokens per second of a plain forward pass, batch 8 x 128 (median of ``reps``)."""
    import torch

    x = torch.randint(0, model.config.vocab_size, (8, 128))
    times = []
    with torch.inference_mode():
        model(x[:1, :16], use_cache=False)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, use_cache=False)
            times.append(time.perf_counter() - t0)
    return x.numel() / statistics.median(times)


def cpu_description() -> str:
    """CPU model and whether it has AMX (bf16 matrix units), which sets bf16 throughput more than anything."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    bf16 = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else "no bf16 units"
    return f"{name} ({bf16}), {os.cpu_count()} cores"


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(cfg, res: dict, command: str, calib: dict) -> str:
    zs = res["zeroshot"]
    lines = [f"# Zero-shot evaluation: {cfg.model.name} ({cfg.model.dtype}), dense", "",
             (f"Produced by `{command}` (evaluator preset `{calib['preset']}`, lm-eval {zs['lm_eval_version']}, "
             f"tasks from `{zs['source']}`, {'shared-context scoring' if zs['share_context'] else 'plain HFLM'}, "
             f"batch {calib['batch_size']})."), ""]
    if zs["subset"]:
        how = "the first" if zs["limit_mode"] == "first" else f"a seeded random (seed {zs['seed']})"
        lines += [(f"**Subset:** {how} {zs['limit']} documents per task, not the full sets: scores carry the "
                  "standard errors shown and are not the paper's full-set numbers."), ""]
    lines += ["| task | n | acc | ± | acc_norm | ± | headline | score | wall s | est. full s (now) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    est_total = 0.0
    for name, t in zs["tasks"].items():
        if "score" not in t:
            continue
        est = t["wall_time_s"] * t["n_total"] / t["n"]
        est_total += est
        lines.append(f"| {name} | {t['n']}/{t['n_total']} | {pct(t['acc'])} | {pct(t['acc_stderr'])} | "
                     f"{pct(t['acc_norm'])} | {pct(t['acc_norm_stderr'])} | {t['metric']} | "
                     f"**{pct(t['score'])}** | {t['wall_time_s']:.0f} | {est:.0f} |")
    lines.append(f"| **mean** ({len(zs['mean_over'])} tasks) | | | | | | | **{pct(zs['mean'])}** | "
                 f"{zs['wall_time_s']:.0f} | {est_total:.0f} |")
    for name, t in zs["tasks"].items():
        if "word_perplexity" in t:
            lines += ["", (f"lm-eval `wikitext` ({t['n']}/{t['n_total']} documents): word perplexity "
                      f"{t['word_perplexity']:.2f}, byte perplexity {t['byte_perplexity']:.4f}, "
                      f"bits per byte {t['bits_per_byte']:.4f}.")]
    if res.get("ppl"):
        parts = [f"{k} {v['ppl']:.2f} ({v['windows']} windows{', subset' if v['subset'] else ''})"
                 for k, v in res["ppl"].items()]
        lines += ["", f"Perplexity (LLM-Pruner protocol, 128-token windows, {res['ppl_wall_s']:.0f} s): "
                  + "; ".join(parts) + "."]
    scale = calib["tok_s_now"] / REFERENCE_TOK_S
    lines += [
        "", "## Time", "",
        f"- Host: {calib.get('cpu', '?')}; load average {calib['load_before']} before, {calib['load_after']} after.",
        f"- Zero-shot wall time of this run: {zs['wall_time_s']:.0f} s ({zs['wall_time_s'] / 60:.0f} min) for "
        f"{sum(t['n'] for t in zs['tasks'].values())} documents"
        + (f"; perplexity {res['ppl_wall_s']:.0f} s." if res.get("ppl") else "."),
        (f"- Plain bf16 forward (8 x 128 tokens) on this host during the run: {calib['tok_s_before']:.0f} tok/s "
        f"before, {calib['tok_s_after']:.0f} tok/s after."),
        (f"- All examples of the seven tasks at this run's speed: about {est_total / 60:.0f} min (each task's "
        "time scaled by n_total / n)."),
        (f"- Scaled to the reference host of docs/PLATFORM.md ({REFERENCE_TOK_S} tok/s for the same forward; "
        f"times x {scale:.2f}): about **{est_total * scale / 60:.0f} min**. This assumes the evaluation speeds up "
        "as much as the plain forward pass does; only a run on that host measures it."),
    ]
    return "\n".join(lines) + "\n"


def evaluate(cfg, preset: str) -> tuple[dict, dict]:
    """Evaluate the dense model with the composed evaluator; (results, host and speed calibration)."""
    import hydra

    from paser.cache import StageCache
    from paser.models import load_model

    model, tok = load_model(cfg.model, StageCache(cfg.paths.cache_dir))

    def load() -> str:
        return open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"

    calib = {"preset": preset, "batch_size": cfg.evaluator.zeroshot.batch_size, "load_before": load(),
             "cpu": cpu_description(), "tok_s_before": forward_throughput(model)}
    results = {}
    if cfg.evaluator.get("ppl") is not None:
        t0 = time.perf_counter()
        results["ppl"] = hydra.utils.instantiate(cfg.evaluator.ppl).evaluate(model, tok)
        results["ppl_wall_s"] = time.perf_counter() - t0
    results["zeroshot"] = hydra.utils.instantiate(cfg.evaluator.zeroshot).evaluate(model, tok)
    calib.update(tok_s_after=forward_throughput(model), load_after=load())
    calib["tok_s_now"] = (calib["tok_s_before"] + calib["tok_s_after"]) / 2
    return results, calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. evaluator=full")
    parser.add_argument("--out", default="experiments/zeroshot_dense.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--from-json", default=None, help="re-render the table from results saved with --json")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from paser.compose import compose

    overrides = list(args.overrides)
    if not any(o.startswith("evaluator=") for o in overrides):
        overrides.insert(0, "evaluator=quick")
    cfg = compose(overrides)
    if cfg.evaluator.get("zeroshot") is None:
        raise SystemExit("this evaluator preset has no zero-shot part; use evaluator=quick, zeroshot or full")
    # the command that produces the results (a re-rendering names the evaluation that made them)
    command = ["python", "scripts/eval_table.py", *args.overrides, "--out", args.out]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, calib = saved["results"], saved["calibration"]
        command += ["--json", args.from_json]
    else:
        preset = next(o for o in overrides if o.startswith("evaluator=")).split("=", 1)[1]
        results, calib = evaluate(cfg, preset)
        if args.json:
            command += ["--json", args.json]
            Path(args.json).write_text(json.dumps({"results": results, "calibration": calib,
                                                   "config": OmegaConf.to_container(cfg.evaluator, resolve=True)},
                                                  indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(cfg, results, " ".join(shlex.quote(a) for a in command), calib))
    print(out.read_text())


if __name__ == "__main__":
    main()
