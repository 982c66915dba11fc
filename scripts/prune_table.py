"""Prune the embedded SmolLM2-135M with each pruner and write experiments/pruners.md: achieved sparsity,
parameters, prune time and WikiText-2 / PTB perplexity (LLM-Pruner protocol) next to the dense model.

    python scripts/prune_table.py                                  # the configs' own settings (slow on CPU)
    python scripts/prune_table.py --calib-windows 32 --eval-windows 64   # a quicker, stated subset

Each pruner is conf/pruner/<name>.yaml (its ``calibration:`` block gives the windows, which
--calib-windows / --calib-seqlen override for the layer-wise pruners), run as a run's prune stage
(``paser.pipeline.prune_only``: the same calibration recipe, on a fresh copy of the dense model, and through
the stage cache, so a pruned model a run computed is reused and vice versa; the prune time is that of the
computation). The table is rewritten after every row.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.compose import compose
from paser.evaluation.perplexity import PerplexityEvaluator
from paser.pipeline import prune_only

PRUNERS = ["magnitude", "wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4", "llm_pruner", "llm_pruner_channel"]
LAYERWISE = {"wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4"}
MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct"}  # the title of the model the settings below describe


def pruned(name: str, args) -> tuple:
    """(model, tokenizer, prune report) of pruner ``name`` (``none``: the dense model) on ``args.model``,
    with ``args.sets`` (KEY=VALUE) applied to the pruner's config."""
    overrides = [f"model={args.model}", f"pruner={name}", "logger=none", "recovery=none",
                 f"paths.data_dir={args.data_dir}", f"paths.cache_dir={args.cache_dir}",
                 *(f"pruner.{kv}" for kv in args.sets)]
    if name in LAYERWISE:
        overrides += [f"pruner.calibration.{key}={value}" for key, value in
                      (("nsamples", args.calib_windows), ("seqlen", args.calib_seqlen)) if value]
    return prune_only(compose(overrides), device="cpu")


def calibration_label(report: dict) -> str:
    c = report.get("calibration")
    return f"{c['nsamples']} x {c['seqlen']} C4 tokens" if c else "none"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=PRUNERS, help="conf/pruner names (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="conf/model name (default: %(default)s)")
    p.add_argument("--calib-windows", type=int, help="calibration windows for Wanda/SparseGPT (config: 128)")
    p.add_argument("--calib-seqlen", type=int, help="tokens per calibration window for Wanda/SparseGPT (config: 512)")
    p.add_argument("--eval-windows", type=int, help="cap on 128-token perplexity windows per corpus (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=os.environ.get("PASER_DATA_DIR", "../shared/data"))
    p.add_argument("--cache-dir", default=os.environ.get("PASER_CACHE_DIR", ".cache/paser"))
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override every pruner's config, e.g. --set ratio=0.1 importance=random")
    p.add_argument("--out", default="experiments/pruners.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    evaluator = PerplexityEvaluator(("wikitext2", "ptb"), seq_len=128, batch_size=args.batch_size,
                                    max_windows=args.eval_windows, data_dir=args.data_dir)
    command = "python scripts/prune_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []

    for name in ["none", *args.pruners]:
        model, tok, report = pruned(name, args)
        ppl = evaluator.evaluate(model, tok)
        rows.append(("dense" if name == "none" else name, "-" if name == "none" else calibration_label(report),
                     report, report.get("prune_time_s", 0.0), ppl["wikitext2"]["ppl"], ppl["ptb"]["ppl"],
                     ppl["wikitext2"]["windows"], ppl["ptb"]["windows"]))
        write(args, rows, command)
        del model


def write(args, rows, command) -> None:
    dense_params = rows[0][2]["params"]
    lines = [
        f"# Pruners on {MODELS.get(args.model, args.model)}",
        "",
        "Written by `scripts/prune_table.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        ("| pruner | calibration | sparsity (decoder weights) | per-layer sparsity min-max | params | non-zero params "
        "| prune time (s) | WikiText-2 ppl | PTB ppl |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, calib, rep, seconds, wiki, ptb, _, _ in rows:
        per_layer = list(rep["sparsity_per_layer"].values())
        params = f"{rep['params'] / 1e6:.2f}M"
        if rep["params"] != dense_params:
            params += f" (-{100 * (1 - rep['params'] / dense_params):.1f}%)"
        lines.append(f"| {name} | {calib} | {rep['sparsity']:.3f} | {min(per_layer):.3f}-{max(per_layer):.3f} "
                     f"| {params} | {rep['params_nonzero'] / 1e6:.2f}M | {seconds:.0f} | {wiki:.2f} | {ptb:.2f} |")
    wiki_windows, ptb_windows = rows[0][6], rows[0][7]
    lines += [
        "",
        "Settings:",
        (f"- model: {MODELS.get(args.model, args.model)} (conf/model/{args.model}.yaml), bfloat16, CPU "
        f"({platform.machine()}, {torch.get_num_threads()} torch threads), torch {torch.__version__}."),
        "- pruner settings: conf/pruner/<name>.yaml. Wanda/SparseGPT calibration windows are random C4 "
        "(c4-train.00000-of-01024 head) windows, seed 0, at the size in the calibration column "
        + ("(reduced from the configs' 128 x 512 for CPU time)." if args.calib_windows or args.calib_seqlen
           else "(the configs' own)."),
        ("- LLM-Pruner: ratio 0.25 block-wise, param_first Taylor importance, gradients from 10 x 64 C4 tokens, "
        "heads and MLP channels of layers 4..27 (of 30; first 4 and last 2 dense), GQA by whole KV groups "
        "(9 q / 3 kv heads -> 6 q / 2 kv in pruned layers; 1536 -> 1152 MLP channels)."),
        ("- LLM-Pruner channel: ratio 0.25 of the hidden channels of the whole model (576 -> 432), same importance "
        "and gradients; heads and MLP widths unchanged."),
        f"- perplexity: LLM-Pruner protocol, non-overlapping 128-token windows, WikiText-2 raw test and PTB "
        f"validation; {wiki_windows} and {ptb_windows} windows"
        + (f" (the first {args.eval_windows} of each corpus, a subset)." if args.eval_windows else " (all)."),
        ("- sparsity: fraction of zeros in the decoder Linear weights (embeddings and lm_head excluded; only "
        "channel-wise LLM-Pruner changes them); for LLM-Pruner the weights are removed, not zeroed, so its "
        "reduction shows in params."),
        "- no recovery fine-tuning: these are the pruned models the recovery stage starts from.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
