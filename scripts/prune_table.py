"""Prune the embedded SmolLM2-135M with each pruner and write experiments/pruners.md: achieved sparsity,
parameters, prune time and WikiText-2 / PTB perplexity (LLM-Pruner protocol) next to the dense model.

    python scripts/prune_table.py                                  # the configs' own settings (slow on CPU)
    python scripts/prune_table.py --calib-windows 32 --eval-windows 64   # a quicker, stated subset

Each pruner is built from conf/pruner/<name>.yaml (its ``calibration:`` block gives the windows, which
--calib-windows / --calib-seqlen override for the layer-wise pruners) and runs on a fresh copy of the
dense model. The table is rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.cache import StageCache
from paser.data import calibration_windows
from paser.evaluation.perplexity import PerplexityEvaluator
from paser.models import load_model
from paser.pruners.common import parameter_count, sparsity_report

PRUNERS = ["magnitude", "wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4", "llm_pruner", "llm_pruner_channel"]
LAYERWISE = {"wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4"}


def pruner_config(name: str, data_dir: str, sets: list[str] = ()):
    """conf/pruner/<name>.yaml composed by Hydra (presets inherit from others through their defaults list),
    with ``sets`` (KEY=VALUE) applied to it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"pruner={name}", f"paths.data_dir={data_dir}",
                                                          *(f"pruner.{kv}" for kv in sets)])
    return OmegaConf.to_container(cfg.pruner, resolve=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=PRUNERS, help="conf/pruner names (default: %(default)s)")
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

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml")
    dense, tok = load_model(model_cfg, StageCache(args.cache_dir))
    evaluator = PerplexityEvaluator(("wikitext2", "ptb"), seq_len=128, batch_size=args.batch_size,
                                    max_windows=args.eval_windows, data_dir=args.data_dir)
    command = "python scripts/prune_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []

    def evaluate(model):
        ppl = evaluator.evaluate(model, tok)
        return ppl["wikitext2"]["ppl"], ppl["ptb"]["ppl"], ppl["wikitext2"]["windows"], ppl["ptb"]["windows"]

    report = sparsity_report(dense, parameter_count(dense))
    rows.append(("dense", "-", report, 0.0, *evaluate(dense)))
    write(args, rows, command)
    for name in args.pruners:
        cfg = pruner_config(name, args.data_dir, args.sets)
        calib_cfg = cfg.pop("calibration", None)
        pruner = instantiate(cfg)
        calib, calib_desc = None, "none"
        if pruner.needs_calibration:
            n, seqlen = calib_cfg["nsamples"], calib_cfg["seqlen"]
            if name in LAYERWISE:
                n, seqlen = args.calib_windows or n, args.calib_seqlen or seqlen
            calib = calibration_windows(tok, calib_cfg["path"], n, seqlen, calib_cfg["seed"])
            calib_desc = f"{n} x {seqlen} C4 tokens"
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = pruner.prune(model, calib)
        seconds = time.perf_counter() - start
        rows.append((name, calib_desc, report, seconds, *evaluate(model)))
        write(args, rows, command)
        del model


def write(args, rows, command) -> None:
    dense_params = rows[0][2]["params"]
    lines = [
        "# Pruners on SmolLM2-135M-Instruct",
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
        (f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised; conf/model/smollm2-135m.yaml), bfloat16, CPU "
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
