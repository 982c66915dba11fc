"""Zero-shot accuracy through lm-eval-harness on the in-memory model (dense, pruned, or a peft model).

``source=local`` runs the task YAMLs in ``paser/evaluation/tasks/`` on the offline copies in
``paths.data_dir`` (the built-in tasks' prompts, see offline_tasks.py); ``source=hub`` runs lm-eval's
built-in tasks, which download their datasets. Each task reports acc and acc_norm with their standard
errors; ``metrics`` picks the headline one per task (default: the paper's convention, LLM-Pruner's) and
``mean`` averages the headline scores. ``limit`` evaluates the first N documents of each task or a seeded
random N; either way the result says it is a subset and how large. ``evaluate_with_samples`` also returns
each document's correctness (``<task>/doc_id``, ``<task>/acc``, ``<task>/acc_norm``: 0/1, from lm-eval's
per-sample log), for paired comparisons between model states.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from paser.errors import ConfigError
from paser.evaluation.offline_tasks import data_files

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
# the paper's (LLM-Pruner's) choice of metric per task
DEFAULT_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                   "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
ACCURACY_TASKS = tuple(DEFAULT_METRICS)
PERPLEXITY_TASKS = ("wikitext",)  # lm-eval's word/byte perplexity; reported, never averaged
ALLOWED_TASKS = ACCURACY_TASKS + PERPLEXITY_TASKS
SOURCES = ("local", "hub")
LIMIT_MODES = ("first", "random")


class _DropCustomKwargsNotice(logging.Filter):
    """lm-eval logs a hint about --metadata for every task with a custom_dataset loader; ours are ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomKwargsNotice())


def _plain(value):
    """Hydra may hand us DictConfig/ListConfig (plain instantiate) or plain containers (_convert_=all)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def split_over_devices(model) -> bool:
    """Whether accelerate spread the model over more than one device (``hf_device_map``)."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


