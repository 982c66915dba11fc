"""Stage times of finished runs, and what evaluating the recovered model costs against the pruned one.

    python scripts/stage_times.py experiments/table1_cpu_edition/runs [--out stage_times.md]

Reads every results.json under the folders. A stage served from the cache took no time worth reporting,
so each cell is the computed time only ("cached" otherwise). The pruned model's evaluation is computed once
and then cached for every later run with the same model, pruner, evaluator and host; each run's recovered
evaluation is set against the computation it reused (the latest of its group started no later, by
results.json's started_at, or run.log's first timestamp for runs from before it: runs of several sessions
each have their own): the ratio recovered / pruned, per evaluator kind and in
all, is the pipeline-level measure of what the merged adapter costs at inference (issue #17's target:
≤ 1.1×). Runs on different hosts (CPU model, thread count, GPU) are never compared.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.make_tables import load_runs

HOST_KEYS = ("device", "cpu", "amx_bf16", "torch_threads", "cuda", "gpu_count", "world_size")
SHOWN = ("select", "recover")
LOG_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def host_label(host: dict) -> str:
    device = host.get("cuda") or host.get("cpu") or host.get("device")
    return f"{device}, {host.get('torch_threads')} thread(s)" + (", AMX" if host.get("amx_bf16") else "")


def pruned_group(run: dict) -> str:
    """Runs whose pruned model and evaluation are the same work on the same host."""
    cfg = run["config"]
    return json.dumps([cfg.get("model"), cfg.get("pruner"), cfg.get("evaluator"),
                       [run["host"].get(k) for k in HOST_KEYS]], sort_keys=True, default=str)


def computed(timings: dict, stage: str) -> float | None:
    entry = timings.get(stage)
    return entry["seconds"] if isinstance(entry, dict) and not entry["reused"] else None


def eval_kinds(timings: dict, state: str) -> dict[str, str]:
    """The evaluator kinds a state was evaluated with and their stage names, e.g. {'ppl': 'eval_pruned_ppl'};
    runs from before the per-kind stages timed one ``eval_<state>``, reported as kind 'all'."""
    prefix = f"eval_{state}"
    kinds = {k[len(prefix) + 1:]: k for k in timings if k.startswith(prefix + "_")}
    return kinds or ({"all": prefix} if prefix in timings else {})


def started(run: dict) -> datetime | None:
    """When the run began: results.json's ``started_at``, else (runs from before it) the first timestamp of
    its run.log (the job log's '[YYYY-MM-DD HH:MM:SS,ms]', in the machine's local time)."""
    if run.get("started_at"):
        return datetime.fromisoformat(run["started_at"])
    log = Path(run["_path"]) / "run.log"
    if log.is_file():
        with log.open(errors="replace") as f:
            for line in f:
                if m := LOG_TIME.match(line):
                    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").astimezone()
    return None


def pruned_times(runs: list[dict]) -> list[dict[str, float]]:
    """Per run, the computed evaluation time of its pruned model per evaluator kind: its own, else that of the
    latest run of its group that computed it and started no later, the cache entry it reused (a new machine
    starts with an empty cache, so a later session's recomputation is never set against an earlier session's
    runs). A run of unknown start time gets its group's computation only when there is a single one."""
    begun = [started(run) for run in runs]
    own = []
    for run in runs:
        times = {kind: computed(run["timings"], stage) for kind, stage in eval_kinds(run["timings"], "pruned").items()}
        own.append(times if times and None not in times.values() else None)
    computers: dict[str, list[tuple[datetime | None, dict]]] = {}
    for run, start, times in zip(runs, begun, own):
        if times:
            computers.setdefault(pruned_group(run), []).append((start, times))
    out = []
    for run, start, times in zip(runs, begun, own):
        group = computers.get(pruned_group(run), [])
        earlier = [c for c in group if start and c[0] and c[0] <= start]
        out.append(times or (max(earlier, key=lambda c: c[0])[1] if earlier
                             else group[0][1] if len(group) == 1 else {}))
    return out


def rows(runs: list[dict]) -> list[dict]:
    out = []
    for run, base in zip(runs, pruned_times(runs)):
        t = run["timings"]
        recovered = {kind: computed(t, stage) for kind, stage in eval_kinds(t, "recovered").items()}
        ratios = {kind: sec / base[kind] for kind, sec in recovered.items() if sec is not None and kind in base}
        if recovered and set(ratios) == set(base) == set(recovered):  # every kind computed: the total too
            ratios["all"] = sum(recovered.values()) / sum(base.values())
        out.append({"run": Path(run["_path"]).name, "host": host_label(run["host"]),
                    **{s: computed(t, s) for s in SHOWN}, "pruned": base, "recovered": recovered,
                    "ratio": ratios})
    return out


def markdown(table: list[dict]) -> str:
    def sec(v):
        return "cached" if v is None else f"{v:.1f}"

    kinds = sorted({k for r in table for k in r["recovered"]})
    ratio_kinds = kinds if "all" in kinds else [*kinds, "all"]
    head = (["run", "host", *SHOWN] + [f"eval pruned {k}" for k in kinds] + [f"eval recovered {k}" for k in kinds]
            + [f"recovered / pruned {k}" for k in ratio_kinds])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["run"], r["host"], *(sec(r[s]) for s in SHOWN),
                 *(sec(r["pruned"].get(k)) for k in kinds), *(sec(r["recovered"].get(k)) for k in kinds),
                 *(f"{r['ratio'][k]:.3f}" if k in r["ratio"] else "–" for k in ratio_kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    for host in dict.fromkeys(r["host"] for r in table):
        overall = [r["ratio"]["all"] for r in table if r["host"] == host and "all" in r["ratio"]]
        if overall:
            spread = f", sd {statistics.stdev(overall):.3f}" if len(overall) > 1 else ""
            lines.append(f"\nRecovered / pruned evaluation time on {host}, {len(overall)} run(s): mean "
                         f"{statistics.mean(overall):.3f}{spread} (range {min(overall):.3f}–{max(overall):.3f}).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = ap.parse_args()
    text = markdown(rows(load_runs(args.folders)))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
