"""Paper-style tables and plots from the results.json files of a sweep.

    python scripts/make_tables.py outputs/multirun/table1_cpu [--out experiments/table1_cpu] [--wandb]

Rows are the recovery methods (labelled by the config values that differ between runs: the selector,
and any knob that varies, e.g. `budget=0.05`; an option present in only some runs with a single value is
a config addition, not a knob), plus "Dense" and "w/o recovery" taken from every run's
dense and pruned metrics. Columns: WikiText-2 and PTB perplexity, each zero-shot task's headline metric
and their mean. Cells are mean ± std over seeds. The best value of a column is bold; a dagger marks
values within two standard errors of the best (not distinguishable from it: the standard error combines
the spread over seeds and lm-eval's per-run stderr). Writes table.md, table.tex and PNG plots.

Paired statistics (where the runs saved ``per_sample/<state>_<kind>.npz``): for each row, the difference
row − reference against Random (the same seed's Random run) and against w/o recovery (the same run's pruned
model), on the same windows and documents, perplexity as exp(Σ NLL / Σ tokens) and accuracy as the mean.
The 95% interval (``paired_interval``) combines the two sources of noise: training, the spread of the per-seed
differences over the k seed pairs (with a t quantile, so that 3 seeds give the wide interval they deserve,
not the min–max a percentile bootstrap over them gives), and evaluation, the variance of the difference
under a bootstrap of the windows/documents shared by every seed. With one seed pair only the evaluation
noise is known (marked ¹). A difference is significant (*) when its interval excludes 0. ``--against ROW``
adds a reference row (the same seed's run of that row), e.g. the full method in a stage ablation.
A difference marked ‡ pairs runs from different hosts (results.json "host": CPU model and AMX, or GPU):
their bf16 kernels differ, so it includes a host effect besides the method's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass
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


def host_label(run: dict) -> str:
    """The hardware whose kernels computed a run: its GPU, or its CPU model and whether bf16 ran on AMX."""
    h = run.get("host") or {}
    if h.get("gpu"):
        return h["gpu"]
    return (h.get("cpu") or "unknown host") + (" (AMX)" if h.get("amx_bf16") else "")


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
    return selector_name(config.get("selector._target_"))


def selector_name(target: str | None) -> str:
    """A selector's name in tables, from its ``_target_``: the display_name its class declares, else the
    built-in name, else the class name."""
    from paser.components import display_name

    name = short(target)
    return display_name(target) or NAMES.get(name, name)


def labels(runs: list[dict]) -> list[tuple[str, str]]:
    """(method, row label) per run: the label is the method's name plus the config values that vary inside
    its group."""
    configs = [flat(r["config"]) for r in runs]
    base = [method_name(r, c) for r, c in zip(runs, configs)]
    out = []
    for i, c in enumerate(configs):
        peers = [configs[j] for j in range(len(runs)) if base[j] == base[i]]
        keys = sorted({k for p in peers for k in set(p) | set(c)
                       if not k.startswith(IGNORED) and k != "selector._target_" and varies(peers, k)})
        extra = ", ".join(f"{k.removeprefix('selector.')}={short(c.get(k))}" for k in keys)
        out.append((base[i], f"{base[i]} ({extra})" if extra else base[i]))
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


def row_members(runs: list[dict]) -> dict[str, list[tuple[dict, str]]]:
    """The table's rows in order, each with its (run, model state) members."""
    groups: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    pruners = {short(r["config"]["pruner"].get("_target_")) for r in runs}
    for r in runs:
        pruner = short(r["config"]["pruner"].get("_target_"))
        suffix = f" ({pruner})" if len(pruners) > 1 else ""
        groups[f"Dense{suffix}"].append((r, "dense"))
        groups[f"w/o recovery{suffix}"].append((r, "pruned"))
    recovered = [(r, method, label) for r, (method, label) in zip(runs, labels(runs)) if "recovered" in r["metrics"]]
    first = {}
    for _, method, _ in recovered:
        first.setdefault(method, len(first))
    # one method's rows together, by budget, so that a budget curve reads top to bottom
    for r, _, label in sorted(recovered, key=lambda x: (first[x[1]], x[0]["config"]["budget"])):
        groups[label].append((r, "recovered"))
    return dict(groups)


