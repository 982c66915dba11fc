"""How healthy are S²RIC's clusters on real instructions? Balance and stability, former vs current rules.

    python scripts/s2ric_health.py                          # the embedded default pool (1,000 Alpaca samples)
    python scripts/s2ric_health.py --pool full --seeds 0 1  # all 52,002 Alpaca samples (~7 min on 2 cores)
    python scripts/s2ric_health.py --pool full --seeds 0 1 --k 12  # K fixed: is the K rule what moves?

For each d in --dims and seed in --seeds, S²RIC runs on the pool's MiniLM embeddings (instruction + input,
as PASER embeds them) as it does now (``diffusion_time: auto``: t from the spectral gap where there is one,
else 1; each sample's coordinates scaled to unit length before NMF) and as it did before (t from the largest
eigenvalue difference whatever its size, capped at 100, applied to the same eigenvectors; no row
normalisation). Per run: t, K, the largest cluster's share of the pool, the smallest cluster, the
normalised entropy of the cluster sizes (1 = all equal) and, per rule, stability: adjusted Rand index (and plain Rand index, which the PASER authors report)
between seeds at d = 16 and between each d and d = 16 at the first seed. Prints markdown; --out writes it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.embedding import instruction_text, load_embedder
from paser.hardware import cpu_model, has_amx
from paser.selectors.paser.clustering import nmf_clusters, reduce_embeddings


def pool_rows(which: str, data_dir: Path) -> tuple[list[dict], str]:
    """The embedded default's pool (conf/data/alpaca.yaml: 1,000 seeded samples), all of Alpaca, or a seeded
    slice of ``which`` samples."""
    from paser.data import load_pool

    size = {"full": None, "default": 1000}.get(which) if not which.isdigit() else int(which)
    pool = load_pool(str(data_dir / "alpaca" / "alpaca_data.jsonl"), subsample=size)
    return pool.rows, pool.source.replace(str(data_dir), "<data_dir>")


def embeddings(rows: list[dict], cache: Path) -> np.ndarray:
    """MiniLM embeddings (L2-normalised) of instruction + input, cached on disk by the texts' hash."""
    texts = [instruction_text(r) for r in rows]
    path = cache / f"minilm_{hashlib.sha256(chr(0).join(texts).encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    x = load_embedder().encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, x.astype(np.float32))
    return x


def legacy_t(eigenvalues: list[float]) -> int:
    """The rule before: t from the largest eigenvalue difference, however small, capped at 100."""
    vals = np.asarray(eigenvalues)
    j = int(np.argmax(vals[:-1] - vals[1:]))
    lo, hi = vals[j + 1], vals[j]
    return 1 if lo <= 0 or hi <= lo else int(min(100, max(1, math.ceil(math.log(10) / math.log(hi / lo)))))


