"""Paper-style tables and plots from the results.json files of a sweep.

    python scripts/make_tables.py outputs/multirun/table1_cpu [--out experiments/table1_cpu] [--wandb]

Rows are the recovery methods (labelled by the config values that differ between runs: the selector,
and any knob that varies, e.g. `budget=0.05`; an option present in only some runs with a single value is
a config addition, not a knob), plus "Dense" and "w/o recovery" taken from every run's
dense and pruned metrics. Columns: WikiText-2 and PTB perplexity, each zero-shot task's headline metric
and their mean. Cells are mean ± std over seeds. The best value of a column is bold; a dagger marks
values within two standard errors of the best (not distinguishable from it: the standard error combines
the spread over seeds and lm-eval's per-run stderr). Writes table.md, table.tex and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

IGNORED = ("seed", "name", "paths.", "recovery.seed", "logger.group")
NAMES = {"FullSelector": "Full data", "RandomSelector": "Random", "IFDSelector": "IFD",
         "NuggetsSelector": "Nuggets", "InstructionMiningSelector": "Instruction Mining",
         "PaserSelector": "PASER"}
# names of the methods selectors report in diagnostics["method"] (a variant its environment decided)
METHOD_NAMES = {"instruction_mining": "Instruction Mining",
                "instruction_mining_no_reward": "Instruction Mining w/o reward"}
TASK_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def load_runs(folders: list[Path]) -> list[dict]:
    runs = []
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            r = json.loads(path.read_text())
            r["_path"] = str(path.parent)
            runs.append(r)
    if not runs:
        raise SystemExit(f"no results.json under {', '.join(map(str, folders))}")
    return runs


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def short(value) -> str:
    text = str(value)
    return text.rsplit(".", 1)[-1] if text.startswith("paser.") else text


def varies(configs: list[dict], key: str) -> bool:
    """Whether ``key`` takes more than one value. A key that only some runs have, with one value wherever
    present, is a config option added between the runs (its default keeps the old behaviour), not a knob."""
    return len({str(c[key]) for c in configs if key in c}) > 1


def method_name(run: dict, config: dict) -> str:
    """The method a run's selection used: the selector's own report (``diagnostics.method``, e.g. Instruction
    Mining without its reward term) where it gives one, else the selector class."""
    method = ((run.get("selection") or {}).get("diagnostics") or {}).get("method")
    if method:
        return METHOD_NAMES.get(method, method)
    target = short(config.get("selector._target_"))
    return NAMES.get(target, target)


def labels(runs: list[dict]) -> list[str]:
    """A row label per run: the method's name plus the config values that vary inside its group."""
    configs = [flat(r["config"]) for r in runs]
    base = [method_name(r, c) for r, c in zip(runs, configs)]
    out = []
    for i, c in enumerate(configs):
        peers = [configs[j] for j in range(len(runs)) if base[j] == base[i]]
        keys = sorted({k for p in peers for k in set(p) | set(c)
                       if not k.startswith(IGNORED) and k != "selector._target_" and varies(peers, k)})
        extra = ", ".join(f"{k.removeprefix('selector.')}={short(c.get(k))}" for k in keys)
        out.append(f"{base[i]} ({extra})" if extra else base[i])
    return out


def columns(runs: list[dict]) -> list[tuple[str, str]]:
    """(key, header) of the metric columns present in the runs."""
    cols = [(f"ppl/{c}", f"{h} ↓") for c, h in (("wikitext2", "WikiText-2"), ("ptb", "PTB"))
            if any(c in (r["metrics"]["dense"].get("ppl") or {}) for r in runs)]
    tasks = []
    for r in runs:
        for t in ((r["metrics"]["dense"].get("zeroshot") or {}).get("tasks") or {}):
            if t not in tasks:
                tasks.append(t)
    cols += [(f"zs/{t}", TASK_NAMES.get(t, t)) for t in tasks]
    if tasks:
        cols.append(("zs/mean", "Mean ↑"))
    return cols


def value(metrics: dict, key: str) -> tuple[float | None, float | None]:
    """(value, sampling stderr) of one metric of one model state; accuracies in percent."""
    kind, name = key.split("/")
    if kind == "ppl":
        entry = (metrics.get("ppl") or {}).get(name)
        return (entry["ppl"], None) if entry else (None, None)
    zs = metrics.get("zeroshot") or {}
    if name == "mean":
        if zs.get("mean") is None:
            return None, None
        errs = [e.get(f"{e['metric']}_stderr") for e in (zs.get("tasks") or {}).values() if e.get("score") is not None]
        se = math.sqrt(sum(x * x for x in errs)) / len(errs) if errs and None not in errs else None
        return 100 * zs["mean"], (100 * se if se is not None else None)  # tasks' errors independent
    entry = (zs.get("tasks") or {}).get(name)
    if not entry or entry.get("score") is None:
        return None, None
    stderr = entry.get(f"{entry['metric']}_stderr")
    return 100 * entry["score"], (100 * stderr if stderr is not None else None)