class ZeroShotEvaluator:
    """lm-eval on the in-memory model. ``batch_size`` and ``share_context`` only move memory and speed: in
    bf16 they change results at most in the last digits (padding, packed rows), so they are neutral knobs
    that the cache key ignores. A model split over devices is scored by lm-eval's plain HFLM (the packed
    scorer needs one device); the metrics say which scorer ran (``lm``)."""

    neutral_knobs: tuple[str, ...] = ("batch_size", "share_context", "data_dir")  # files: input_files

    def __init__(self, tasks=ACCURACY_TASKS, source: str = "local", metrics: dict | None = None,
                 limit: int | None = None, limit_mode: str = "first", seed: int = 0, batch_size: int = 16,
                 share_context: bool = True, bootstrap_iters: int = 1000, data_dir: str = "../shared/data"):
        self.tasks = list(_plain(tasks))
        unknown = [t for t in self.tasks if t not in ALLOWED_TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"evaluator.zeroshot.tasks: unknown task(s) {unknown or '(none given)'}; "
                              f"allowed: {list(ALLOWED_TASKS)}")
        if source not in SOURCES:
            raise ConfigError(f"evaluator.zeroshot.source='{source}' is unknown; allowed: {list(SOURCES)}")
        self.metrics = dict(DEFAULT_METRICS)
        for task, metric in (_plain(metrics) or {}).items():
            if task not in DEFAULT_METRICS:
                raise ConfigError(f"evaluator.zeroshot.metrics: unknown task '{task}'; "
                                  f"allowed: {list(DEFAULT_METRICS)}")
            if metric not in ("acc", "acc_norm"):
                raise ConfigError(f"evaluator.zeroshot.metrics.{task}='{metric}'; allowed: acc, acc_norm")
            self.metrics[task] = metric
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"evaluator.zeroshot.limit={limit!r} must be a whole number >= 1 or null (all)")
        if limit_mode not in LIMIT_MODES:
            raise ConfigError(f"evaluator.zeroshot.limit_mode='{limit_mode}'; allowed: {list(LIMIT_MODES)}")
        self.source, self.limit, self.limit_mode, self.seed = source, limit, limit_mode, seed
        self.batch_size, self.share_context, self.bootstrap_iters = batch_size, share_context, bootstrap_iters
        self.data_dir = str(Path(data_dir).resolve())  # lm-eval's loaders run with no notion of our cwd
        self._task_manager = None

    @property
    def task_manager(self):
        """Built once per evaluator: indexing lm-eval's built-in tasks takes seconds."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            if self.source == "local":
                self._task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                                 metadata={"paser_data_dir": self.data_dir})
            else:
                self._task_manager = TaskManager()
        return self._task_manager

    def _sample_indices(self, tasks: dict) -> dict[str, list[int]] | None:
        """Seeded random doc indices per task (each task seeded on its own, so adding a task keeps the
        other subsets), or None for the first-N mode."""
        if self.limit is None or self.limit_mode == "first":
            return None
        samples = {}
        for name, task in tasks.items():
            n = len(task.eval_docs)
            rng = random.Random(f"{name}:{self.seed}")
            samples[name] = sorted(rng.sample(range(n), min(self.limit, n)))
        return samples

    def input_files(self) -> list[Path]:
        """The offline task files (none for source=hub: lm-eval's datasets are versioned by the hub)."""
        return [f for task in self.tasks for f in data_files(task, self.data_dir)] if self.source == "local" else []

    def evaluate(self, model, tokenizer) -> dict:
        return self.evaluate_with_samples(model, tokenizer)[0]

    @torch.inference_mode()
    def evaluate_with_samples(self, model, tokenizer) -> tuple[dict, dict[str, np.ndarray]]:
        """(metrics, per-document arrays)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from paser.evaluation.shared_context_lm import SharedContextHFLM

        start = time.perf_counter()
        if self.source == "local":
            for task in self.tasks:
                data_files(task, self.data_dir)  # fail before any model work, naming the missing file
        try:
            tasks = self.task_manager.load(self.tasks)["tasks"]
        except (OSError, ConnectionError) as e:  # datasets' offline / connection failures
            if self.source == "local":
                raise
            raise ConfigError(f"evaluator.zeroshot.source=hub could not load lm-eval's datasets ({e}); "
                              "on a machine without hub access use evaluator.zeroshot.source=local") from None
        samples = self._sample_indices(tasks)
        was_training = model.training
        model.eval()
        outputs, seconds = {}, {}
        try:
            lm_class = SharedContextHFLM if self.share_context else HFLM
            if lm_class is SharedContextHFLM and split_over_devices(model):
                log.info("zero-shot: the model is split over several devices; scoring with lm-eval's HFLM "
                         "instead of the shared-context scorer")
                lm_class = HFLM
            lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            for name, task in tasks.items():  # one task at a time, to time each
                t0 = time.perf_counter()
                outputs[name] = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=self.task_manager,
                    limit=self.limit if samples is None else None,
                    samples=None if samples is None else {name: samples[name]},
                    bootstrap_iters=self.bootstrap_iters, log_samples=True,
                    random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
                    fewshot_random_seed=self.seed)
                seconds[name] = round(time.perf_counter() - t0, 1)
        finally:
            model.train(was_training)
        result = self._summarise(outputs, seconds)
        result["lm"] = lm_class.__name__
        result["wall_time_s"] = round(time.perf_counter() - start, 1)
        log.info("zero-shot (%s%s): mean %s in %.0f s", self.source,
                 f", {self.limit_mode} {self.limit}/task" if result["subset"] else "",
                 "-" if result["mean"] is None else f"{result['mean']:.4f}", result["wall_time_s"])
        return result, self._per_document(outputs)

    def _per_document(self, outputs: dict) -> dict[str, np.ndarray]:
        """Per accuracy task: the documents' indices in the task's evaluation split (sorted) and their 0/1
        acc and acc_norm (where the task computes it)."""
        out = {}
        for name in self.tasks:
            if name in PERPLEXITY_TASKS:
                continue
            rows = sorted((r for r in outputs[name].get("samples", {}).get(name, []) if r.get("filter", "none") == "none"),
                          key=lambda r: r["doc_id"])
            out[f"{name}/doc_id"] = np.array([r["doc_id"] for r in rows], dtype=np.int64)
            for m in ("acc", "acc_norm"):
                if rows and all(m in r for r in rows):
                    out[f"{name}/{m}"] = np.array([r[m] for r in rows], dtype=np.int8)
        return out

    def _summarise(self, outputs: dict, seconds: dict) -> dict:
        per_task, subset = {}, False
        for name in self.tasks:
            r = outputs[name]["results"][name]
            counts = outputs[name]["n-samples"][name]
            entry = {"n": counts["effective"], "n_total": counts["original"], "wall_time_s": seconds[name]}
            entry["subset"] = entry["n"] < entry["n_total"]
            subset |= entry["subset"]
            if name in PERPLEXITY_TASKS:
                for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                    entry[m] = r.get(f"{m},none")
            else:
                for m in ("acc", "acc_norm"):
                    entry[m] = r.get(f"{m},none")  # the hub's boolq/winogrande compute acc only
                    stderr = r.get(f"{m}_stderr,none")
                    entry[f"{m}_stderr"] = stderr if isinstance(stderr, float) else None
                entry["metric"] = self.metrics[name]
                entry["score"] = entry[entry["metric"]]
            per_task[name] = entry
        scores = [e["score"] for e in per_task.values() if e.get("score") is not None]
        return {
            "tasks": per_task,
            "mean": sum(scores) / len(scores) if scores else None,
            "mean_over": [t for t, e in per_task.items() if e.get("score") is not None],
            "source": self.source,
            "limit": self.limit,
            "limit_mode": self.limit_mode if self.limit is not None else None,
            "seed": self.seed,
            "subset": subset,
            "share_context": self.share_context,
            "lm_eval_version": lm_eval_version(),
        }


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