def localisation(coords: np.ndarray) -> list[float]:
    """Per coordinate, the share of its energy (Σ ψ²) held by its top 1% rows: near 1 = localised on a
    small group (e.g. near-duplicate instructions), so it says nothing about the other 99% of the pool."""
    energy = coords.astype(np.float64) ** 2
    top = np.sort(energy, axis=0)[::-1][: max(1, len(coords) // 100)]
    return (top.sum(0) / np.maximum(energy.sum(0), 1e-300)).tolist()


def balance(labels: np.ndarray) -> dict:
    sizes = np.bincount(labels)
    p = sizes / sizes.sum()
    entropy = float(-(p * np.log(p)).sum() / math.log(len(p))) if len(p) > 1 else 0.0
    return {"K": len(sizes), "largest_share": float(p.max()), "smallest": int(sizes.min()), "entropy": entropy}


def run(x: np.ndarray, d: int, seed: int, k: int | str = "auto") -> dict:
    """Both rules on one (d, seed): the current one (auto) and the legacy t, from the same eigenvalues."""
    out = {}
    start = time.perf_counter()
    coords, diag = reduce_embeddings(x, "diffusion", d, 10, seed, "auto")
    labels, _ = nmf_clusters(coords, k, seed)
    out["current"] = {"t": diag["diffusion_time"], "rule": diag["diffusion_time_rule"], "labels": labels,
                      **balance(labels)}
    out["localisation"] = localisation(coords)
    t_old = legacy_t(diag["eigenvalues"])
    # the same eigenvectors rescaled from λ^t to λ^t_old (t_old >= t): no second kNN graph or eigensolve
    lam = np.clip(np.asarray(diag["eigenvalues"][:d], dtype=np.float64), 0.0, None)
    old_coords = (coords * lam[None, :] ** (t_old - diag["diffusion_time"])).astype(np.float32)
    old_labels, _ = nmf_clusters(old_coords, k, seed, row_normalize=False)
    out["legacy"] = {"t": t_old, "rule": "largest_difference", "labels": old_labels, **balance(old_labels)}
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> int:
    from sklearn.metrics import adjusted_rand_score, rand_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="default", help="default (1,000 samples), full, or a sample count")
    ap.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "paser" / "s2ric_health")
    ap.add_argument("--k", default="auto", help="K: auto (the NMF error elbow over 2..32) or an integer")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    k = args.k if args.k == "auto" else int(args.k)
    if 16 not in args.dims:
        args.dims.append(16)
    rows, what = pool_rows(args.pool, args.data_dir)
    x = embeddings(rows, args.cache)
    runs = {}
    for d, seed in sorted({(d, args.seeds[0]) for d in args.dims} | {(16, s) for s in args.seeds}):
        runs[d, seed] = run(x, d, seed, k)
        print(f"d={d} seed={seed}: " + "; ".join(f"{r} t={v['t']} K={v['K']} largest={v['largest_share']:.2f}"
                                                 for r, v in runs[d, seed].items() if r in ("current", "legacy"))
              + f" ({runs[d, seed]['seconds']:.0f} s)", flush=True)
    lines = [f"# S²RIC cluster health: {what}", "",
             (f"`python scripts/s2ric_health.py --pool {args.pool} --dims {' '.join(map(str, args.dims))} "
              f"--seeds {' '.join(map(str, args.seeds))}" + ("" if k == "auto" else f" --k {k}")
              + f"`; host: {cpu_model()}"
              f"{' (AMX-BF16)' if has_amx() else ''}; MiniLM embeddings of instruction + input, kNN k = 10, "
              + ("K by the NMF error elbow over 2..32." if k == "auto" else f"K fixed at {k}.")), "",
             "| d | seed | rule | t | K | largest cluster | smallest | size entropy |", "|---|---|---|---|---|---|---|---|"]
    for (d, seed), r in sorted(runs.items()):
        for rule in ("legacy", "current"):
            v = r[rule]
            lines.append(f"| {d} | {seed} | {rule} (t: {v['rule']}) | {v['t']} | {v['K']} | {v['largest_share']:.1%} | "
                         f"{v['smallest']} | {v['entropy']:.3f} |")
    lines += ["", ("Eigenvector localisation (current rule, first seed): per coordinate ψ_1..ψ_d, the share of its "
                   "energy held by its top 1% rows; a coordinate counts as delocalised below 0.5."), "",
              "| d | delocalised coordinates | shares |", "|---|---|---|"]
    for d in args.dims:
        shares = runs[d, args.seeds[0]]["localisation"]
        lines.append(f"| {d} | {sum(v < 0.5 for v in shares)} of {d} | {' '.join(f'{v:.2f}' for v in shares)} |")
    lines += ["", "Stability (agreement of two clusterings; ARI 0 = chance, 1 = identical; RI = plain Rand index):", "",
              "| rule | between | pairs | ARI mean (min) | RI mean (min) |", "|---|---|---|---|---|"]
    for rule in ("legacy", "current"):
        groups = {"seeds at d = 16": list(itertools.combinations([(16, s) for s in args.seeds], 2)),
                  "each d vs d = 16": [((d, args.seeds[0]), (16, args.seeds[0])) for d in args.dims if d != 16]}
        for name, pairs in groups.items():
            if not pairs:
                continue
            ari = [adjusted_rand_score(runs[a][rule]["labels"], runs[b][rule]["labels"]) for a, b in pairs]
            ri = [rand_score(runs[a][rule]["labels"], runs[b][rule]["labels"]) for a, b in pairs]
            lines.append(f"| {rule} | {name} | {len(pairs)} | {np.mean(ari):.3f} ({min(ari):.3f}) | "
                         f"{np.mean(ri):.3f} ({min(ri):.3f}) |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