def aggregate(samples: list[tuple[float | None, float | None]]) -> dict | None:
    vals = [v for v, _ in samples if v is not None]
    if not vals:
        return None
    n = len(vals)
    std = float(np.std(vals, ddof=1)) if n > 1 else 0.0
    # every seed is scored on the same evaluation documents, so their sampling error does not average
    # out over seeds: SE² = seed variance / n + the runs' mean stderr²
    sampling = [s for _, s in samples if s is not None]
    var = (std ** 2 / n if n > 1 else 0.0) + (float(np.mean(np.square(sampling))) if sampling else 0.0)
    return {"mean": float(np.mean(vals)), "std": std, "n": n, "se": math.sqrt(var)}


def build_rows(runs: list[dict]) -> tuple[list[str], dict[str, dict[str, dict | None]], list]:
    cols = columns(runs)
    groups: dict[str, list[dict]] = defaultdict(list)
    pruners = {short(r["config"]["pruner"].get("_target_")) for r in runs}
    for r in runs:
        pruner = short(r["config"]["pruner"].get("_target_"))
        suffix = f" ({pruner})" if len(pruners) > 1 else ""
        groups[f"Dense{suffix}"].append(r["metrics"]["dense"])
        groups[f"w/o recovery{suffix}"].append(r["metrics"]["pruned"])
    for r, label in zip(runs, labels(runs)):
        if "recovered" in r["metrics"]:
            groups[label].append(r["metrics"]["recovered"])
    table = {}
    for label, states in groups.items():
        if label.startswith(("Dense", "w/o recovery")):
            states = states[:1]  # the same model state in every run: count it once
        table[label] = {key: aggregate([value(m, key) for m in states]) for key, _ in cols}
    return list(groups), table, cols


def best_and_ties(table, cols):
    marks = {}
    for key, _ in cols:
        lower = key.startswith("ppl/")
        cells = {row: r[key] for row, r in table.items() if r[key] and not row.startswith("Dense")}
        if not cells:
            continue
        best_row = (min if lower else max)(cells, key=lambda r: cells[r]["mean"])
        b = cells[best_row]
        for row, c in cells.items():
            if row == best_row:
                marks[(row, key)] = "best"
            elif abs(c["mean"] - b["mean"]) <= 2 * math.hypot(c["se"], b["se"]):
                marks[(row, key)] = "tie"
    return marks


def fmt(cell: dict | None, key: str) -> str:
    if cell is None:
        return "–"
    digits = 2
    text = f"{cell['mean']:.{digits}f}"
    if cell["n"] > 1:
        text += f" ± {cell['std']:.{digits}f}"
    return text


