"""What a finished run reports: results.json's ``summary``, the table printed (and written to run.log) at
the end, ``selected.jsonl``, and what goes to the experiment logger (W&B).

Units: perplexity as is; accuracies and shares in percent, as scripts/make_tables.py reports them (the
``metrics`` block keeps the evaluators' own output, lm-eval's accuracies as fractions).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from paser.cache import atomic_write_text, library_versions, to_plain
from paser.data import Pool
from paser.tracking import git_commit, write_results

log = logging.getLogger(__name__)

WIRING_CHECK = ("a wiring check: model=tiny-llama is a random model on a byte-level vocabulary, so these "
                "numbers mean nothing (they only show that every stage ran)")
STATES = ("dense", "pruned", "recovered")


def component_name(node) -> str:
    target = node.get("_target_") if node is not None else None
    return target.rsplit(".", 1)[-1] if target else "none"


def run_tags(cfg: DictConfig) -> list[str]:
    """The run's tags for the experiment logger: the model and the components."""
    return [f"model:{cfg.model.name}", f"pruner:{component_name(cfg.pruner)}",
            f"selector:{component_name(cfg.selector)}", f"recovery:{component_name(cfg.recovery)}"]


def stage_doing(cfg, name: str) -> str:
    """What a stage of the run (paser.pipeline.Run) is about, for the line that starts it."""
    if name.startswith("eval_"):
        state, _, kind = name.removeprefix("eval_").partition("_")
        return f"the {state} model's " + "; ".join(_evaluation(k, node) for k, node in cfg.evaluator.items()
                                                   if node is not None and kind in ("", k))
    if name == "prune":
        pruner = component_name(cfg.pruner)
        return "the dense model's weight report (pruner=none)" if pruner == "none" else f"pruning with {pruner}"
    if name == "select":
        unit = cfg.get("budget_unit", "samples")
        return f"{component_name(cfg.selector)} selects budget={cfg.budget} ({unit}) from the pool"
    if name == "recover":
        r = cfg.recovery
        return (f"{component_name(r)} on the selection (r={r.get('r')}, {r.get('epochs')} epochs, effective batch "
                f"{r.get('batch_size')})")
    return name


def _evaluation(kind: str, node) -> str:
    if kind == "ppl":
        windows = f"first {node.max_windows} windows" if node.get("max_windows") else "every window"
        return f"perplexity on {', '.join(node.corpora)} ({windows} of {node.seq_len} tokens)"
    if kind == "zeroshot":
        limit = f", {node.limit} documents each" if node.get("limit") else ""
        return f"zero-shot accuracy on {', '.join(node.tasks)}{limit}"
    return kind


def share_closed(dense, pruned, recovered) -> float | None:
    """The share of the pruning gap that recovery closed, (pruned - recovered) / (pruned - dense): the same
    formula for perplexity (lower is better) and accuracy (higher is better). None without all three."""
    if None in (dense, pruned, recovered) or pruned == dense:
        return None
    return (pruned - recovered) / (pruned - dense)


def gap_closed(metrics: dict) -> dict[str, float]:
    """Per perplexity corpus, the share of the pruning gap that recovery closed; empty without a recovered
    model."""
    states = [(metrics.get(s) or {}).get("ppl") or {} for s in STATES]
    closed = {name: share_closed(*(st.get(name, {}).get("ppl") for st in states)) for name in states[2]}
    return {name: share for name, share in closed.items() if share is not None}


def metric_table(metrics: dict) -> dict[str, dict]:
    """Each headline metric across the model states, e.g. {"ppl/wikitext2": {"unit": "perplexity", "dense":
    56.1, "pruned": 213.2, "recovered": 162.0, "gap_closed_pct": 32.6}}: perplexity per corpus, each
    zero-shot task's headline accuracy and their mean, in percent."""
    table: dict[str, dict] = {}
    for state, m in metrics.items():
        for corpus, result in (m.get("ppl") or {}).items():
            table.setdefault(f"ppl/{corpus}", {"unit": "perplexity"})[state] = result.get("ppl")
        zeroshot = m.get("zeroshot") or {}
        for task, entry in (zeroshot.get("tasks") or {}).items():
            if entry.get("score") is not None:
                table.setdefault(f"zeroshot/{task}", {"unit": f"{entry['metric']} %"})[state] = 100 * entry["score"]
        if zeroshot.get("mean") is not None:
            table.setdefault("zeroshot/mean", {"unit": "accuracy %"})[state] = 100 * zeroshot["mean"]
    for row in table.values():
        share = share_closed(*(row.get(s) for s in STATES))
        if share is not None:
            row["gap_closed_pct"] = 100 * share
    return table


