"""LoRA recovery of the tiny Llama with ``recovery.fsdp=true``, run by tests/test_distributed.py under
``torchrun`` (gloo on the CPU): ``python -m torch.distributed.run ... tests/fsdp_worker.py OUT WORKDIR``.
As in the pipeline, rank 0 reads the model's weights and the other ranks build it on meta (their shards get
rank 0's values). Rank 0 writes the trained adapter's weights (peft's names) to OUT/adapter.safetensors and
the report to OUT/report.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from paser import distributed
from paser.models import load_saved, save_model, tiny_llama
from paser.recovery import LoraRecovery

SAMPLES = [{"instruction": f"Repeat the word number {k}.", "input": "" if k % 2 else "now",
            "output": f"word {k} " * (1 + k % 3)} for k in range(12)]
VAL = [{"instruction": f"Count to {k}.", "input": "", "output": " ".join(map(str, range(k)))} for k in range(2, 7)]
# 3 micro-batches per step and 5 validation samples: on 2 ranks one of them runs a weight-0 copy
RECIPE = {"r": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-3, "epochs": 2, "batch_size": 3, "micro_batch_size": 1,
          "cutoff": 256, "warmup_steps": 0, "dtype": "bfloat16", "checkpoint_every": 3, "seed": 0, "val_size": 5, "eval_every": 2,
          "keep": "best"}


def recover(workdir, fsdp: bool, model=None):
    tiny, tok = tiny_llama()
    return LoraRecovery(**RECIPE, fsdp=fsdp).recover(model or tiny, tok, SAMPLES, workdir, val_samples=VAL)


def main(out: Path, workdir: Path) -> None:
    distributed.init(torch.device("cpu"))
    saved = out.with_name(out.name + "_model")
    if distributed.is_main():
        save_model(*tiny_llama(), saved)
    distributed.barrier()
    model, _ = load_saved(saved, device="cpu" if distributed.is_main() else "meta")
    if not distributed.is_main():
        assert {p.device.type for p in model.parameters()} == {"meta"}
    trained, report = recover(workdir, fsdp=True, model=model)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file(trained.weights, out / "adapter.safetensors")
        (out / "report.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