def markdown(rows, table, cols, marks) -> str:
    lines = ["| Method | " + " | ".join(h for _, h in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for key, _ in cols:
            text = fmt(table[row][key], key)
            mark = marks.get((row, key))
            cells.append(f"**{text}**" if mark == "best" else f"{text} †" if mark == "tie" else text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latex(rows, table, cols, marks) -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("%", r"\%").replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$")

    lines = [r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
             "Method & " + " & ".join(esc(h) for _, h in cols) + r" \\", r"\midrule"]
    for row in rows:
        cells = []
        for key, _ in cols:
            text = fmt(table[row][key], key).replace("±", r"$\pm$").replace("–", "--")
            mark = marks.get((row, key))
            cells.append(rf"\textbf{{{text}}}" if mark == "best" else rf"{text}$^\dagger$" if mark == "tie"
                         else text)
        lines.append(esc(row) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots

def plot_all(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    run_labels = labels(runs)

    # recovery loss curves: one line per method (first seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r, label in zip(runs, run_labels):
        curve = (r.get("recovery") or {}).get("loss_curve")
        if curve and label not in seen:
            seen.add(label)
            ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=label)
    if seen:
        ax.set(xlabel="optimizer step", ylabel="training loss (response tokens)", title="LoRA recovery")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "recovery_loss.png"))
    plt.close(fig)

    # budget-ratio curve, if the budget varies
    budgets = {r["config"]["budget"] for r in runs}
    if len(budgets) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_method = defaultdict(lambda: defaultdict(list))
        for r, label in zip(runs, run_labels):
            method = label.split(" (")[0]
            if "recovered" in r["metrics"]:
                by_method[method][r["config"]["budget"]].append(r["metrics"]["recovered"]["ppl"]["wikitext2"]["ppl"])
        for method, points in by_method.items():
            xs = sorted(points)
            ys = [np.mean(points[x]) for x in xs]
            es = [np.std(points[x]) for x in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.axhline(runs[0]["metrics"]["pruned"]["ppl"]["wikitext2"]["ppl"], ls="--", c="gray", label="w/o recovery")
        ax.set(xlabel="budget (fraction of the pool)", ylabel="WikiText-2 perplexity", title="Budget curve")
        ax.legend()
        written.append(_save(fig, out / "budget_curve.png"))
        plt.close(fig)

    # per-cluster CDS and budget of the first PASER run that clustered
    for r in runs:
        clusters = (r["selection"].get("diagnostics") or {}).get("clusters")
        if clusters and len(clusters) > 1 and "cds" in clusters[0]:
            fig, ax1 = plt.subplots(figsize=(7, 4))
            ks = [c["cluster"] for c in clusters]
            ax1.bar([k - 0.2 for k in ks], [c["cds"] for c in clusters], width=0.4, label="CDS (mean JSD)")
            ax2 = ax1.twinx()
            ax2.bar([k + 0.2 for k in ks], [c["n_k"] for c in clusters], width=0.4, color="tab:orange",
                    label="budget n_k")
            ax1.set(xlabel="cluster", ylabel="CDS", title="PASER: degradation and budget per cluster")
            ax2.set_ylabel("n_k")
            fig.legend(loc="upper right", fontsize=8)
            written.append(_save(fig, out / "cluster_cds_budget.png"))
            plt.close(fig)
            break
    # PASER's cluster map (drawn by the selector into its run folder): the first run that has one
    maps = [Path(r["_path"]) / "paser_clusters.png" for r in runs]
    png = next((m for m in maps if m.exists()), None)
    if png is not None:
        shutil.copy(png, out / "cluster_map.png")
        written.append(out / "cluster_map.png")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def describe(runs: list[dict]) -> str:
    c = runs[0]["config"]
    seeds = sorted({r["seed"] for r in runs})
    subset_notes = []
    dense = runs[0]["metrics"]["dense"]
    if any((dense.get("ppl") or {}).get(k, {}).get("subset") for k in ("wikitext2", "ptb")):
        subset_notes.append(f"perplexity on the first {c['evaluator']['ppl']['max_windows']} windows")
    zs = dense.get("zeroshot") or {}
    if zs.get("subset"):
        subset_notes.append(f"zero-shot on {zs['limit']} {zs['limit_mode']} documents per task")
    return (f"{len(runs)} runs; model {c['model']['name']}; pool {runs[0]['selection']['pool_size']} samples "
            f"({runs[0]['selection']['pool_source']}); budget {sorted({r['selection']['budget'] for r in runs})}; "
            f"seeds {seeds}" + (f"; subsets: {', '.join(subset_notes)}" if subset_notes else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="sweep folders holding results.json files")
    ap.add_argument("--out", type=Path, help="output folder (default: the first sweep folder)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B run")
    args = ap.parse_args()
    runs = load_runs(args.folders)
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    rows, table, cols = build_rows(runs)
    marks = best_and_ties(table, cols)
    md = markdown(rows, table, cols, marks)
    note = ("Mean ± std over seeds. **Bold**: best (dense excluded). †: within two standard errors of the "
            "best (seed spread and lm-eval stderr combined), i.e. not distinguishable from it.")
    (out / "table.md").write_text(f"{describe(runs)}\n\n{md}\n\n{note}\n")
    (out / "table.tex").write_text(latex(rows, table, cols, marks) + "\n")
    (out / "table.json").write_text(json.dumps({"rows": rows, "cells": table}, indent=1))
    plots = plot_all(runs, out)
    print(describe(runs), "\n")
    print(md, "\n\n" + note)
    print(f"\nwrote {out / 'table.md'}, table.tex, table.json" + "".join(f", {p.name}" for p in plots))
    if args.wandb:
        from paser.tracking import WandbLogger

        logger = WandbLogger(project="paser", group=runs[0]["name"])
        logger.start({"sweep": [str(f) for f in args.folders]}, out, name=f"{runs[0]['name']}-table",
                     tags=["table"])
        logger.log_table("table", ["method"] + [h for _, h in cols],
                         [[r] + [table[r][k]["mean"] if table[r][k] else None for k, _ in cols] for r in rows])
        for p in plots:
            logger.log_image(p.stem, p)
        logger.finish({})


if __name__ == "__main__":
    main()