def build_rows(runs: list[dict]) -> tuple[list[str], dict[str, dict[str, dict | None]], list]:
    cols = columns(runs)
    groups = row_members(runs)
    table = {}
    for label, members in groups.items():
        states = [r["metrics"][state] for r, state in members]
        if label.startswith(("Dense", "w/o recovery")):
            states = states[:1]  # the same model state in every run: count it once
        table[label] = {key: aggregate([value(m, key) for m in states]) for key, _ in cols}
        table[label][SELECTED] = selection_size([r for r, state in members if state == "recovered"])
    return list(groups), table, cols


SELECTED = "selected"  # the row's training data: mean trained tokens (templated, at the cutoff) and samples


def selection_size(runs: list[dict]) -> dict | None:
    """Mean selected samples and trained tokens over a row's runs (tokens: runs that record them)."""
    stats = [(r.get("selection") or {}).get("stats") or {} for r in runs]
    if not stats or any("selected" not in st for st in stats):
        return None
    tokens = [st["tokens"]["total"] for st in stats if "tokens" in st]
    return {"samples": float(np.mean([st["selected"] for st in stats])),
            "tokens": float(np.mean(tokens)) if len(tokens) == len(stats) else None}


def fmt_selected(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return (f"{cell['tokens']:,.0f} ({cell['samples']:,.0f})" if cell["tokens"] is not None
            else f"– ({cell['samples']:,.0f})")


def with_tokens(table) -> bool:
    """Whether to show the trained-tokens column: some run recorded its selection's tokens."""
    return any((c.get(SELECTED) or {}).get("tokens") is not None for c in table.values())


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
    tokens = with_tokens(table)
    headers = [h for _, h in cols] + (["Trained tokens (samples)"] if tokens else [])
    lines = ["| Method | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for key, _ in cols:
            text = fmt(table[row][key], key)
            mark = marks.get((row, key))
            cells.append(f"**{text}**" if mark == "best" else f"{text} †" if mark == "tie" else text)
        if tokens:
            cells.append(fmt_selected(table[row][SELECTED]))
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


# ------------------------------------------------------------------------------ paired statistics

PAIRED_REFERENCES = ("Random", "w/o recovery")
INTERVAL = ("95% interval: mean over the k seed pairs ± sqrt((t(k−1)·seed SE)² + (z·window/document bootstrap "
            "SE)²)")


@dataclass
class Stratum:
    """One set of paired units (the windows of a corpus, the documents of a task) for k seed pairs: per
    unit a numerator and a denominator of row A and of reference B, arrays [k, n]. The statistic of a state
    is ``f(Σ w·num / Σ w·den)`` for unit weights w: perplexity exp(Σ NLL / Σ tokens), accuracy (in percent)
    the mean. Every row of the arrays has the same n units, in the same order."""

    a_num: np.ndarray
    a_den: np.ndarray
    b_num: np.ndarray
    b_den: np.ndarray
    exp: bool

    def stat(self, w: np.ndarray) -> np.ndarray:
        """Difference A − B per weight row and seed pair: [C, k] for weights [C, n]."""
        def f(num, den):
            ratio = (w @ num.T) / (w @ den.T)
            return np.exp(ratio) if self.exp else ratio

        return f(self.a_num, self.a_den) - f(self.b_num, self.b_den)


def _pairs_2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[None] if x.ndim == 1 else x


def ppl_stratum(a_nll, a_tokens, b_nll, b_tokens) -> Stratum:
    """Perplexity units: per window the summed NLL (nats) and the scored tokens; [k, n] or [n] (k = 1)."""
    return Stratum(_pairs_2d(a_nll), _pairs_2d(a_tokens), _pairs_2d(b_nll), _pairs_2d(b_tokens), exp=True)


def acc_stratum(a, b) -> Stratum:
    """Accuracy units: per document 0/1 correctness, in percent; [k, n] or [n] (k = 1)."""
    a, b = 100 * _pairs_2d(a), 100 * _pairs_2d(b)
    return Stratum(a, np.ones_like(a), b, np.ones_like(b), exp=False)


def paired_interval(strata: list[Stratum], iters: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference A − B of the mean over strata (one stratum: that metric; several: e.g. the zero-shot mean
    over tasks) and its interval, from two sources of noise:

    - training (seeds): d_s, the difference of seed pair s on all units, varies with the seed; its mean's
      variance is s²/k over the k seed pairs;
    - evaluation (units): every seed is scored on the same windows/documents, so their sampling error does
      not average out over seeds; its variance, se_u², is that of the seed-mean difference over ``iters``
      bootstrap draws of the units (one draw shared by every seed pair, A and B on the same units).

    With k >= 2 the half-width combines both: sqrt((t·s/√k)² + (z·se_u)²), t with k − 1 degrees of freedom
    for the seeds (estimated from k values), z for the units (estimated from thousands of draws). Unlike a
    percentile bootstrap over 3 seed pairs, which is about their min–max, it widens as few seeds require;
    seeds that agree leave the evaluation noise alone. (A t on the summed variance with Welch–Satterthwaite
    degrees of freedom covered the truth in only ~85% of simulated 3-seed data sets.) With one seed pair only
    the evaluation noise can be estimated: the percentile interval of the unit bootstrap, labelled as such."""
    from scipy import stats

    k = strata[0].a_num.shape[0]
    if any(s.a_num.shape[0] != k or s.b_num.shape != s.a_num.shape for s in strata):
        raise ValueError("every stratum needs the same k seed pairs and the same units for A and B")
    rng = np.random.default_rng(seed)
    per_seed = np.mean([s.stat(np.ones((1, s.a_num.shape[1])))[0] for s in strata], axis=0)
    largest = max(s.a_num.shape[1] for s in strata)
    chunk = max(1, min(iters, 4_000_000 // max(largest, 1)))
    draws = []
    for start in range(0, iters, chunk):
        c = min(chunk, iters - start)
        diff = np.zeros((c, k))
        for s in strata:
            n = s.a_num.shape[1]
            idx = rng.integers(0, n, size=(c, n)) + (np.arange(c) * n)[:, None]
            w = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n).astype(np.float64)
            diff += s.stat(w) / len(strata)
        draws.append(diff.mean(axis=1))
    draws = np.concatenate(draws)
    mean, se_units = float(per_seed.mean()), float(draws.std(ddof=1))
    if k == 1:
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
        method, se_seeds, df = "units only (one seed pair)", None, None
    else:
        var_seeds, df = float(per_seed.var(ddof=1)) / k, k - 1
        half = math.hypot(float(stats.t.ppf((1 + level) / 2, df)) * math.sqrt(var_seeds),
                          float(stats.norm.ppf((1 + level) / 2)) * se_units)
        lo, hi = mean - half, mean + half
        method, se_seeds = "t over seed pairs + unit variance", math.sqrt(var_seeds)
    return {"diff": mean, "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0),
            "seeds": k, "per_seed": [float(d) for d in per_seed], "se_seeds": se_seeds, "se_units": se_units,
            "df": df, "method": method,
            "units": [int(s.a_num.shape[1]) for s in strata], "iters": iters, "level": level}


class PerSample:
    """The per-sample files of the runs (``<run>/per_sample/<state>_<kind>.npz``), each read once."""

    def __init__(self):
        self._files: dict[Path, dict | None] = {}

    def get(self, run: dict, state: str, kind: str) -> dict | None:
        path = Path(run["_path"]) / "per_sample" / f"{state}_{kind}.npz"
        if path not in self._files:
            if path.is_file():
                with np.load(path, allow_pickle=False) as z:
                    self._files[path] = {k: z[k] for k in z.files}
            else:
                self._files[path] = None
        return self._files[path]


def _units(files: PerSample, pairs: list[tuple[tuple[dict, str], tuple[dict, str]]], key: str) \
        -> list[Stratum] | None:
    """The strata of column ``key`` for these (A member, B member) pairs, units aligned across every state
    (documents by their index; windows must be the same), or None where a file or a unit set is missing."""
    kind, name = key.split("/")
    states = [m for pair in pairs for m in pair]
    if kind == "ppl":
        data = [files.get(r, state, "ppl") for r, state in states]
        if any(d is None or f"{name}/nll" not in d for d in data):
            return None
        tokens = [d[f"{name}/tokens"] for d in data]
        if any(t.shape != tokens[0].shape or (t != tokens[0]).any() for t in tokens):
            return None  # other windows (seq_len, max_windows): not paired
        if len({((r["metrics"][state].get("ppl") or {}).get(name) or {}).get("bos", "none") for r, state in states}) > 1:
            return None  # the same counts, other windows
        nll = np.array([d[f"{name}/nll"] for d in data])
        tok = np.array(tokens, dtype=np.float64)
        return [ppl_stratum(nll[0::2], tok[0::2], nll[1::2], tok[1::2])]
    zs_a = (pairs[0][0][0]["metrics"][pairs[0][0][1]].get("zeroshot") or {})
    tasks = list(zs_a.get("mean_over") or []) if name == "mean" else [name]
    if not tasks:
        return None
    data = [files.get(r, state, "zeroshot") for r, state in states]
    if any(d is None for d in data):
        return None
    strata = []
    for task in tasks:
        metric = ((zs_a.get("tasks") or {}).get(task) or {}).get("metric", "acc")
        if any(f"{task}/doc_id" not in d or f"{task}/{metric}" not in d for d in data):
            return None
        common = data[0][f"{task}/doc_id"]
        for d in data[1:]:
            common = np.intersect1d(common, d[f"{task}/doc_id"])
        if not len(common):
            return None
        x = np.array([d[f"{task}/{metric}"][np.searchsorted(d[f"{task}/doc_id"], common)] for d in data])
        strata.append(acc_stratum(x[0::2], x[1::2]))
    return strata


def _first_per_seed(members: list[tuple[dict, str]]) -> dict:
    out = {}
    for r, state in members:
        out.setdefault(r["seed"], (r, state))
    return out


def reference_pairs(groups: dict, row: str, reference: str) -> list | None:
    """(row member, reference member) per seed: against w/o recovery the same run's pruned model, against
    Random the Random run of the same seed (and the same varying knobs where the rows have them), against
    any other row that row's run of the same seed."""
    if row.startswith("w/o recovery") and reference == "w/o recovery":
        return None
    mine = _first_per_seed(groups[row])
    if reference == "w/o recovery":
        return [((r, state), (r, "pruned")) for r, state in mine.values()]
    if reference == "Random":
        extras = row.split(" (", 1)[1] if " (" in row else None
        ref = next((label for label in ([f"Random ({extras}"] if extras else []) + ["Random"] if label in groups),
                   None)
    else:
        ref = reference
    if ref is None or ref == row:
        return None
    theirs = _first_per_seed(groups[ref])
    pairs = [(mine[s], theirs[s]) for s in mine if s in theirs]
    return pairs or None


def paired_table(runs: list[dict], cols, iters: int = 2000, seed: int = 0, against: tuple[str, ...] = ()) -> dict:
    """{reference: {row: {column key: paired_interval result or None}}}; ``against``: extra reference rows."""
    groups, files = row_members(runs), PerSample()
    unknown = [label for label in against if label not in groups]
    if unknown:
        raise SystemExit(f"--against {unknown}: no such row; the rows are {sorted(groups)}")
    out = {}
    for reference in PAIRED_REFERENCES + tuple(against):
        out[reference] = {}
        for row in groups:
            pairs = reference_pairs(groups, row, reference)
            cells = {}
            for key, _ in cols:
                strata = _units(files, pairs, key) if pairs else None
                cells[key] = paired_interval(strata, iters, seed) if strata else None
                if cells[key]:
                    cells[key]["cross_host_pairs"] = sum(host_label(a[0]) != host_label(b[0]) for a, b in pairs)
            if any(cells.values()):
                out[reference][row] = cells
    return {ref: rows for ref, rows in out.items() if rows}


def fmt_paired(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return (f"{cell['diff']:+.2f} [{cell['lo']:+.2f}, {cell['hi']:+.2f}]" + ("*" if cell["significant"] else "")
            + ("¹" if cell["seeds"] == 1 else "") + (" ‡" if cell.get("cross_host_pairs") else ""))


def paired_markdown(paired: dict, cols) -> str:
    parts = []
    for reference, rows in paired.items():
        title = (f"Paired difference vs {reference} (row − {reference}; perplexity in ppl, accuracy in points; "
                 f"{INTERVAL}; * = the interval excludes 0; ¹ = one seed pair: evaluation noise only; ‡ = some "
                 "seed pairs come from different hosts, so the difference includes a host effect)")
        lines = [title, "",
                 "| Method | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
        for row, cells in rows.items():
            lines.append(f"| {row} | " + " | ".join(fmt_paired(cells.get(key)) for key, _ in cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


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
    for r, (_, label) in zip(runs, run_labels):
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
        for r, (method, _) in zip(runs, run_labels):
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
    counts = defaultdict(int)
    for r in runs:
        counts[host_label(r)] += 1
    hosts = ", ".join(f"{h} ({n} run{'s' * (n > 1)})" for h, n in sorted(counts.items()))
    if zs.get("subset"):
        subset_notes.append(f"zero-shot on {zs['limit']} {zs['limit_mode']} documents per task")
    pools = "; ".join(sorted({f"{r['selection']['pool_size']} samples of {r['selection']['pool_source']}"
                              for r in runs}))
    return (f"{len(runs)} runs; model {c['model']['name']}; pool {pools}; budget {', '.join(sorted({json.dumps(r['selection']['budget']) for r in runs}))}; "
            f"seeds {seeds}; hosts: {hosts}" + (f"; subsets: {', '.join(subset_notes)}" if subset_notes else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="sweep folders holding results.json files")
    ap.add_argument("--out", type=Path, help="output folder (default: the first sweep folder)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B run")
    ap.add_argument("--bootstrap-iters", type=int, default=2000, help="paired bootstrap iterations")
    ap.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the paired bootstrap")
    ap.add_argument("--against", action="append", default=[], metavar="ROW",
                    help="also pair every row against this row's run of the same seed (repeatable), "
                         "e.g. the full method in a stage ablation")
    args = ap.parse_args()
    runs = load_runs(args.folders)
    out = args.out or args.folders[0]
    out.mkdir(parents=True, exist_ok=True)
    rows, table, cols = build_rows(runs)
    marks = best_and_ties(table, cols)
    md = markdown(rows, table, cols, marks)
    note = ("Mean ± std over seeds. **Bold**: best (dense excluded). †: within two standard errors of the "
            "best (seed spread and lm-eval stderr combined), i.e. not distinguishable from it.")
    paired = paired_table(runs, cols, args.bootstrap_iters, args.bootstrap_seed, tuple(args.against))
    paired_md = paired_markdown(paired, cols) if paired else \
        "No paired statistics: the runs have no per_sample/ files (they predate them)."
    (out / "table.md").write_text(f"{describe(runs)}\n\n{md}\n\n{note}\n\n{paired_md}\n")
    (out / "table.tex").write_text(latex(rows, table, cols, marks) + "\n")
    (out / "table.json").write_text(json.dumps({"rows": rows, "cells": table, "paired": paired}, indent=1))
    plots = plot_all(runs, out)
    print(describe(runs), "\n")
    print(md, "\n\n" + note, "\n\n" + paired_md)
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
