"""Capability-level recovery (issue #14): does a selector recover the capabilities it gave budget to?

    python scripts/capability_recovery.py RUN_DIR [RUN_DIR ...] [--per-cluster 20] [--out DIR]

The capabilities are the S²RIC clusters of a PASER run among RUN_DIRs (the first one with
``paser_samples.npz``; ``--clusters DIR`` names another). Every run must share the pool and the pruned
model; their models come from the stage cache the runs wrote (``--cache-dir``, default the runs' own).

Per cluster, up to ``--per-cluster`` held-out samples (seeded; never trained on by any of the runs) are
scored with the divergence PASER's CDAIS uses, the mean token JSD to the dense model over the templated
sample, for the pruned model and each run's recovered model (as its recovery rebuilds it: LoRA's adapter
merged). The table gives per cluster its size, top concepts, how many samples each run trained on, the
mean JSD (± standard error) of every model and each run's *recovered share* 1 − JSD_recovered / JSD_pruned.
The summary relates, across clusters, the difference in budget between two runs to the difference in
recovered share (Spearman ρ), the paper's premise stated as a test: more budget to a capability should mean
more of it recovered.
Writes capability.md, capability.json and capability.png to --out (default: the first run's folder).

Nothing in a results.json is instantiated: each run's config is composed again from the registered config
groups (conf/), choosing per group the option that gives the run's components (its ``_target_`` and the
other keys Hydra's instantiate acts on), with the run's values on top. A run whose config names a component
no registered option gives is refused, and so is one that turns model.trust_remote_code on where its model
option does not (unless --trust-remote-code): either would run code the results.json chose.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT))

from paser.compose import compose
from scripts.make_tables import selector_name  # the selectors' names, as in the tables

INSTANTIATE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")  # what instantiate acts on


def _instantiate_keys(node, at: str = "") -> dict:
    """{dotted path: value} of every key below ``node`` that hydra.utils.instantiate acts on."""
    if isinstance(node, list):
        node = dict(enumerate(node))
    if not isinstance(node, dict):
        return {}
    out = {}
    for key, value in node.items():
        path = f"{at}.{key}" if at else str(key)
        out.update({path: value} if key in INSTANTIATE_KEYS else _instantiate_keys(value, path))
    return out


def _leaves(node, at: str = "") -> dict:
    """{dotted path: value} of every leaf below ``node``."""
    if isinstance(node, list):
        node = dict(enumerate(node))
    if not isinstance(node, dict) or not node:
        return {at: node}
    return {k: v for key, value in node.items() for k, v in _leaves(value, f"{at}.{key}" if at else str(key)).items()}


def _groups() -> list[str]:
    """The config groups config.yaml composes (paths, model, ...); an experiment's choices are in the values."""
    return [g for d in OmegaConf.load(CONF / "config.yaml").defaults if isinstance(d, DictConfig) for g in d
            if g != "experiment"]


@functools.cache
def _options(group: str) -> dict[str, dict]:
    """{option: its node as composed} for every registered option of a config group (conf/<group>/*.yaml)."""
    return {f.stem: OmegaConf.to_container(compose(config_name=f"{group}/{f.stem}")[group])
            for f in sorted((CONF / group).glob("*.yaml"))}


def _choice(group: str, node, where) -> str:
    """The registered option of ``group`` that gives the run's node: the same instantiate keys, and of those
    the one sharing the most values with it (the run's values are put on top anyway)."""
    wanted = _instantiate_keys(node)
    options = {name: opt for name, opt in _options(group).items() if _instantiate_keys(opt) == wanted}
    if not options:
        raise SystemExit(f"{where}: config.{group} names {wanted or 'no _target_'}, which no registered {group} "
                         f"option (conf/{group}/*.yaml) gives: refusing to build it (nothing in a results.json "
                         "is instantiated)")
    leaves = _leaves(node)
    return max(options, key=lambda name: sum(leaves.get(k, object()) == v for k, v in _leaves(options[name]).items()))


