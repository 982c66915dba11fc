"""Many processes, one experiment or several: `torchrun --nproc_per_node=2` on the CPU (gloo) selects what
one process selects and trains the same adapter; two concurrent runs of one config compute each stage once.
These start real processes through run.py, as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA_DIR, ROOT, TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()
# PASER (chunked JSD and embedding scores) and LoRA with an effective batch of 4 in micro-batches of 1, so
# that each rank runs a share of every step; no dropout, so that both runs draw the same computation.
RUN = [o for o in TINY_RUN if not o.startswith(("selector=", "recovery."))] + [
    "selector=paser", "recovery.batch_size=4", "recovery.micro_batch_size=1", "recovery.epochs=2",
    "recovery.cutoff=128", "recovery.warmup_steps=0", "recovery.dropout=0.0", "recovery.val_size=5",
    "recovery.eval_every=1", "recovery.keep=best", f"paths.data_dir={DATA_DIR}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}


def launch(prefix: list[str], root, name: str, extra=()) -> subprocess.Popen:
    args = RUN + [f"paths.cache_dir={root / 'cache'}", f"hydra.run.dir={root / name}", *extra]
    return subprocess.Popen(prefix + [str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def adapter(root) -> dict:
    (path,) = (root / "cache" / "adapter").glob("*/adapter/adapter_model.safetensors")
    return load_file(path)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch([sys.executable], one, "run"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = finish(launch(torchrun, two, "run"))
    assert json.loads((two / "run" / "selected_indices.json").read_text()) == \
        json.loads((one / "run" / "selected_indices.json").read_text())
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    results = json.loads((two / "run" / "results.json").read_text())
    assert results["host"]["world_size"] == 2 and results["recovery"]["processes"] == 2
    single = json.loads((one / "run" / "results.json").read_text())["recovery"]
    assert [v["step"] for v in results["recovery"]["val_curve"]] == [v["step"] for v in single["val_curve"]]
    for got, want in zip(results["recovery"]["val_curve"], single["val_curve"]):  # split across ranks
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
    # the scoring is shared: every chunk computed once, by rank 0 or taken from rank 1. How many rank 1 takes
    # depends on timing since PASER's clustering is computed by rank 0 alone while rank 1 waits for it
    # (a loaded host can let rank 0 score all 7 small chunks first); the split itself: test_fsdp / chunk claims
    chunks = results["timings"]["select"]["chunks"]
    # PASER's clustering (a cache entry of its own) is computed once: rank 0 asked for it once (its counts, in
    # results.json), and of the two ranks exactly one logged reusing it (stored, or taken after waiting on the
    # other's claim), so 2 asks - 1 reuse = 1 computation; rank 1's own counts are not in results.json
    assert sum(chunks["results/paser_clustering"].values()) == 1, chunks
    assert out.count("stage 'results/paser_clustering': reusing") == 1, out[-4000:]
    jsd = next(v for k, v in chunks.items() if k.startswith("scores/jsd"))
    assert jsd["computed"] + jsd["other"] == sum(jsd.values()) > 0, chunks
    assert not (two / "run" / "results.json.rank1").exists()


def test_two_concurrent_runs_of_one_config_compute_each_stage_once(tmp_path):
    procs = [launch([sys.executable], tmp_path, f"job{i}") for i in range(2)]
    for p in procs:
        finish(p)
    runs = [json.loads((tmp_path / f"job{i}" / "results.json").read_text()) for i in range(2)]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    for stage in ("eval_dense", "prune", "eval_pruned", "select", "recover", "eval_recovered"):
        sources = sorted(r["timings"][stage]["source"] for r in runs)
        assert sources.count("computed") == 1, (stage, sources)
    computed = {}
    for r in runs:
        for stage, counts in r["timings"]["select"].get("chunks", {}).items():
            computed[stage] = computed.get(stage, 0) + counts["computed"]
    assert computed and all(n == 1 for n in computed.values()), computed  # one chunk per score array


def test_fsdp_recovery_on_two_ranks_trains_the_one_process_adapter_and_resumes(tmp_path):
    """recovery.fsdp=true: weights and optimizer state sharded over 2 gloo ranks; uneven micro-batch and
    validation counts per rank (weight-0 copies keep the collectives in step); checkpoints gathered from the
    shards resume to the same adapter."""
    from peft.utils import get_peft_model_state_dict

    from tests import fsdp_worker

    model, report = fsdp_worker.recover(tmp_path / "one_work", fsdp=False)
    one = {k: v.float() for k, v in get_peft_model_state_dict(model).items()}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def run(out, workdir):
        proc = subprocess.run(torchrun + [str(ROOT / "tests" / "fsdp_worker.py"), str(out), str(workdir)],
                              cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return load_file(out / "adapter.safetensors"), json.loads((out / "report.json").read_text())

    sharded, sharded_report = run(tmp_path / "fsdp", tmp_path / "fsdp_work")
    assert sharded_report["fsdp"] and sharded_report["processes"] == 2 and not report["fsdp"]
    assert sharded.keys() == one.keys()
    for name, want in one.items():
        torch.testing.assert_close(sharded[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert [v["step"] for v in sharded_report["val_curve"]] == [v["step"] for v in report["val_curve"]]
    for got, want in zip(sharded_report["val_curve"], report["val_curve"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)
    # the first run left its last checkpoint (step 6 of 8) in its work folder: a rerun resumes from it
    assert json.loads((tmp_path / "fsdp_work" / "checkpoint" / "state.json").read_text())["step"] == 6
    resumed, _ = run(tmp_path / "resumed", tmp_path / "fsdp_work")
    for name in sharded:
        torch.testing.assert_close(resumed[name], sharded[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------- SLURM (srun) ranks

SRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
             "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
             "SLURM_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def srun_env(monkeypatch):
    """Sets the given variables after clearing every launcher variable."""
    for name in SRUN_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_env


def test_an_srun_task_is_a_rank_on_its_local_gpu(srun_env, monkeypatch):
    from paser import distributed
    from paser.hardware import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    srun_env(SLURM_STEP_NUM_TASKS=16, SLURM_NTASKS=16, SLURM_PROCID=11, SLURM_LOCALID=3)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (16, 11, 3)
    assert not distributed.is_main()
    assert resolve_device("auto") == torch.device("cuda", 3)  # each task its own GPU, not all of them cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: one GPU visible
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_torchrun_inside_slurm_and_a_batch_script_process_keep_their_own_ranks(srun_env):
    from paser import distributed

    srun_env(SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1, WORLD_SIZE=16, RANK=5, LOCAL_RANK=5)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (16, 5, 5)
    # the batch script of an 8-task job runs python itself: no srun step, one process
    for name in ("SLURM_STEP_NUM_TASKS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(name)
    srun_env(SLURM_NTASKS=8, SLURM_PROCID=0, SLURM_LOCALID=0)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, None)


@pytest.mark.parametrize("nodelist, host", [("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"),
                                             ("a[1-2]-b[07-09],c", "a1-b07"), ("n1,n2", "n1")])
def test_the_rendezvous_is_the_first_node_of_the_step(srun_env, nodelist, host):
    from paser import distributed

    srun_env(SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NODELIST="other[1-4]", SLURM_JOB_ID=1234567)
    assert distributed.rendezvous() == (host, str(20000 + 1234567 % 20000))
    srun_env(MASTER_ADDR="10.0.0.2", MASTER_PORT=29555)
    assert distributed.rendezvous() == ("10.0.0.2", "29555")


SRUN_TASK = """
import torch
from paser import distributed
distributed.init(torch.device("cpu"))
total = torch.tensor([distributed.rank() + 1.0])
distributed.sum_across_ranks([total])
print(distributed.rank(), distributed.world_size(), distributed.local_rank(), int(total))
distributed.shutdown()
"""


def _free_job_id() -> int:
    """A SLURM job id whose derived rendezvous port (20000 + id mod 20000) is free on this host."""
    import socket

    for job in range(1000 + os.getpid() % 15000, 20000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-39999")


def test_two_srun_tasks_form_one_process_group_without_torchrun(tmp_path):
    """What ``srun --ntasks=2 python ...`` starts, without SLURM: two processes with only the step's variables
    join one gloo group at the first node's derived port and sum across it."""
    env = {k: v for k, v in ENV.items() if k not in SRUN_VARS}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
               SLURM_JOB_ID=str(_free_job_id()), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", SRUN_TASK], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in range(2)]
    lines = sorted(finish(p).strip().splitlines()[-1] for p in procs)
    assert lines == ["0 2 0 3", "1 2 1 3"]


