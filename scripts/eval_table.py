"""Evaluate one model with an evaluator preset and write a Markdown table of the zero-shot scores.

    python scripts/eval_table.py                                  # dense SmolLM2-135M, evaluator=quick
    python scripts/eval_table.py evaluator=full                   # all examples (the paper's setting)
    python scripts/eval_table.py evaluator=quick evaluator.zeroshot.limit=300 --out experiments/x.md

Arguments of the form key=value are Hydra overrides of conf/config.yaml (model, paths, evaluator). The
table gives acc and acc_norm with their standard errors, the headline metric, the mean, the wall time per
task and an extrapolation to all examples. Because wall time depends on what else runs on the machine, a
plain bf16 forward pass (8 x 128 tokens) is timed before and after, and the extrapolation is also given
rescaled to this machine's idle throughput (REFERENCE_TOK_S, measured when it was idle).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE_TOK_S = 2700  # SmolLM2-135M bf16 forward, batch 8x128, this 2-core CPU idle (docs/PLATFORM.md)


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
    slow = calib["tok_s_now"] / REFERENCE_TOK_S
    lines += [
        "", "## Time", "",
        (f"- Zero-shot wall time of this run: {zs['wall_time_s']:.0f} s for {sum(t['n'] for t in zs['tasks'].values())} "
        f"documents; load average {calib['load_before']} before, {calib['load_after']} after "
        f"({os.cpu_count()} cores)."),
        (f"- Plain bf16 forward (8 x 128 tokens) during this run: {calib['tok_s_before']:.0f} tok/s before, "
        f"{calib['tok_s_after']:.0f} tok/s after; on this machine idle it is about {REFERENCE_TOK_S} tok/s, "
        f"so the machine ran at about {100 * slow:.0f}% of its idle speed."),
        (f"- All examples of the seven tasks at the speed of this run: about {est_total / 60:.0f} min "
        "(each task's time scaled by n_total / n)."),
        (f"- Rescaled to the idle machine (times x {slow:.2f}): about **{est_total * slow / 60:.0f} min**. "
        "This assumes the evaluation slows down as much as the plain forward pass does; a full run on an "
        "idle machine is the real check."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. evaluator=full")
    parser.add_argument("--out", default="experiments/zeroshot_dense.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()

    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from paser.cache import StageCache
    from paser.models import load_model

    overrides = list(args.overrides)
    if not any(o.startswith("evaluator=") for o in overrides):
        overrides.insert(0, "evaluator=quick")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if cfg.evaluator.get("zeroshot") is None:
        raise SystemExit("this evaluator preset has no zero-shot part; use evaluator=quick, zeroshot or full")
    model, tok = load_model(cfg.model, StageCache(cfg.paths.cache_dir))

    def load() -> str:
        return open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"

    calib = {"preset": next(o for o in overrides if o.startswith("evaluator=")).split("=", 1)[1],
             "batch_size": cfg.evaluator.zeroshot.batch_size, "load_before": load(),
             "tok_s_before": forward_throughput(model)}
    results = {}
    if cfg.evaluator.get("ppl") is not None:
        t0 = time.perf_counter()
        results["ppl"] = hydra.utils.instantiate(cfg.evaluator.ppl).evaluate(model, tok)
        results["ppl_wall_s"] = time.perf_counter() - t0
    results["zeroshot"] = hydra.utils.instantiate(cfg.evaluator.zeroshot).evaluate(model, tok)
    calib.update(tok_s_after=forward_throughput(model), load_after=load())
    calib["tok_s_now"] = (calib["tok_s_before"] + calib["tok_s_after"]) / 2

    command = "python scripts/eval_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(cfg, results, command.strip(), calib))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "calibration": calib,
                                               "config": OmegaConf.to_container(cfg.evaluator, resolve=True)},
                                              indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