def run_config(results: dict, cache_dir: str | None, data_dir: str | None, where="results.json",
               trust_remote_code: bool = False) -> DictConfig:
    """The run's config, composed from the registered config groups (see the module's docstring) with the
    run's values on top (results.json keeps them resolved, so every path derived from a folder is moved with
    it: e.g. data.path under paths.data_dir)."""
    config = results["config"]
    moves = [(str(config["paths"][key]), value) for key, value in (("cache_dir", cache_dir), ("data_dir", data_dir))
             if value]

    def moved(v):
        if isinstance(v, dict):
            return {k: moved(x) for k, x in v.items()}
        if isinstance(v, list):
            return [moved(x) for x in v]
        for old, new in moves:
            if isinstance(v, str) and (v == old or v.startswith(old.rstrip("/") + "/")):
                return new + v[len(old):]
        return v

    config = moved(config)
    choices = {g: _choice(g, config[g], where) for g in _groups() if g in config}
    cfg = compose([f"{g}={option}" for g, option in choices.items()])
    given, registered = _instantiate_keys(config), _instantiate_keys(OmegaConf.to_container(cfg))
    odd = sorted(k for k in given if given[k] != registered.get(k, ...))
    if odd:  # outside the groups, e.g. a top-level key the run added
        raise SystemExit(f"{where}: config has {', '.join(f'{k}={given[k]!r}' for k in odd)} where the "
                         f"registered options ({', '.join(f'{g}={o}' for g, o in choices.items())}) give otherwise: "
                         "refusing to build it (nothing in a results.json is instantiated)")
    remote = (config.get("model") or {}).get("trust_remote_code")
    if remote is True and cfg.model.get("trust_remote_code") is not True and not trust_remote_code:
        raise SystemExit(f"{where}: model.trust_remote_code=true, which its model option ({choices['model']}) does "
                         "not set: loading the model would run the Python in its folder. Pass --trust-remote-code "
                         "if you trust that run")
    OmegaConf.set_struct(cfg, False)  # a run may have added keys (+key=value)
    return OmegaConf.merge(cfg, config)


def load_runs(run_dirs: list[Path], cache_dir: str | None, data_dir: str | None,
              trust_remote_code: bool = False) -> list[dict]:
    from paser.pipeline import Keys, build_components

    runs = []
    for d in run_dirs:
        if not (d / "results.json").is_file():
            raise SystemExit(f"{d}: no results.json (not a finished run folder)")
        results = json.loads((d / "results.json").read_text())
        cfg = run_config(results, cache_dir, data_dir, d / "results.json", trust_remote_code)
        parts = build_components(cfg)
        runs.append({"dir": d, "cfg": cfg, "parts": parts, "keys": Keys.build(cfg, parts), "results": results,
                     "label": f"{selector_name(cfg.selector._target_)} "
                              f"seed {cfg.seed}",
                     "selected": np.array(json.loads((d / "selected_indices.json").read_text()), dtype=int)})
    first = runs[0]
    for r in runs[1:]:
        if r["parts"].pool.fingerprint != first["parts"].pool.fingerprint:
            raise SystemExit(f"{r['dir']} has another pool than {first['dir']}: compare runs on one pool")
        if r["keys"].pruned != first["keys"].pruned:
            raise SystemExit(f"{r['dir']} recovers another pruned model than {first['dir']}")
    return runs