def prune_record(report: dict) -> dict:
    """The prune report as results.json keeps it. A pruner that removed parameters (structured: heads,
    channels) leaves few zeros in what remains; that fraction is named for what it is, not 'sparsity'."""
    before, after = report.get("params_before"), report.get("params_after")
    if before is None or after is None or after >= before:
        return report
    rename = {"sparsity": "zero_fraction", "sparsity_per_layer": "zero_fraction_per_layer"}
    return {rename.get(k, k): v for k, v in report.items()}


def prune_summary(prune: dict) -> dict:
    before, after = prune.get("params_before"), prune.get("params_after")
    zeros = prune.get("sparsity", prune.get("zero_fraction"))
    return {"params_before": before, "params_after": after,
            "params_removed_pct": 100 * (1 - after / before) if before and after is not None else None,
            "zero_weights_pct": None if zeros is None else 100 * zeros}  # of the prunable decoder weights


def summary(results: dict, wiring_check: bool) -> dict:
    """results.json's ``summary``: the metrics across the model states with the share of each gap closed,
    what pruning removed, and the selection's size in samples and trained tokens."""
    selection, stats = results["selection"], results["selection"]["stats"]
    out = {"metrics": metric_table(results["metrics"]), "pruning": prune_summary(results["prune"]),
           "selection": {"samples": stats["selected"], "tokens": (stats.get("tokens") or {}).get("total"),
                         "pool": selection["pool_size"], "candidates": selection.get("candidates"),
                         "budget": selection["budget"]}}
    if wiring_check:
        out["note"] = WIRING_CHECK
    return out


def write_selected(path: Path, pool: Pool, indices: list[int]) -> None:
    """selected.jsonl: the chosen rows in the order the selector gave them, each with its line in the
    source file (the row number of a hub split; none for a pool built in memory) and its index in the
    pool (selected_indices.json)."""
    def record(i):
        where = {"line": pool.lines[i]} if pool.lines is not None else {}
        return json.dumps({**where, "pool_index": i, **pool.rows[i]}, ensure_ascii=False) + "\n"

    atomic_write_text(path, "".join(record(i) for i in indices))


def summary_table(results: dict) -> str:
    """The end-of-run summary: every headline metric per model state with the share of its gap closed."""
    def fmt(v, width=12):
        return f"{'-' if v is None else f'{v:.2f}':>{width}}"

    s = results["summary"]
    lines = [f"\n{'metric':<22} {'dense':>12} {'pruned':>12} {'recovered':>12} {'gap closed':>12}"]
    for name, row in s["metrics"].items():
        unit = "" if row["unit"] == "perplexity" else f" ({row['unit']})"
        closed = row.get("gap_closed_pct")
        lines.append(f"{name + unit:<22} " + " ".join(fmt(row.get(state)) for state in STATES)
                     + f" {'-' if closed is None else f'{closed:.1f}%':>12}")
    p, sel = s["pruning"], s["selection"]
    if p["params_removed_pct"]:
        lines.append(f"pruning removed {p['params_removed_pct']:.1f}% of the parameters "
                     f"({p['params_before']:,} -> {p['params_after']:,})")
    elif p["zero_weights_pct"]:
        lines.append(f"pruning zeroed {p['zero_weights_pct']:.1f}% of the decoder weights")
    tokens = f" ({sel['tokens']:,} trained tokens)" if sel["tokens"] is not None else ""
    lines.append(f"selected {sel['samples']} of {sel['pool']} samples{tokens}; results in {results['run_dir']}")
    lines.append("stages: " + ", ".join(f"{k} {v['seconds']:.1f}s{' (cached)' if v['reused'] else ''}"
                                        for k, v in results["timings"].items() if isinstance(v, dict)))
    if "note" in s:
        lines.append(f"NOTE: {s['note']}")
    return "\n".join(lines)


