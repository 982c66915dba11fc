"""Selection time of every selector on an Alpaca pool with SmolLM2-135M and a pruned copy.

    python scripts/bench_selectors.py                       # 5,000 samples, budget 10%, cold cache
    python scripts/bench_selectors.py --n 1000 --selectors random,ifd,instruction_mining

Each selector runs on a cold score cache (a fresh folder under .cache/), except the shared sentence
embeddings, which are computed once and timed on their own row. Every hybrid costs its baseline's scoring
plus the same S²RIC clustering and per-cluster ranking: instruction_mining+s2ric is timed after
instruction_mining (its scores cached), and the other hybrids' rows are derived from it ("cold" adds the
baseline's scoring time).

IFD and PASER cost a fixed number of forward passes per sample: ``--score-subset K`` times them on the
first K samples and extrapolates linearly (for slow or shared machines); the table marks such rows.

Nuggets at full scale is |pool| x 100 anchor passes, hours on a CPU: it is measured on the first
``--nuggets-candidates`` candidates (with the real 100 k-means anchors of the whole pool; ``--anchors``) and
extrapolated linearly to the pool, once with those anchors and once in the cheap mode (``--cheap-anchors``
anchors, ``--cheap-prefilter`` candidates). The table says which rows are extrapolated.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.budget import Budget, resolve_budget
from paser.cache import StageCache
from paser.components import SelectionContext
from paser.compose import compose
from paser.data import Pool, load_pool
from paser.embedding import embed_pool, load_embedder
from paser.models import load_model
from paser.pruners.magnitude import MagnitudePruner

log = logging.getLogger("bench_selectors")
DEFAULT_POOL = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data.jsonl"
ALL = "random,instruction_mining,instruction_mining+s2ric,ifd,nuggets,paser"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default=str(DEFAULT_POOL), help="Alpaca-format JSONL (default: ../shared/data)")
    p.add_argument("--n", type=int, default=5000, help="seeded subsample of the pool")
    p.add_argument("--budget", type=float, default=0.1, help="count or fraction of the pool")
    p.add_argument("--selectors", default=ALL, help=f"comma-separated, from: {ALL}")
    p.add_argument("--model", default="smollm2-135m", help="conf/model name (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.5, help="magnitude pruning of the 'pruned' copy")
    p.add_argument("--score-subset", type=int, default=5000,
                   help="time IFD and PASER on the first K samples and extrapolate to the pool (default: all)")
    p.add_argument("--nuggets-candidates", type=int, default=6, help="candidates timed for Nuggets")
    p.add_argument("--anchors", type=int, default=100, help="Nuggets' k-means anchors (its reference: 100)")
    p.add_argument("--cheap-anchors", type=int, default=20)
    p.add_argument("--cheap-prefilter", type=int, default=1000)
    p.add_argument("--cache-dir", default=None, help="score cache (default: a fresh folder, i.e. cold)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args()


def make_ctx(cache, tok, original, pruned, embedder, model: str, seed=0, pool_key="bench"):
    return SelectionContext(
        tokenizer=tok, original_model=lambda: original, pruned_model=lambda: pruned, embedder=lambda: embedder,
        embedder_name="all-MiniLM-L6-v2", cache=cache, seed=seed, cutoff=256,
        batch_size=8, cache_key={"model": model, "pruner": "magnitude-bench", "pool": pool_key})


def selector_from_config(name: str, **overrides):
    """conf/selector/<name>.yaml as a run composes it (its defaults list included), with ``overrides``."""
    import hydra.utils

    cfg = compose([f"selector={name}", *(f"selector.{k}={v}" for k, v in overrides.items())])
    return hydra.utils.instantiate(cfg.selector, _convert_="all")


def time_nuggets(pool, ctx, args, n_anchors: int) -> float:
    """Seconds per candidate for golden scores against ``n_anchors`` k-means anchors of the whole pool."""
    from paser.selectors import nuggets

    anchor_idx, _ = nuggets.kmeans_anchors(embed_pool(ctx, pool.rows), n_anchors, ctx.seed)
    anchors = nuggets.AnchorSet(ctx.tokenizer, pool.subset(anchor_idx), ctx.cutoff, "alpaca")
    zero = anchors.zero_shot(ctx.pruned_model, ctx.batch_size)
    rows = pool.rows[:args.nuggets_candidates]
    t = time.perf_counter()
    nuggets.golden_scores(ctx.pruned_model, ctx.tokenizer, rows, anchors, zero, ctx.cutoff, "alpaca",
                          ctx.batch_size)
    return (time.perf_counter() - t) / len(rows)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [s.strip() for s in args.selectors.split(",") if s.strip()]
    cache_root = Path(args.cache_dir) if args.cache_dir else \
        Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / ".cache"))
    cache = StageCache(cache_root)
    model_cache = StageCache(ROOT / ".cache" / "paser")

    t = time.perf_counter()
    pool = load_pool(args.pool, subsample=args.n, seed=0)
    budget = resolve_budget(args.budget if args.budget <= 1 else int(args.budget), len(pool))
    original, tok = load_model(compose([f"model={args.model}"]).model, model_cache)
    pruned = copy.deepcopy(original)
    MagnitudePruner(sparsity=args.sparsity).prune(pruned)
    embedder = load_embedder()
    log.info("setup (pool, models, pruning, embedder) %.1f s", time.perf_counter() - t)
    rows: list[dict] = []

    def add(selector, seconds, note="", cold=None):
        rows.append({"selector": selector, "seconds": round(seconds, 1), "cold_seconds": round(cold, 1)
                     if cold is not None else None, "note": note})
        log.info("%-28s %8.1f s  %s", selector, seconds, note)

    ctx = make_ctx(cache, tok, original, pruned, embedder, args.model, pool_key=pool.fingerprint)
    t = time.perf_counter()
    embed_pool(ctx, pool.rows)
    add("(embeddings, shared)", time.perf_counter() - t, "MiniLM over the instructions; cached per pool")

    scoring_time = {}
    for name in names:
        base, _, hybrid = name.partition("+")
        if base == "nuggets":
            per_full = time_nuggets(pool, ctx, args, args.anchors)
            per_cheap = time_nuggets(pool, ctx, args, args.cheap_anchors)
            scoring_time["nuggets"] = per_full * len(pool)
            add("nuggets", per_full * len(pool),
                f"EXTRAPOLATED: {per_full:.2f} s/candidate x {len(pool)} (timed on {args.nuggets_candidates})")
            add(f"nuggets (cheap: {args.cheap_anchors} anchors, prefilter {args.cheap_prefilter})",
                per_cheap * args.cheap_prefilter,
                f"EXTRAPOLATED: {per_cheap:.2f} s/candidate x {args.cheap_prefilter}")
            continue
        if hybrid and base != "instruction_mining":
            raise SystemExit("only instruction_mining+s2ric is timed: every hybrid costs its baseline's "
                             "scoring plus the same clustering, and the table derives the others")
        if base not in ("random", "ifd", "instruction_mining", "paser"):
            raise SystemExit(f"unknown selector '{name}'; allowed: {ALL}")
        sel = selector_from_config(base, **({"cluster": "s2ric"} if hybrid else {}))
        subset = base in ("ifd", "paser") and args.score_subset < len(pool)
        run_pool = Pool(rows=pool.rows[:args.score_subset], source="bench subset",
                        fingerprint=f"{pool.fingerprint}-first{args.score_subset}") if subset else pool
        run_budget = max(1, round(budget * len(run_pool) / len(pool)))
        t = time.perf_counter()
        selection = sel.select(run_pool, Budget.samples(run_budget),
                               make_ctx(cache, tok, original, pruned, embedder, args.model,
                                        pool_key=run_pool.fingerprint))
        seconds = time.perf_counter() - t
        assert len(selection.indices) <= run_budget
        if subset:
            note = (f"EXTRAPOLATED: {seconds / len(run_pool):.2f} s/sample x {len(pool)} "
                    f"(timed on the first {len(run_pool)})")
            seconds *= len(pool) / len(run_pool)
        else:
            note = {"random": "", "instruction_mining": "offline: reward model skipped; rule = Len + Knn6",
                    }.get(base, "")
        if base == "paser":
            note = "JSD original vs pruned + S²RIC + CCG; " + note
        if base == "ifd":
            note = "2 forward passes per sample (pruned model); " + note
        if hybrid:
            note = "S²RIC clustering (auto K) + per-cluster ranking; Instruction Mining scores cached"
            scoring_time["clustering"] = seconds
        else:
            scoring_time[base] = seconds
        add(name, seconds, note, seconds + scoring_time[base] if hybrid else None)
    if "clustering" in scoring_time:
        for base in ("ifd", "nuggets"):
            if base in scoring_time:
                add(f"{base}+s2ric", scoring_time["clustering"], "DERIVED: the clustering row; scores cached",
                    scoring_time["clustering"] + scoring_time[base])

    print(f"\npool: {len(pool)} samples of {Path(args.pool).name}; budget {budget}; {args.model} bf16; pruned copy: "
          f"magnitude {args.sparsity}; {torch.get_num_threads()} torch threads; {os.cpu_count()} CPUs; "
          f"{platform.processor() or platform.machine()}; cache {cache_root}")
    print("\n| selector | selection time (s) | cold, incl. baseline scoring (s) | note |\n|---|---|---|---|")
    for r in rows:
        cold = "" if r["cold_seconds"] is None else r["cold_seconds"]
        print(f"| {r['selector']} | {r['seconds']} | {cold} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pool": len(pool), "budget": budget,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