def test_the_multi_gpu_slurm_preset_starts_one_task_per_gpu():
    from paser.compose import compose

    cfg = compose(["hydra/launcher=cluster_multigpu", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")  # its batch script runs srun
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 2


@pytest.mark.slow  # two ranks through every stage: ~2-3 min on the shared 2-core test host
def test_fsdp_run_on_two_ranks_reaches_results_with_recovered_metrics(tmp_path):
    """recovery.fsdp=true through run.py: rank 1 builds the (structured-pruned) model on meta and its shards
    take rank 0's weights; the recovered model is evaluated by rank 0 alone on a fresh pruned model with the
    stored adapter (on the sharded model rank 0 alone would wait forever in an all-gather)."""
    args = [o for o in RUN if not o.startswith(("selector=", "pruner="))] + [
        "selector=random", "pruner=llm_pruner", "recovery.fsdp=true", f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(torchrun + [str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = finish(proc)
    assert "rank 1 builds the pruned model on meta" in out, out[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["recovery"]["fsdp"] and results["recovery"]["processes"] == 2
    recovered = results["metrics"]["recovered"]["ppl"]
    assert all(recovered[c]["ppl"] > 1 for c in ("wikitext2", "ptb")), recovered
    assert results["timings"]["eval_recovered"]["source"] == "computed"