def log_artifacts(logger, results: dict, run_dir: Path, selector_files: list[str], adapter_dir: Path | None) -> None:
    """The selection (indices, rows and the selector's files) and the LoRA adapter, for the logger to upload
    as artifacts if ``logger.artifacts`` asks for them."""
    name, selection = f"{results['name']}-{run_dir.name}", results["selection"]
    logger.log_artifact(f"{name}-selection", "selection",
                        [run_dir / "selected_indices.json", run_dir / "selected.jsonl",
                         *(run_dir / f for f in selector_files)],
                        {"selector": component_name(results["config"]["selector"]),
                         "budget": selection["budget"], "selected": selection["stats"]["selected"],
                         "pool_fingerprint": selection["pool_fingerprint"]})
    if adapter_dir is not None:
        recovery = results["recovery"]
        knobs_used = {k: v for k, v in results["config"]["recovery"].items() if k != "_target_"}
        logger.log_artifact(f"{name}-adapter", "adapter", [adapter_dir],
                            {**knobs_used, "steps": recovery["steps"], "final_loss": recovery["final_loss"],
                             "kept": recovery["kept"]})


def log_results(logger, results: dict, run_dir: Path) -> None:
    if results["recovery"] and results["timings"]["recover"]["reused"]:  # a fresh one was logged live
        for point in results["recovery"]["loss_curve"]:
            logger.log({"recovery/step": point["step"], "recovery/loss": point["loss"], "recovery/lr": point["lr"]})
        for point in results["recovery"].get("val_curve", []):
            logger.log({"recovery/step": point["step"], "recovery/val_loss": point["loss"]})
    table = results["summary"]["metrics"]
    rows = [[state, *(table.get(m, {}).get(state) for m in ("ppl/wikitext2", "ppl/ptb", "zeroshot/mean"))]
            for state in results["metrics"]]
    logger.log_table("metrics_table", ["state", "wikitext2_ppl", "ptb_ppl", "zeroshot_mean_pct"], rows)
    for png in sorted(run_dir.glob("*.png")):  # selector diagnostics, e.g. PASER's cluster map
        logger.log_image(png.stem, png)
    logger.finish({"metrics": results["metrics"], "summary": results["summary"],
                   "prune": {k: v for k, v in results["prune"].items() if not k.endswith("_per_layer")},
                   "selection": results["selection"]["stats"], "timings": results["timings"]})


def report_run(cfg: DictConfig, out: dict, timings: dict, run_dir: Path, started: float, host: dict, pool: Pool,
               logger) -> dict:
    """The record of a finished run (paser.pipeline.run; ``out`` is what its stages returned, ``timings`` the
    stages' times): results.json with its summary, selected_indices.json and selected.jsonl written into
    ``run_dir``, and the same given to the experiment logger. Returns the results."""
    selection = out["selection"]
    results = {
        "name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir),
        "started_at": datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "config": to_plain(cfg),
        "host": {**host, "model_dtype": cfg.model.dtype, "recovery_dtype": OmegaConf.select(cfg, "recovery.dtype")},
        "metrics": out["metrics"],
        "prune": prune_record(out["prune"]),
        "selection": {k: v for k, v in selection.items() if k != "indices"},
        "recovery": out["recovery"],
        "timings": {**timings, "total_s": round(time.time() - started, 3)},
        "versions": library_versions(), "git_commit": git_commit(),
    }
    results["summary"] = summary(results, wiring_check=cfg.model.kind == "tiny")
    (run_dir / "selected_indices.json").write_text(json.dumps(selection["indices"]))
    write_selected(run_dir / "selected.jsonl", pool, selection["indices"])
    write_results(run_dir, results)
    log_artifacts(logger, results, run_dir, out["selector_files"], out["adapter_dir"])
    log_results(logger, results, run_dir)
    return results
