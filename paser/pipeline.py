"""One run: prune -> select -> recover -> evaluate.

Every stage's output is cached under a hash of the config slice that produced it (paser.cache), so a
sweep over selectors prunes once and a rerun of a finished config loads results instead of recomputing.
Models are loaded lazily: a stage whose result is cached never touches a model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from paser.cache import StageCache, config_hash, library_versions, to_plain
from paser.components import Selection, SelectionContext
from paser.data import Pool, calibration_windows, load_pool, resolve_budget
from paser.embedding import load_embedder
from paser.errors import ConfigError, PaserError
from paser.models import load_model, load_saved, load_tokenizer, save_model
from paser.pruners.common import NoPruner, parameter_count, sparsity_report
from paser.tracking import git_commit, write_results

log = logging.getLogger(__name__)


class Models:
    """Lazy holder of the dense and pruned models. Pruning consumes the dense instance (it prunes in
    place); whoever needs the original model afterwards gets a fresh copy from disk."""

    def __init__(self, cfg: DictConfig, cache: StageCache):
        self.cfg, self.cache = cfg, cache
        self._dense = None
        self.pruned = None  # set by the prune stage, or loaded from its cache entry
        self.tokenizer = None

    def dense(self):
        if self._dense is None:
            self._dense = self.fresh_dense()
        return self._dense

    def take_dense(self):
        model = self.dense()
        self._dense = None
        return model

    def fresh_dense(self):
        return load_model(self.cfg.model, self.cache)[0]

    def tok(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.cfg.model, self.cache)
        return self.tokenizer


class Timer:
    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.time()
        entry = {"reused": False}
        try:
            yield entry
        finally:
            entry["seconds"] = round(time.time() - start, 3)
            self.stages[name] = entry
            log.info("stage %-10s %7.1f s%s", name, entry["seconds"], " (reused from cache)" if entry["reused"]
                     else "")


def _json(path: Path):
    return json.loads(path.read_text())


def _instantiate(node: DictConfig, drop: tuple[str, ...] = ()):
    plain = {k: v for k, v in to_plain(node).items() if k not in drop}
    try:
        return hydra.utils.instantiate(plain, _convert_="all")
    except InstantiationException as e:  # Hydra wraps the component's own error: surface ours as is
        if isinstance(e.__cause__, PaserError):
            raise e.__cause__ from None
        raise


# ---------------------------------------------------------------------------------------- stages


@dataclass
class Components:
    """Everything the config asks for, built (and so validated) before any model is loaded: a typo or
    an impossible value fails in seconds, not after an hour of pruning."""

    pruner: object
    selector: object
    recovery: object | None
    evaluators: dict
    pool: Pool
    budget: int


def check_lengths(cfg: DictConfig) -> None:
    """Token cutoffs must fit the model's context (longer samples are truncated to the cutoff and
    counted in the reports)."""
    context = cfg.model.get("context_length")
    for key in ("scoring.cutoff", "recovery.cutoff"):
        value = OmegaConf.select(cfg, key)
        if context and value and value > context:
            raise ConfigError(f"{key}={value} exceeds the model context ({cfg.model.name}: "
                              f"model.context_length={context}); lower it to at most {context}")


def build_components(cfg: DictConfig) -> Components:
    check_lengths(cfg)
    pool = load_pool(cfg.data.path, cfg.data.get("hub_id"), cfg.data.get("split", "train"),
                     cfg.data.get("subsample"), cfg.data.get("subsample_seed", 0),
                     field_map=cfg.data.get("field_map"))
    recovery = _instantiate(cfg.recovery) if cfg.recovery.get("_target_") else None
    return Components(
        pruner=_instantiate(cfg.pruner, drop=("calibration",)),
        selector=_instantiate(cfg.selector),
        recovery=recovery,
        evaluators={kind: _instantiate(node) for kind, node in cfg.evaluator.items() if node is not None},
        pool=pool,
        budget=resolve_budget(cfg.budget, len(pool)))


class Run:
    """The four stages of one composed config, sharing the cache, the lazily loaded models and the timer.
    Each stage returns a cached result when one exists for the config slice that determines it."""

    def __init__(self, cfg: DictConfig, parts: Components, run_dir: Path):
        self.cfg, self.parts, self.run_dir = cfg, parts, run_dir
        self.cache = StageCache(cfg.paths.cache_dir)
        self.models = Models(cfg, self.cache)
        self.timer = Timer()

    def evaluate(self, name: str, key: dict, get_model) -> dict:
        """Metrics of one model state under every configured evaluator (cached per state and evaluator)."""
        slice_ = {"state": key, "evaluator": self.cfg.evaluator}
        with self.timer.stage(f"eval_{name}") as t:
            hit = self.cache.lookup("metrics", slice_)
            if hit is not None:
                t["reused"] = True
                return _json(hit / "metrics.json")
            model, tokenizer = get_model(), self.models.tok()
            metrics = {kind: ev.evaluate(model, tokenizer) for kind, ev in self.parts.evaluators.items()}
            self.cache.store("metrics", slice_,
                             lambda d: (d / "metrics.json").write_text(json.dumps(metrics, indent=1)))
            return metrics

    def prune(self) -> tuple[Path, dict]:
        cfg, models = self.cfg, self.models
        slice_ = {"model": cfg.model, "pruner": cfg.pruner}
        with self.timer.stage("prune") as t:
            hit = self.cache.lookup("pruned", slice_)
            if hit is not None:
                t["reused"] = True
                return hit, _json(hit / "report.json")
            model, tokenizer = models.take_dense(), models.tok()
            calib = None
            if getattr(self.parts.pruner, "needs_calibration", False):
                c = cfg.pruner.calibration
                calib = calibration_windows(tokenizer, c.path, c.nsamples, c.seqlen, c.seed)
            params_before = parameter_count(model)
            start = time.time()
            report = self.parts.pruner.prune(model, calib)
            report.update(params_before=params_before, params_after=parameter_count(model),
                          prune_time_s=round(time.time() - start, 3))

            def write(d: Path):
                save_model(model, tokenizer, d / "model")
                (d / "report.json").write_text(json.dumps(report, indent=1))

            entry = self.cache.store("pruned", slice_, write)
            models.pruned = model
            return entry, report

    def dense_report(self) -> dict:
        """pruner=none: the dense model's sparsity report, cached so that a fully cached run loads no model."""
        def write(d: Path):
            (d / "report.json").write_text(json.dumps(sparsity_report(self.models.dense()), indent=1))

        entry, _ = self.cache.get_or_create("dense_report", {"model": self.cfg.model}, write)
        return _json(entry / "report.json")

    def select(self, pruned_fn) -> tuple[dict, list[dict]]:
        cfg, pool, budget, selector = self.cfg, self.parts.pool, self.parts.budget, self.parts.selector
        slice_ = {"model": cfg.model, "pruner": cfg.pruner, "pool": pool.fingerprint, "selector": cfg.selector,
                  "budget": budget, "seed": cfg.seed, "scoring": cfg.scoring}
        with self.timer.stage("select") as t:
            hit = self.cache.lookup("selection", slice_)
            if hit is not None:
                t["reused"] = True
                record = _json(hit / "selection.json")
                for f in (hit / "artifacts").glob("*"):  # the selector's plots, for this run's folder too
                    shutil.copy(f, self.run_dir / f.name)
            else:
                before = set(self.run_dir.iterdir())
                ctx = SelectionContext(
                    tokenizer=self.models.tok(), original_model=self.models.fresh_dense, pruned_model=pruned_fn,
                    embedder=lambda: load_embedder(cfg.scoring.embedder), embedder_name=cfg.scoring.embedder,
                    cache=self.cache, seed=cfg.seed, run_dir=self.run_dir, cutoff=cfg.scoring.cutoff,
                    batch_size=cfg.scoring.batch_size,
                    cache_key={"model": config_hash(cfg.model), "pruner": config_hash(cfg.pruner),
                               "pool": pool.fingerprint})
                selection: Selection = selector.select(pool, budget, ctx)
                record = {"indices": [int(i) for i in selection.indices], "budget": budget,
                          "pool_size": len(pool), "pool_source": pool.source,
                          "pool_fingerprint": pool.fingerprint, "diagnostics": selection.diagnostics,
                          "stats": selection_stats(pool.rows, selection.indices)}

                artifacts = [f for f in set(self.run_dir.iterdir()) - before if f.is_file()]

                def write(d: Path):
                    (d / "selection.json").write_text(json.dumps(record, indent=1, default=_np_default))
                    if selection.scores is not None:
                        np.save(d / "scores.npy", np.asarray(selection.scores))
                    (d / "artifacts").mkdir()
                    for f in artifacts:
                        shutil.copy(f, d / "artifacts" / f.name)

                self.cache.store("selection", slice_, write)
        if getattr(selector, "uses_budget", True) and len(record["indices"]) > budget:
            raise RuntimeError(f"selector returned {len(record['indices'])} samples for a budget of {budget}")
        return {"slice": slice_, **record}, pool.subset(record["indices"])

    def recover(self, selection: dict, samples: list[dict], pruned_fn):
        """(factory of the recovered model, recovery report), or (None, None) with recovery=none."""
        if self.parts.recovery is None:
            return None, None
        slice_ = {"selection": selection["slice"], "recovery": self.cfg.recovery, "seed": self.cfg.seed}
        with self.timer.stage("recover") as t:
            hit = self.cache.lookup("adapter", slice_)
            if hit is not None:
                t["reused"] = True

                def load_recovered():
                    from peft import PeftModel

                    return PeftModel.from_pretrained(pruned_fn(), hit / "adapter").eval()

                return load_recovered, _json(hit / "report.json")
            # checkpoints live beside the entry until it is stored: a rerun finds and resumes them
            workdir = self.cache.entry_dir("adapter", slice_).with_suffix(".work")
            model, report = self.parts.recovery.recover(pruned_fn(), self.models.tok(), samples, workdir)

            def write(d: Path):
                model.save_pretrained(d / "adapter")
                (d / "report.json").write_text(json.dumps(report, indent=1))

            self.cache.store("adapter", slice_, write)
            shutil.rmtree(workdir, ignore_errors=True)
            return (lambda: model), report

    def __call__(self) -> dict:
        cfg, models = self.cfg, self.models
        dense_key = {"model": cfg.model}
        metrics = {"dense": self.evaluate("dense", dense_key, models.dense)}

        if isinstance(self.parts.pruner, NoPruner):  # the pruned model *is* the dense one: no copy
            prune_report, pruned, pruned_key = self.dense_report(), models.dense, dense_key
        else:
            pruned_entry, prune_report = self.prune()
            pruned_key = {"model": cfg.model, "pruner": cfg.pruner}

            def pruned():
                if models.pruned is None:
                    models.pruned, _ = load_saved(pruned_entry / "model", dtype=cfg.model.dtype,
                                                  device_map=cfg.model.get("device_map"))
                return models.pruned

        metrics["pruned"] = self.evaluate("pruned", pruned_key, pruned)
        selection, samples = self.select(pruned)
        recovered, recovery_report = self.recover(selection, samples, pruned)
        if recovered is not None:
            recovered_key = {"selection": selection["slice"], "recovery": cfg.recovery, "seed": cfg.seed}
            metrics["recovered"] = self.evaluate("recovered", recovered_key, recovered)
        return {"metrics": metrics, "prune": prune_report, "selection": selection, "recovery": recovery_report}


