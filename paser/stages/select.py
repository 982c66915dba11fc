"""The select stage: the selector chooses from the candidates (the pool without recovery's validation rows)
within the budget; the cached record holds the chosen indices into the pool D, the selector's diagnostics
and files, and the selection's size in samples and trained tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

from paser import distributed
from paser.budget import Budget, resolve_budget
from paser.cache import config_hash
from paser.components import Selection, SelectionContext, declared
from paser.data import encode_pool
from paser.embedding import load_embedder
from paser.stages.runner import read_json

if TYPE_CHECKING:
    from paser.pipeline import Run


def select(run: Run, pruned_fn) -> tuple[dict, list[str]]:
    """(selection record, names of the selector's files written into the run folder). The record's
    indices are into the pool D (the selector's own are into the candidates)."""
    parts, selector = run.parts, run.parts.selector

    def compute():
        budget, candidates = selection_budget(run), parts.candidates
        selection: Selection = selector.select(candidates, budget, selection_context(run, pruned_fn))
        # checked before anything is stored: an over-budget selection must not be cached
        if declared(selector, "uses_budget") and budget.cost(selection.indices) > budget.size:
            raise RuntimeError(f"selector returned {budget.cost(selection.indices)} {budget.unit} for a "
                               f"budget of {budget}")
        indices = [candidates.positions[i] for i in selection.indices]
        record = {"indices": indices, "budget": budget.key(),
                  "pool_size": len(parts.pool), "candidates": len(candidates),
                  "validation_indices": parts.validation, "pool_source": parts.pool.source,
                  "pool_fingerprint": parts.pool.fingerprint, "environment": run.keys.selection["environment"],
                  "diagnostics": selection.diagnostics,
                  "stats": selection_stats(parts.pool.rows, indices, run.models.tok(), trained_cutoff(run.cfg))}
        return record, selection.artifacts

    def save(value, d: Path):
        record, artifacts = value
        (d / "selection.json").write_text(json.dumps(record, indent=1, default=_np_default))
        write_files(d / "artifacts", artifacts)

    def load(d: Path):
        return read_json(d / "selection.json"), {f.name: f.read_bytes() for f in (d / "artifacts").glob("*")}

    record, artifacts = run.cached("select", "selection", run.keys.selection, compute, save, load, ranks="all")
    if distributed.is_main():  # the selector's files (e.g. PASER's cluster map), fresh or cached
        write_files(run.run_dir, artifacts)
    # a fresh computation's record goes through JSON like a cached one, so cold and warm runs agree
    return json.loads(json.dumps(record, default=_np_default)), sorted(artifacts)


def selection_budget(run: Run) -> Budget:
    """The selection budget over the candidates: a count, or tokens at the trained cutoff (which needs the
    tokenizer, so it is resolved here rather than in build_components)."""
    parts = run.parts
    if parts.budget_unit == "samples":
        return Budget.samples(parts.budget)
    tokens = [len(e.input_ids) for e in encode_pool(run.models.tok(), parts.candidates.rows, trained_cutoff(run.cfg))]
    return Budget.tokens(resolve_budget(run.cfg.budget, sum(tokens), "tokens"), tokens)


def trained_cutoff(cfg: DictConfig) -> int:
    """The token cutoff a sample is trained at: what a token budget counts."""
    return int(OmegaConf.select(cfg, "recovery.cutoff") or cfg.scoring.cutoff)


def selection_context(run: Run, pruned_fn) -> SelectionContext:
    """What a selector may ask for, each loaded only when it does: the models, the tokenizer, the embedder,
    the cache for its per-sample scores."""
    cfg, keys = run.cfg, run.keys
    embedder_device = cfg.scoring.get("embedder_device") or str(run.device)
    return SelectionContext(
        tokenizer=run.models.tok(), original_model=run.models.fresh_dense, pruned_model=pruned_fn,
        embedder=lambda: load_embedder(cfg.scoring.embedder, device=embedder_device),
        embedder_name=cfg.scoring.embedder, cache=run.cache, seed=cfg.seed,
        cutoff=cfg.scoring.cutoff, batch_size=cfg.scoring.batch_size, device=run.device,
        world_size=distributed.world_size(),
        cache_key={"model": config_hash(keys.model), "pruner": config_hash(keys.pruner),
                   "pool": run.parts.candidates.fingerprint})


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a selector's artifacts (file name -> bytes) into ``folder``; names are plain file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"selector artifact name {name!r} must be a plain file name")
        (folder / name).write_bytes(data)


def selection_stats(rows: list[dict], indices, tokenizer, cutoff: int) -> dict:
    """Size of the selection: samples, characters per field against the pool's, and the tokens trained on
    (templated prompt and response at the cutoff, summed; samples the cutoff truncates)."""
    def mean_len(items, field):
        return float(np.mean([len(r[field]) for r in items])) if items else 0.0

    chosen = [rows[i] for i in indices]
    encoded = encode_pool(tokenizer, chosen, cutoff) if chosen else []
    prompt = sum(e.prompt_len for e in encoded)
    return {"selected": len(chosen),
            "tokens": {"total": sum(len(e.input_ids) for e in encoded), "prompt": prompt,
                       "response": sum(len(e.input_ids) for e in encoded) - prompt,
                       "truncated_samples": sum(e.truncated for e in encoded), "cutoff": cutoff},
            **{f"mean_chars_{f}_selected": mean_len(chosen, f) for f in ("instruction", "input", "output")},
            **{f"mean_chars_{f}_pool": mean_len(rows, f) for f in ("instruction", "input", "output")},
            "with_input_fraction_selected": float(np.mean([bool(r["input"]) for r in chosen])) if chosen else 0.0}


def _np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
