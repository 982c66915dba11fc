"""Benchmark PASER's selection stages on the full Alpaca pool (52,002 samples) on this machine.

    python scripts/bench_paser.py [--data ../shared/data/alpaca/alpaca_data.jsonl] [--jsd-subset 384]
    python scripts/bench_paser.py --scale 52002,520000
    python scripts/bench_paser.py --scale 2580000        # LaMini's size (replicated embeddings, see below)
    python scripts/bench_paser.py --compare 50000        # landmark vs exact diffusion map on real embeddings
    python scripts/bench_paser.py --memory 2580000       # host memory of the pool, its tokens, its embeddings

Stages and what is measured:
  embeddings   MiniLM embeddings of the whole pool (read from the stage cache when present)
  clustering   S²RIC on the whole pool: kNN graph, diffusion map, NMF with the auto-K elbow
  jsd          per-sample JSD (original vs 50% magnitude-pruned SmolLM2-135M, or --model; bf16) on a fixed random
               subset, against two bare batched forward passes over the same batches; the full-pool time
               is extrapolated as the subset's time per sample x the pool size
  ccg          the NTM walk (RAKE concepts + Concept Consistency Graph) over the whole pool's clusters with
               a 20% budget, and once with every sample walked (budget = pool). The ranking key is a seeded
               random stand-in for the IES, since the full-pool JSD is not computed here.
  --scale N,.. (instead of the stages) S²RIC on N samples for each N: the pool's real MiniLM embeddings,
               past the pool size replicated with Gaussian noise (see ``scaled_embeddings``); prints the
               kNN index, its measured recall@k, and the time and peak memory of kNN, diffusion map and NMF,
               and of the NTM walk (concept graph) over the N rows (the pool's rows repeated; random
               stand-in for the IES) at a 4% budget (LaMini's) and, with --ccg-all, over every row.
  --compare N  S²RIC on the first N real embeddings by the exact diffusion map (seeds 0 and 1, and k·N/m
               neighbours: the scale of a landmark graph) and by the landmark one (--landmarks m,..), with K
               auto and fixed (--compare-k): adjusted Rand index of the clusterings, and the share of one
               selection in another (the NTM walk at a 20% budget, random stand-in for the IES, CDS
               allocation), with a floor: the exact labels shuffled.
  --memory N   resident memory of the pool's rows (N distinct rows: the pool's rows repeated, each string
               copied), their encoding (encode_pool, SmolLM2's tokenizer, cutoff 256) and N x 384 float32
               embeddings; the encoding as Python lists of ints (before #33) on N/10 rows, for comparison.
Each stage prints its wall time, the CPU time of this process during it (on a shared core wall time also
counts other processes' turns), and the peak resident memory of the process during the stage (sampled every
20 ms) and its increase over the start of the stage.
"""

from __future__ import annotations

import argparse
import copy
import gc
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from paser.cache import StageCache
from paser.components import SelectionContext
from paser.compose import compose
from paser.data import encode_pool, load_pool
from paser.embedding import embed_pool, load_embedder
from paser.models import load_model, load_tokenizer
from paser.pruners.magnitude import MagnitudePruner
from paser.scoring import iter_batches
from paser.selectors.paser.allocation import allocate_budget
from paser.selectors.paser.clustering import cluster_embeddings, faiss_exact
from paser.selectors.paser.divergence import jsd, sample_divergences, span_bounds
from paser.selectors.paser.selector import ntm_walk

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple] = []