def selection_stats(rows: list[dict], indices) -> dict:
    def mean_len(items, field):
        return float(np.mean([len(r[field]) for r in items])) if items else 0.0

    chosen = [rows[i] for i in indices]
    return {"selected": len(chosen),
            **{f"mean_chars_{f}_selected": mean_len(chosen, f) for f in ("instruction", "input", "output")},
            **{f"mean_chars_{f}_pool": mean_len(rows, f) for f in ("instruction", "input", "output")},
            "with_input_fraction_selected": float(np.mean([bool(r["input"]) for r in chosen])) if chosen else 0.0}


def _np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------- the run


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run the four stages for a composed config; writes ``results.json`` into ``run_dir``."""
    started = time.time()
    parts = build_components(cfg)
    run_dir = Path(run_dir or Path(cfg.paths.output_dir) / "runs" / cfg.name / time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    logger = _instantiate(cfg.logger)
    tags = [f"model:{cfg.model.name}", f"pruner:{_component_name(cfg.pruner)}",
            f"selector:{_component_name(cfg.selector)}", f"recovery:{_component_name(cfg.recovery)}"]
    logger.start(to_plain(cfg), run_dir, name=run_dir.name, tags=tags)

    stages = Run(cfg, parts, run_dir)
    out = stages()
    selection = out["selection"]
    results = {
        "name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir),
        "config": to_plain(cfg),
        "metrics": out["metrics"],
        "prune": out["prune"],
        "selection": {k: v for k, v in selection.items() if k not in ("slice", "indices")},
        "recovery": out["recovery"],
        "timings": {**stages.timer.stages, "total_s": round(time.time() - started, 3)},
        "versions": library_versions(), "git_commit": git_commit(),
    }
    (run_dir / "selected_indices.json").write_text(json.dumps(selection["indices"]))
    write_results(run_dir, results)
    _log_results(logger, results, run_dir)
    print(summary_table(results))
    return results


def _component_name(node: DictConfig) -> str:
    target = node.get("_target_") if node is not None else None
    return target.rsplit(".", 1)[-1] if target else "none"


def _log_results(logger, results: dict, run_dir: Path) -> None:
    if results["recovery"]:
        for point in results["recovery"]["loss_curve"]:
            logger.log({"recovery/loss": point["loss"], "recovery/lr": point["lr"]}, step=point["step"])
    rows = [[state, *headline(m)] for state, m in results["metrics"].items()]
    logger.log_table("metrics_table", ["state", "wikitext2_ppl", "ptb_ppl", "zeroshot_mean"], rows)
    for png in sorted(run_dir.glob("*.png")):  # selector diagnostics, e.g. PASER's cluster map
        logger.log_image(png.stem, png)
    logger.finish({"metrics": results["metrics"], "prune": {k: v for k, v in results["prune"].items()
                                                            if k != "sparsity_per_layer"},
                   "selection": results["selection"]["stats"], "timings": results["timings"]})


def headline(m: dict) -> list:
    ppl = m.get("ppl") or {}
    zs = m.get("zeroshot") or {}
    return [ppl.get("wikitext2", {}).get("ppl"), ppl.get("ptb", {}).get("ppl"), zs.get("mean")]


def summary_table(results: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"\n{'model state':<12} {'WikiText-2':>12} {'PTB':>12} {'0-shot mean':>12}"]
    for state, m in results["metrics"].items():
        lines.append(f"{state:<12} " + " ".join(f"{fmt(v):>12}" for v in headline(m)))
    t = results["timings"]
    lines.append("stages: " + ", ".join(f"{k} {v['seconds']:.1f}s{' (cached)' if v['reused'] else ''}"
                                        for k, v in t.items() if isinstance(v, dict)))
    lines.append(f"selected {results['selection']['stats']['selected']} of "
                 f"{results['selection']['pool_size']} samples; results in {results['run_dir']}")
    return "\n".join(lines)