def heldout(labels: np.ndarray, trained: set[int], per_cluster: int, seed: int) -> dict[int, np.ndarray]:
    """Per cluster, up to ``per_cluster`` of its samples that no run trained on (a seeded draw, sorted)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(labels):
        members = np.array([i for i in np.flatnonzero(labels == c) if i not in trained], dtype=int)
        take = min(per_cluster, len(members))
        out[int(c)] = np.sort(rng.choice(members, take, replace=False)) if take else members
    return out


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (results.json, selected_indices.json)")
    ap.add_argument("--clusters", type=Path, help="the PASER run whose clusters define the capabilities")
    ap.add_argument("--per-cluster", type=int, default=20, help="held-out samples per cluster")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    ap.add_argument("--cache-dir", help="the stage cache the runs wrote (default: their paths.cache_dir)")
    ap.add_argument("--data-dir", help="the offline data (default: the runs' paths.data_dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="accept runs that set model.trust_remote_code=true where their model option does not")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from paser.cache import StageCache
    from paser.data import encode_pool
    from paser.models import load_model, load_saved
    from paser.selectors.paser.divergence import divergences_to, make_divergence, span_bounds

    runs = load_runs(args.runs, args.cache_dir, args.data_dir, args.trust_remote_code)
    source = args.clusters or next((r["dir"] for r in runs if (r["dir"] / "paser_samples.npz").is_file()), None)
    if source is None:
        raise SystemExit("no run folder has paser_samples.npz: pass a PASER run (or --clusters DIR)")
    labels = np.load(source / "paser_samples.npz", allow_pickle=False)["labels"]
    first = runs[0]
    pool, cfg = first["parts"].pool, first["cfg"]
    if len(labels) != len(pool):
        raise SystemExit(f"{source} clustered {len(labels)} samples, the runs' pool has {len(pool)}")
    concepts = {c["cluster"]: c.get("top_concepts") or [] for c in
                json.loads((source / "results.json").read_text())["selection"]["diagnostics"].get("clusters", [])}
    held = heldout(labels, {int(i) for r in runs for i in r["selected"]}, args.per_cluster, args.seed)
    order = np.concatenate([held[c] for c in sorted(held)])

    cache, device = StageCache(cfg.paths.cache_dir), torch.device(args.device)
    dense, tok = load_model(cfg.model, cache, device)
    enc = encode_pool(tok, [pool.rows[i] for i in order], cfg.scoring.cutoff)
    seqs = [e.input_ids for e in enc]
    bounds = span_bounds([len(s) for s in seqs], [e.prompt_len for e in enc], "full")  # PASER's default span

    def scores(compared: dict) -> dict[str, np.ndarray]:
        """Each model's JSD to the dense one; the dense forward runs once per batch for all of them."""
        with torch.inference_mode():
            rows = divergences_to(dense, list(compared.values()), seqs, bounds, make_divergence("jsd"), "mean",
                                  cfg.scoring.batch_size, tok.pad_token_id or 0)
        return dict(zip(compared, rows))

    pruned_entry = cache.lookup("pruned", first["keys"].pruned)
    if pruned_entry is None:
        raise SystemExit(f"the pruned model of {first['dir']} is not in the cache {cfg.paths.cache_dir} "
                         "(rerun the run with the same config, or pass --cache-dir)")

    def pruned():
        return load_saved(pruned_entry / "model", dtype=cfg.model.dtype,
                          trust_remote_code=cfg.model.get("trust_remote_code", False), device=device)[0]

    compared = {"pruned": pruned()}  # every compared model is held in memory at once (small models)
    for r in runs:
        entry = cache.lookup("adapter", r["keys"].adapter)
        if entry is None:
            raise SystemExit(f"the adapter of {r['dir']} is not in the cache {cfg.paths.cache_dir} (or the code "
                             "changed since the run, which changes its key): rerun it, or pass --cache-dir")
        compared[r["label"]] = r["parts"].recovery.load(pruned(), entry / "adapter")  # its own artifact
    models = scores(compared)

    ends = np.cumsum([len(held[c]) for c in sorted(held)])  # ``order`` lists the clusters' samples in turn
    at = {c: slice(int(end - len(held[c])), int(end)) for c, end in zip(sorted(held), ends)}
    rows = []
    for c in sorted(held):
        row = {"cluster": c, "size": int((labels == c).sum()), "top_concepts": concepts.get(c, []),
               "heldout": len(held[c]),
               "trained": {r["label"]: int((labels[r["selected"]] == c).sum()) for r in runs}}
        for name, s in models.items():
            v = s[at[c]]
            row[f"jsd {name}"] = (float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
        base = row["jsd pruned"][0]
        row["recovered share"] = {r["label"]: 1 - row[f"jsd {r['label']}"][0] / base for r in runs}
        rows.append(row)

    labels_ = [r["label"] for r in runs]
    pairs = []
    for i, a in enumerate(labels_):
        for b in labels_[i + 1:]:
            budget = [row["trained"][a] - row["trained"][b] for row in rows]
            gain = [row["recovered share"][a] - row["recovered share"][b] for row in rows]
            pairs.append({"a": a, "b": b, "spearman_budget_vs_recovery": spearman(budget, gain),
                          "mean_recovered_share_difference": float(np.mean(gain))})

    out = args.out or runs[0]["dir"]
    out.mkdir(parents=True, exist_ok=True)
    header = ["cluster", "size", "top concepts", "held out",
              *[f"trained: {n}" for n in labels_], "JSD pruned", *[f"JSD {n}" for n in labels_],
              *[f"recovered share: {n}" for n in labels_]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["cluster"]), str(row["size"]), ", ".join(row["top_concepts"]),
                                        str(row["heldout"]), *[str(row["trained"][n]) for n in labels_],
                                        *[f"{row[f'jsd {n}'][0]:.4f} ± {row[f'jsd {n}'][1]:.4f}"
                                          for n in ["pruned", *labels_]],
                                        *[f"{row['recovered share'][n]:.1%}" for n in labels_]]) + " |")
    summary = [f"- {p['a']} − {p['b']}: mean recovered share difference {p['mean_recovered_share_difference']:+.1%} "
               f"over clusters; Spearman ρ(budget difference, recovered-share difference) = "
               f"{p['spearman_budget_vs_recovery']:+.2f} over {len(rows)} clusters" for p in pairs]
    md = (f"Capabilities: the {len(rows)} S²RIC clusters of {source}; up to {args.per_cluster} held-out samples "
          f"each (seed {args.seed}), mean token JSD to the dense model over the templated sample.\n\n"
          + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n")
    (out / "capability.md").write_text(md)
    (out / "capability.json").write_text(json.dumps({"clusters_from": str(source), "rows": rows, "pairs": pairs,
                                                     "heldout": {str(c): held[c].tolist() for c in held}}, indent=1))
    plot(rows, labels_, out / "capability.png")
    print(md)
    return 0


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    """Per cluster: the pruned model's JSD and each recovered model's (bars), clusters in size order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 4))
    for i, name in enumerate(["pruned", *names]):
        means = [r[f"jsd {name}"][0] for r in rows]
        errs = [r[f"jsd {name}"][1] for r in rows]
        ax.bar(x + i * width, means, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks(x + width * len(names) / 2)
    ax.set_xticklabels([f"{r['cluster']}\n{', '.join(r['top_concepts'][:2])}" for r in rows], fontsize=7)
    ax.set_ylabel("mean token JSD to the dense model")
    ax.set_title("Held-out JSD per S²RIC cluster")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