class PeakRSS:
    """Peak resident memory (GiB) of this process while the block runs."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_gib, self.delta_gib = self.peak / 2**30, (self.peak - self.start) / 2**30


def report(stage: str, m: PeakRSS, note: str = "") -> None:
    ROWS.append((stage, m.seconds, m.cpu, m.peak_gib, m.delta_gib, note))
    print(f"{stage:<34} {m.seconds:9.1f} s (CPU {m.cpu:8.1f} s)   peak RSS {m.peak_gib:5.2f} GiB "
          f"(+{m.delta_gib:4.2f})   {note}", flush=True)


def bare_forwards(models, seqs, batch_size, pad_id) -> None:
    with torch.inference_mode():
        for _, ids, mask in iter_batches(seqs, batch_size, pad_id, desc="bare forward x2"):
            for m in models:
                m(input_ids=ids, attention_mask=mask, use_cache=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/alpaca/alpaca_data.jsonl")
    ap.add_argument("--cache", default=".cache/paser")
    ap.add_argument("--model", default="smollm2-135m", help="conf/model name for the JSD stage (default: %(default)s)")
    ap.add_argument("--jsd-subset", type=int, default=512, help="samples for the JSD / forward timing")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (the fastest counts: shared machine)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="cluster,jsd,ccg", help="comma list: cluster, jsd, ccg (needs cluster)")
    ap.add_argument("--scale", default=None, help="comma list of pool sizes to cluster (replaces --stages)")
    ap.add_argument("--ccg-all", action="store_true", help="with --scale: also walk every row through the CCG")
    ap.add_argument("--compare", type=int, default=None, help="landmark vs exact S²RIC on this many real rows")
    ap.add_argument("--landmarks", default="10000,20000", help="with --compare: landmark counts")
    ap.add_argument("--compare-k", default="auto,13", help="with --compare: K of each comparison (auto or an int)")
    ap.add_argument("--memory", type=int, default=None, help="host memory of a pool of this many rows")
    ap.add_argument("--embeddings", default=None, help="a .npy of the pool's embeddings (e.g. the scores.npy of "
                    "an 'embeddings' stage-cache entry) instead of embed_pool, whose cache key changes with its code")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    torch.manual_seed(args.seed)
    cache = StageCache(args.cache)
    print(f"torch threads: {torch.get_num_threads()}, cpus: {psutil.cpu_count()}, "
          f"load average: {psutil.getloadavg()}", flush=True)

    with PeakRSS() as m:
        pool = load_pool(args.data)
    report("load pool", m, f"{len(pool)} samples")
    ctx = SelectionContext(tokenizer=None, original_model=None, pruned_model=None, embedder=load_embedder,
                           embedder_name="all-MiniLM-L6-v2", cache=cache, cache_key={"pool": pool.fingerprint},
                           seed=args.seed)
    if args.memory:
        bench_memory(pool, args.memory, cache)
        stages = set()
    if "cluster" in stages or args.scale or args.compare:
        with PeakRSS() as m:
            emb = np.load(args.embeddings) if args.embeddings else embed_pool(ctx, pool.rows)
        if len(emb) != len(pool):
            raise SystemExit(f"{args.embeddings}: {len(emb)} rows for a pool of {len(pool)}")
        report("embeddings (MiniLM, cached?)", m, f"{emb.shape}{' from ' + args.embeddings if args.embeddings else ''}")
    if args.scale:
        for n in map(int, args.scale.split(",")):
            bench_scale(emb, pool.rows, n, args.seed, args.ccg_all)
        stages = set()
    if args.compare:
        for k in args.compare_k.split(","):
            bench_compare(emb, pool.rows, args.compare, [int(m) for m in args.landmarks.split(",")], args.seed,
                          k if k == "auto" else int(k))
        stages = set()
    if "cluster" in stages:
        with PeakRSS() as m:
            labels, cdiag = cluster_embeddings(emb, seed=args.seed)
        report("clustering (S2RIC, auto K)", m,
               f"K={cdiag['n_clusters']} t={cdiag['diffusion_time']} knn {cdiag['time_knn_s']} s, eigen "
               f"{cdiag['time_eigen_s']} s, NMF {cdiag['time_nmf_s']} s; sizes {cdiag['cluster_sizes']}")
        if "ccg" in stages:
            bench_ccg(pool.rows, labels, args.seed, [(f"ccg ({args.budget:.0%} budget)", int(args.budget * len(pool))),
                                                     ("ccg (all samples)", len(pool))])
    if "jsd" in stages:
        bench_jsd(pool, cache, args)
    print_table()


def scaled_embeddings(emb: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, str]:
    """n rows: the real embeddings, then noisy copies of them (renormalised) until there are n, and a note.

    Noise per dimension σ = (median distance to the 10th nearest neighbour, on 2,000 seeded rows) / √(2d):
    two copies of a sample then lie about one median 10-NN distance apart, so a copy's neighbours are a
    mix of its siblings and of copies of the sample's real neighbours, as in a denser pool.
    """
    if n <= len(emb):
        return emb[:n], f"the first {n} real embeddings"
    rng = np.random.default_rng(seed)
    probe = np.sort(rng.choice(len(emb), 2000, replace=False))
    sigma = float(np.median(faiss_exact(emb, probe, 10)[1][:, -1])) / np.sqrt(2 * emb.shape[1])
    out = np.empty((n, emb.shape[1]), dtype=np.float32)  # filled in place: no second copy at 2.58M rows
    out[:len(emb)] = emb
    for have in range(len(emb), n, len(emb)):
        take = min(len(emb), n - have)
        y = emb[:take] + rng.normal(0.0, sigma, (take, emb.shape[1])).astype(np.float32)
        out[have:have + take] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return out, (f"{len(emb)} real embeddings + {n - len(emb)} noisy copies "
                 f"(Gaussian σ = {sigma:.4f} per dimension, renormalised)")


def clustering_note(d: dict) -> str:
    """The clustering diagnostics a benchmark row states: path, kNN, eigensolver, extension, NMF, K."""
    path = (f"landmarks {d['landmarks']} (extension recall@{d['n_neighbors']} {d['extension_knn_recall']}, "
            f"beyond reach {d['extension_far_share']}; extend {d['time_extend_s']} s)"
            if d.get("diffusion_map") == "landmarks_nystrom" else
            f"exact, kNN {d['knn_index']} (recall@{d['n_neighbors']} {d.get('knn_recall', 'exact')})")
    return (f"{path}; kNN {d['time_knn_s']} s, eigen {d['time_eigen_s']} s ({d['eigen_solver']}, "
            f"{d['eigen_iterations']} it., max residual {d['eigen_residual_max']:.2g}, converged "
            f"{d['eigen_converged']}), NMF {d['time_nmf_s']} s; K={d['n_clusters']} t={d['diffusion_time']}")


def bench_scale(emb: np.ndarray, rows: list[dict], n: int, seed: int, ccg_all: bool) -> None:
    """S²RIC (auto K) on n samples: its path, stage times, peak memory; then the NTM walk over n rows."""
    x, note = scaled_embeddings(emb, n, seed)
    print(f"scale {n}: {note}", flush=True)
    with PeakRSS() as m:
        labels, d = cluster_embeddings(x, seed=seed)
    report(f"clustering {n} samples", m, clustering_note(d))
    del x
    gc.collect()
    big = [rows[i % len(rows)] for i in range(n)]  # references: the walk reads each row's text
    bench_ccg(big, labels, seed, [("ccg (4% budget)", int(0.04 * n))] + ([("ccg (all samples)", n)] if ccg_all else []))


def bench_compare(emb: np.ndarray, rows: list[dict], n: int, landmarks: list[int], seed: int, k) -> None:
    """The landmark diffusion map against the exact one on the first n real embeddings, K auto or fixed.

    A landmark graph with k neighbours among m landmarks has the scale of an exact graph with k·n/m
    neighbours, so each landmark run is also set against the exact path at that k ("matched scale"): that
    comparison is the Nyström approximation's own error, the one against k = 10 adds the coarser scale."""
    from sklearn.metrics import adjusted_rand_score

    x, rows = emb[:n], rows[:n]
    base = {"seed": seed, "n_clusters": k, "n_neighbors": 10}
    configs = [("exact seed 0", {"landmarks_above": None}), ("exact seed 1", {"landmarks_above": None, "seed": seed + 1})]
    for m in landmarks:
        configs += [(f"exact k={10 * n // m}", {"landmarks_above": None, "n_neighbors": 10 * n // m}),
                    (f"landmarks {m}", {"landmarks_above": 0, "landmarks": m})]
    runs = {}
    for name, knobs in configs:
        with PeakRSS() as m:
            runs[name], d = cluster_embeddings(x, **{**base, **knobs})
        report(f"{name} ({n} rows, K {k})", m, clustering_note(d))
    ref = runs["exact seed 0"]
    runs["exact labels shuffled"] = np.random.default_rng(seed).permutation(ref)
    key = np.random.default_rng(seed).random(n)
    chosen = {name: set(ntm_select(rows, labels, key, int(0.2 * n))) for name, labels in runs.items()}

    def overlap(a: str, b: str) -> float:
        return len(chosen[a] & chosen[b]) / len(chosen[a])

    print(f"\n| first {n} rows, K {k} | K | ARI vs exact seed 0 | vs exact at matched scale | selection overlap "
          f"(20%) vs exact seed 0 | vs matched |\n|---|---|---|---|---|---|")
    for name, labels in runs.items():
        matched = f"exact k={10 * n // int(name.split()[1])}" if name.startswith("landmarks") else None
        vs = f"{adjusted_rand_score(runs[matched], labels):.3f}" if matched else ""
        ov = f"{overlap(matched, name):.3f}" if matched else ""
        print(f"| {name} | {int(labels.max()) + 1} | {adjusted_rand_score(ref, labels):.3f} | {vs} | "
              f"{overlap('exact seed 0', name):.3f} | {ov} |", flush=True)


def ntm_select(rows, labels, key, budget) -> list[int]:
    """PASER's walk with key as the IES: CDS = mean key per cluster, budget split by CDS, CCG on."""
    k = int(labels.max()) + 1
    cds = np.bincount(labels, weights=key, minlength=k) / np.bincount(labels, minlength=k)
    n_k = allocate_budget(cds, np.bincount(labels, minlength=k), budget, redistribute=True)
    return ntm_walk(rows, labels, key, n_k, range(k))["selected"]


def bench_memory(pool, n: int, cache) -> None:
    """Resident memory of n distinct rows, their token ids (TokenIds, and Python lists on n/10) and embeddings."""
    from paser.data import EncodedSample

    tok = load_tokenizer(compose(["model=smollm2-135m"]).model, cache)
    gc.collect()
    with PeakRSS() as m:  # each string a new object, as rows read from a file are
        rows = [{k: (v + " ")[:-1] for k, v in pool.rows[i % len(pool)].items()} for i in range(n)]
    report(f"pool rows ({n})", m, f"{m.delta_gib * 2**30 / n:.0f} B per row")
    with PeakRSS() as m:
        enc = encode_pool(tok, rows, 256)
    tokens = sum(len(e.input_ids) for e in enc)
    report(f"encode_pool ({n}, cutoff 256)", m, f"{tokens} tokens; {m.delta_gib * 2**30 / n:.0f} B per sample, "
           f"{m.delta_gib * 2**30 / tokens:.1f} B per token")
    tenth = enc[:n // 10]
    gc.collect()
    with PeakRSS() as m:
        lists = [EncodedSample(list(e.input_ids), e.prompt_len, e.truncated) for e in tenth]
    t10 = sum(len(e.input_ids) for e in lists)
    report(f"as lists of ints ({len(lists)})", m, f"{m.delta_gib * 2**30 / t10:.1f} B per token (the former "
           f"encoding); x{n / len(lists):.0f}: {m.delta_gib * n / len(lists):.2f} GiB")
    del lists, tenth
    with PeakRSS() as m:
        emb = np.ones((n, 384), dtype=np.float32)
    report(f"embeddings ({n} x 384 float32)", m, f"{emb.nbytes / 2**30:.2f} GiB")


def bench_jsd(pool, cache, args) -> None:
    """JSD vs two bare forward passes, on a fixed random subset; extrapolated to the pool."""
    with PeakRSS() as m:
        model, tok = load_model(compose([f"model={args.model}"]).model, cache)
        pruned = copy.deepcopy(model)
        MagnitudePruner(0.5).prune(pruned)
    report(f"load {args.model} + magnitude 50%", m)
    # only the subset is tokenised (tokenising all 52K takes minutes here); a uniform random subset makes
    # time per sample x pool size an unbiased estimate of the full-pool time
    sub = np.random.default_rng(args.seed).choice(len(pool), size=args.jsd_subset, replace=False)
    enc = encode_pool(tok, pool.subset(sub), args.cutoff)
    seqs = [e.input_ids for e in enc]
    bounds = span_bounds([len(s) for s in seqs], [e.prompt_len for e in enc], "full")
    sub_tokens = sum(len(s) for s in seqs)
    pad = tok.pad_token_id or 0
    bare, full = [], []
    for _ in range(args.repeats):  # alternate, so both see the same background load
        with PeakRSS() as mb:
            bare_forwards((model, pruned), seqs, args.batch_size, pad)
        bare.append(mb)
        with PeakRSS() as mj, torch.inference_mode():
            scores = sample_divergences(model, pruned, seqs, bounds, jsd, "mean", args.batch_size, pad,
                                        desc="jsd")
        full.append(mj)
    mb, mj = min(bare, key=lambda x: x.seconds), min(full, key=lambda x: x.seconds)
    ratio = mj.seconds / mb.seconds
    report(f"2 bare forwards ({args.jsd_subset} samples)", mb, f"{sub_tokens} tokens, "
           f"{sub_tokens / mb.seconds:.0f} tok/s; runs: {[round(x.seconds, 1) for x in bare]}")
    report(f"JSD stage ({args.jsd_subset} samples)", mj,
           f"ratio JSD / bare = {ratio:.3f}; runs: {[round(x.seconds, 1) for x in full]}; "
           f"mean JSD {scores.mean():.4f}")
    est = mj.seconds * len(pool) / len(seqs)
    print(f"extrapolated JSD over the full pool: {est / 3600:.2f} h (~{sub_tokens * len(pool) / len(seqs):.0f} "
          f"tokens at {sub_tokens / mj.seconds:.0f} tok/s)", flush=True)
    ROWS.append(("JSD full pool (extrapolated)", est, None, None, None, f"time per sample x {len(pool):,}"))


def bench_ccg(rows: list[dict], labels: np.ndarray, seed: int, budgets: list[tuple[str, int]]) -> None:
    """The NTM walk over the clusters (random stand-in for the IES), once per (name, budget)."""
    k = int(labels.max()) + 1
    stand_in = np.random.default_rng(seed).random(len(rows))
    cds = np.bincount(labels, weights=stand_in, minlength=k) / np.bincount(labels, minlength=k)
    sizes = np.bincount(labels, minlength=k)
    for name, budget in budgets:
        n_k = allocate_budget(cds, sizes, budget, redistribute=True)
        with PeakRSS() as m:
            walk = ntm_walk(rows, labels, stand_in, n_k, range(k))
        g = walk["graph"]
        report(name, m, f"walked {len(walk['selected']) + len(walk['rejected'])}, rejected "
               f"{len(walk['rejected'])}, concepts {g.n_concepts}, edges {g.n_edges}")


def print_table() -> None:
    print("\n| stage | time | CPU time | peak RSS (GiB) | increase (GiB) | notes |\n|---|---|---|---|---|---|")
    for stage, sec, cpu, peak, delta, note in ROWS:
        t = f"{sec / 3600:.2f} h" if sec > 3600 else f"{sec:.1f} s"
        c = "" if cpu is None else f"{cpu:.1f} s"
        peak_s = "" if peak is None else f"{peak:.2f}"
        delta_s = "" if delta is None else f"{delta:.2f}"
        print(f"| {stage} | {t} | {c} | {peak_s} | {delta_s} | {note} |")
    print(f"\nload average at the end: {psutil.getloadavg()}")


if __name__ == "__main__":
    main()
