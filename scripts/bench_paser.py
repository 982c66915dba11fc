"""Benchmark PASER's selection stages on the full Alpaca pool (52,002 samples) on this machine.

    python scripts/bench_paser.py [--data ../shared/data/alpaca/alpaca_data.jsonl] [--jsd-subset 384]
    python scripts/bench_paser.py --scale 52002,520000

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
               kNN index, its measured recall@k, and the time and peak memory of kNN, diffusion map and NMF.
Each stage prints its wall time and the peak resident memory of the process during the stage (sampled
every 20 ms) and its increase over the start of the stage.
"""

from __future__ import annotations

import argparse
import copy
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
from paser.models import load_model
from paser.pruners.magnitude import MagnitudePruner
from paser.scoring import iter_batches
from paser.selectors.paser.allocation import allocate_budget
from paser.selectors.paser.clustering import cluster_embeddings, faiss_exact, knn_torch
from paser.selectors.paser.divergence import jsd, sample_divergences, span_bounds
from paser.selectors.paser.selector import ntm_walk

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple] = []


class PeakRSS:
    """Peak resident memory (GiB) of this process while the block runs."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
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
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_gib, self.delta_gib = self.peak / 2**30, (self.peak - self.start) / 2**30


def report(stage: str, m: PeakRSS, note: str = "") -> None:
    ROWS.append((stage, m.seconds, m.peak_gib, m.delta_gib, note))
    print(f"{stage:<34} {m.seconds:9.1f} s   peak RSS {m.peak_gib:5.2f} GiB (+{m.delta_gib:4.2f})   {note}",
          flush=True)


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
    if "cluster" in stages or args.scale:
        with PeakRSS() as m:
            emb = embed_pool(ctx, pool.rows)
        report("embeddings (MiniLM, cached?)", m, f"{emb.shape}")
    if args.scale:
        for n in map(int, args.scale.split(",")):
            bench_scale(emb, n, args.seed)
        stages = set()
    if "cluster" in stages:
        with PeakRSS() as m:
            labels, cdiag = cluster_embeddings(emb, seed=args.seed)
        report("clustering (S2RIC, auto K)", m,
               f"K={cdiag['n_clusters']} t={cdiag['diffusion_time']} knn {cdiag['time_knn_s']} s, eigen "
               f"{cdiag['time_eigen_s']} s, NMF {cdiag['time_nmf_s']} s; sizes {cdiag['cluster_sizes']}")
        if "ccg" in stages:
            bench_ccg(pool, labels, args)
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
    parts, have = [emb], len(emb)
    while have < n:
        take = min(len(emb), n - have)
        y = emb[:take] + rng.normal(0.0, sigma, (take, emb.shape[1])).astype(np.float32)
        parts.append(y / np.linalg.norm(y, axis=1, keepdims=True))
        have += take
    return np.concatenate(parts), (f"{len(emb)} real embeddings + {n - len(emb)} noisy copies "
                                   f"(Gaussian σ = {sigma:.4f} per dimension, renormalised)")


def bench_scale(emb: np.ndarray, n: int, seed: int) -> None:
    """S²RIC (auto K) on n samples: kNN index and recall, stage times, peak memory."""
    x, note = scaled_embeddings(emb, n, seed)
    print(f"scale {n}: {note}", flush=True)
    with PeakRSS() as m:
        _, d = cluster_embeddings(x, seed=seed)
    recall = d.get("knn_recall", "exact")
    if d["knn_index"] == "faiss_flat":  # the former exact torch search (bf16 candidates), side by side
        with PeakRSS() as mt:
            knn_torch(x, d["n_neighbors"])
        report(f"kNN {n}, former torch exact", mt, f"FAISS flat: {d['time_knn_s']} s")
    report(f"clustering {n} samples", m,
           f"kNN {d['knn_index']} (recall@{d['n_neighbors']} {recall}) {d['time_knn_s']} s, eigen "
           f"{d['time_eigen_s']} s, NMF {d['time_nmf_s']} s; K={d['n_clusters']} t={d['diffusion_time']}")


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
    ROWS.append(("JSD full pool (extrapolated)", est, None, None, f"time per sample x {len(pool):,}"))


def bench_ccg(pool, labels, args) -> None:
    """The NTM walk over the whole pool's clusters (random stand-in for the IES)."""
    k = int(labels.max()) + 1
    stand_in = np.random.default_rng(args.seed).random(len(pool))
    cds = np.array([stand_in[labels == c].mean() for c in range(k)])
    sizes = np.bincount(labels, minlength=k)
    for name, budget in (("ccg (20% budget)", int(args.budget * len(pool))), ("ccg (all samples)", len(pool))):
        n_k = allocate_budget(cds, sizes, budget, redistribute=True)
        with PeakRSS() as m:
            walk = ntm_walk(pool.rows, labels, stand_in, n_k, range(k))
        g = walk["graph"]
        report(name, m, f"walked {len(walk['selected']) + len(walk['rejected'])}, rejected "
               f"{len(walk['rejected'])}, concepts {g.n_concepts}, edges {g.n_edges}")


def print_table() -> None:
    print("\n| stage | time | peak RSS (GiB) | increase (GiB) | notes |\n|---|---|---|---|---|")
    for stage, sec, peak, delta, note in ROWS:
        t = f"{sec / 3600:.2f} h" if sec > 3600 else f"{sec:.1f} s"
        peak_s = "" if peak is None else f"{peak:.2f}"
        delta_s = "" if delta is None else f"{delta:.2f}"
        print(f"| {stage} | {t} | {peak_s} | {delta_s} | {note} |")
    print(f"\nload average at the end: {psutil.getloadavg()}")


if __name__ == "__main__":
    main()
