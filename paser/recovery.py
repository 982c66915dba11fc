"""Recovery of a pruned model by fine-tuning: LoRA adapters (peft; LLM-Pruner's recipe is the default) or
every weight (``FullFineTuning``, LLM-Pruner's other baseline), through one training loop (``FineTuning``).
Each owns its artifact: ``save`` writes what ``recover`` trained, ``load`` rebuilds the model for evaluation
from the pruned model and that folder (LoRA: the adapter merged into the weights).

The loop is deliberately plain: Alpaca-templated samples, loss on the response tokens only, gradient
accumulation up to the effective batch, AdamW with linear warm-up and decay (the HF Trainer default
schedule the reference recipe uses). Every ``checkpoint_every`` optimizer steps the trained weights, optimizer,
scheduler and RNG state are saved atomically (written aside with each file's sha256, fsync'ed, renamed into
place; the checkpoint before it is kept), so a killed run resumes from the newest intact checkpoint and ends
with the same weights as an uninterrupted one.

Under torchrun the loop is data parallel (paser.distributed): every rank walks the same batch order, runs
the micro-batches k ≡ rank (mod world size) of each effective batch, and the gradients and losses are
summed across ranks before the optimizer step, which every rank then takes identically. The effective
batch, the loss normalisation (mean over the effective batch's response tokens) and the schedule are those
of one process. The gradients are summed by one flat all-reduce rather than by wrapping the model in DDP:
with a small effective batch a rank can get fewer micro-batches than another (or none), which DDP's
per-backward synchronisation cannot express. Only rank 0 writes checkpoints. With ``fsdp: true`` the
weights and optimizer state are sharded over the ranks instead (paser.sharding; same batches, same loss).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from paser import distributed, sharding, tracking
from paser.data import encode_pool
from paser.errors import ConfigError, TrainingError
from paser.fingerprint import file_sha256
from paser.models import torch_dtype
from paser.progress import tqdm
from paser.scoring import answer_spans, logits_at, pad_right, span_index, to_host

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
DIGESTS = "digests.json"  # each file's sha256, written last into a checkpoint
CHECKPOINT_FILES = {"adapter.safetensors", "trainer_state.pt", "state.json"}  # and best.safetensors with keep=best
KEEP = ("last", "best")


def linear_warmup_decay(optimizer, total_steps: int, warmup_steps: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """HF Trainer's default schedule: the learning rate rises linearly over ``warmup_steps`` (from
    1 / (warmup_steps + 1) of it), then falls linearly to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FineTuning:
    """The training loop the recoveries share, and the Recovery contract (paser.components): ``recover``
    trains, ``save`` / ``load`` store and rebuild the artifact, and ``val_size`` / ``val_seed`` declare the validation rows the pipeline holds out for it. A subclass says which
    weights train (``prepare``), with what optimizer and schedule, and what it stores."""

    # checkpoints only decide where a killed run resumes, FSDP only where the weights live: the trained
    # weights are the same
    neutral_knobs = ("checkpoint_every", "fsdp")
    label = "recovery"  # the progress bar's

    def __init__(self, epochs: int, batch_size: int, micro_batch_size: int, cutoff: int, dtype: str,
                 checkpoint_every: int, seed: int, val_size: int, val_seed: int, eval_every: int, keep: str,
                 fsdp: bool = False):
        if dtype == "float16":
            raise ConfigError("recovery.dtype=float16 is refused: LLaMA-family models overflow to NaN in "
                              "fp16 training; use bfloat16 (or float32)")
        if batch_size % micro_batch_size:
            raise ConfigError(f"recovery.batch_size={batch_size} must be a multiple of "
                              f"recovery.micro_batch_size={micro_batch_size}")
        if epochs <= 0:
            raise ConfigError(f"recovery.epochs ({epochs}) must be > 0")
        if keep not in KEEP:
            raise ConfigError(f"recovery.keep='{keep}' is unknown; allowed: {list(KEEP)}")
        if keep == "best" and val_size <= 0:
            raise ConfigError("recovery.keep=best needs a validation set: set recovery.val_size > 0")
        if val_size < 0 or eval_every < 0:
            raise ConfigError(f"recovery.val_size ({val_size}) and recovery.eval_every ({eval_every}) must be >= 0")
        # the validation rows are drawn from the pool by val_seed alone, before selection (paser.data.hold_out)
        self.val_size, self.val_seed, self.eval_every, self.keep = int(val_size), int(val_seed), int(eval_every), keep
        self.epochs, self.batch_size, self.micro_batch_size, self.cutoff = epochs, batch_size, micro_batch_size, cutoff
        self.dtype = torch_dtype(dtype)
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.fsdp = bool(fsdp)

    # ------------------------------------------------------------------ what a subclass says

    def prepare(self, model) -> torch.nn.Module:
        """The model to train, in the training dtype, with exactly the trained weights requiring grad."""
        raise NotImplementedError

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def make_scheduler(self, optimizer, total_steps: int):
        raise NotImplementedError

    def trained(self, model, masters, sharded: bool):
        """What ``recover`` returns and ``save`` stores, once the loop has ended (``masters`` finished)."""
        raise NotImplementedError

    def save(self, trained, folder: Path) -> None:
        raise NotImplementedError

    def load(self, base_model, folder: Path) -> torch.nn.Module:
        """The recovered model for evaluation, from the pruned model and a folder ``save`` wrote."""
        raise NotImplementedError

    def _epoch_order(self, n: int, epoch: int) -> list[int]:
        """The epoch's sample order: a function of (seed, epoch) only, so a resumed run walks the same."""
        order = list(range(n))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        return order

    # -------------------------------------------------------------------------------- training

    def recover(self, model, tokenizer, samples: list[dict], workdir, val_samples=()) -> tuple[object, dict]:
        """Fine-tune ``model`` on ``samples`` (checkpointing into ``workdir``, resuming from it); returns (what
        ``save`` stores, report with the loss curve). Under torchrun every rank calls it (data parallel).

        With ``val_samples`` (the pipeline holds out ``val_size`` of them, see paser.pipeline), their mean
        response loss is evaluated every ``eval_every`` steps (0: at the end of every epoch), as the
        reference recipe does, and ``keep=best`` ends with the weights of the lowest validation loss."""
        workdir = Path(workdir)
        if not samples:
            raise ConfigError("recovery got an empty selection: nothing to train on")
        torch.manual_seed(self.seed)
        model = self.prepare(model)
        sharded = self.fsdp and distributed.active()
        if self.fsdp and not sharded:
            log.info("recovery.fsdp=true in one process: nothing to shard, training as usual")
        if sharded:
            sharding.shard(model, self.dtype)
        torch.manual_seed(self.seed + distributed.rank())  # dropout masks: each rank draws its own
        encoded = encode_pool(tokenizer, samples, self.cutoff)
        val = encode_pool(tokenizer, list(val_samples), self.cutoff) if val_samples else []
        steps_per_epoch = math.ceil(len(encoded) / self.batch_size)
        total_steps = steps_per_epoch * self.epochs
        masters = sharding.ShardedWeights(model) if sharded else MasterWeights(model)
        optimizer = self.make_optimizer(masters.tensors())
        scheduler = self.make_scheduler(optimizer, total_steps)
        state = {"step": 0, "losses": [], "val": [], "best": None}
        best = {}
        ckpt = workdir / CHECKPOINT
        saved = _latest_checkpoint(ckpt)
        if saved is not None:
            state, best = self._load_checkpoint(saved, model, masters, optimizer, scheduler)
            log.info("recovery: resuming from checkpoint %s at step %d/%d", saved, state["step"], total_steps)

        model.train()
        pad = tokenizer.pad_token_id
        start = time.time()
        with training_attention(model) as attention:
            state = self._train(model, masters, optimizer, scheduler, encoded, val, state, best, ckpt,
                                steps_per_epoch, total_steps, pad)
        best = state.pop("best_weights")
        if self.keep == "best" and best:
            masters.load(best)
        masters.finish()
        model.eval()
        trained = self.trained(model, masters, sharded)
        report = {"steps": total_steps, "samples": len(encoded), "epochs": self.epochs,
                  "effective_batch": self.batch_size, "truncated": sum(e.truncated for e in encoded),
                  "processes": distributed.world_size(), "fsdp": sharded, "attention": attention,
                  "loss_curve": state["losses"], "final_loss": state["losses"][-1]["loss"],
                  "val_size": len(val), "val_curve": state["val"], "best": state["best"], "kept": self.keep,
                  "train_time_s": time.time() - start}
        return trained, report

    def _train(self, peft_model, masters, optimizer, scheduler, encoded, val, state, best, ckpt,
               steps_per_epoch: int, total_steps: int, pad: int) -> dict:
        """The optimizer steps from ``state["step"]`` on; returns the state with ``best_weights``."""
        bar = tqdm(total=total_steps, initial=state["step"], desc=self.label, unit="step",
                   disable=not distributed.is_main())
        orders: dict[int, list[int]] = {}
        for step in range(state["step"], total_steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch not in orders:  # one shuffle per epoch, not per step
                orders[epoch] = self._epoch_order(len(encoded), epoch)
            order = orders[epoch]
            batch = order[in_epoch * self.batch_size:(in_epoch + 1) * self.batch_size]
            loss = self._optimizer_step(peft_model, masters, optimizer, [encoded[i] for i in batch], pad)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"recovery loss became {loss} at step {step + 1}; training stopped. The last good "
                    f"checkpoint (step {state['step']}) is kept in {ckpt}. Lower recovery.lr or use "
                    "float32/bfloat16.")
            scheduler.step()
            state["losses"].append({"step": step + 1, "epoch": epoch, "loss": loss,
                                    "lr": scheduler.get_last_lr()[0]})
            tracking.live({"recovery/step": step + 1, "recovery/loss": loss, "recovery/lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            every = self.eval_every or steps_per_epoch
            if val and ((step + 1) % every == 0 or step + 1 == total_steps):
                val_loss = self._val_loss(peft_model, val, pad, masters)
                state["val"].append({"step": step + 1, "loss": val_loss})
                log.info("recovery: step %d validation loss %.4f", step + 1, val_loss)
                tracking.live({"recovery/step": step + 1, "recovery/val_loss": val_loss})
                if state["best"] is None or val_loss < state["best"]["loss"]:
                    state["best"], best = {"step": step + 1, "loss": val_loss}, masters.state()
            if (step + 1) % self.checkpoint_every == 0 and step + 1 < total_steps:
                state["step"] = step + 1
                self._save_checkpoint(ckpt, peft_model, masters, optimizer, scheduler, state, best)
        bar.close()
        return {**state, "best_weights": best}

    def _my_micro_batches(self, starts: list[int], masters) -> list[tuple[int, float]]:
        """(start, weight) of this rank's micro-batches k ≡ rank (mod world size). Under FSDP every forward
        and backward is a collective, so a rank with fewer micro-batches adds copies of the first one with
        weight 0 until every rank runs as many."""
        mine = [(k, 1.0) for k in starts[distributed.rank()::distributed.world_size()]]
        if masters.same_backwards:
            mine += [(starts[0], 0.0)] * (math.ceil(len(starts) / distributed.world_size()) - len(mine))
        return mine

    def _optimizer_step(self, model, masters: MasterWeights, optimizer, batch, pad_id: int) -> float:
        """One optimizer step over an effective batch; the loss is the mean over its response tokens.

        The batch's samples are grouped by length into micro-batches (HF Trainer's ``group_by_length``
        inside one step: the same samples and the same loss, less padding). Under torchrun this rank runs
        its share of the micro-batches and the gradients are summed over ranks."""
        n_targets = sum(len(e.input_ids) - max(e.prompt_len, 1) for e in batch)
        if n_targets == 0:  # every response truncated away: nothing to learn from this batch
            optimizer.zero_grad(set_to_none=True)
            return 0.0
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        batch = sorted(batch, key=lambda e: -len(e.input_ids))
        micro_starts = list(range(0, len(batch), self.micro_batch_size))
        for k, weight in self._my_micro_batches(micro_starts, masters):
            nll = response_nll(model, batch[k:k + self.micro_batch_size], pad_id, device) * weight
            (nll * masters.grad_scale / n_targets).backward()
            masters.accumulate()
            total += nll.detach().double()
        grads = masters.collect_grads()  # fp32, zeros where this rank had no micro-batch
        distributed.sum_across_ranks(grads + [total])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masters.push()
        return total.item() / n_targets

    @torch.no_grad()
    def _val_loss(self, model, val: list, pad_id: int, masters) -> float:
        """Mean response-token NLL over the validation samples (dropout off); split across ranks."""
        model.eval()
        device = next(model.parameters()).device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL, targets
        val = sorted(val, key=lambda e: -len(e.input_ids))
        starts = list(range(0, len(val), self.micro_batch_size))
        for k, weight in self._my_micro_batches(starts, masters):
            micro = val[k:k + self.micro_batch_size]
            sums[0] += response_nll(model, micro, pad_id, device).double() * weight
            sums[1] += sum(len(e.input_ids) - max(e.prompt_len, 1) for e in micro) * weight
        distributed.sum_across_ranks([sums])
        model.train()
        return float(to_host(sums[0] / sums[1].clamp_min(1)))

    # ---------------------------------------------------------------------- checkpoints

    @staticmethod
    def _save_checkpoint(path: Path, model, masters: MasterWeights, optimizer, scheduler, state: dict,
                         best: dict) -> None:
        """Every rank calls this (sharded weights are gathered, each rank's RNG state kept); rank 0 writes it
        into ``<path>.tmp`` with each file's sha256, fsyncs it (a crash must not leave a renamed checkpoint
        whose data never reached the disk) and renames it into place, keeping the one before as
        ``<path>.prev`` for a resume that finds the newest damaged."""
        from safetensors.torch import save_file

        weights, optimizer_state = masters.state(), masters.optimizer_state(model, optimizer)
        rng = distributed.gather(_rng_state(next(model.parameters()).device))
        if not distributed.is_main():
            return
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "adapter.safetensors")
        if best:
            save_file(best, tmp / "best.safetensors")
        # batch order is a function of (seed, epoch); only dropout draws from the torch RNG, one per rank
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "torch_rng": rng},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / DIGESTS).write_text(json.dumps({f.name: file_sha256(f) for f in sorted(tmp.iterdir())}))
        for f in [*tmp.iterdir(), tmp]:
            _fsync(f)
        prev = path.with_name(path.name + ".prev")
        if path.exists():
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(path, prev)
        os.replace(tmp, path)
        _fsync(path.parent)

    @staticmethod
    def _load_checkpoint(path: Path, model, masters: MasterWeights, optimizer, scheduler) -> dict:
        from safetensors.torch import load_file

        masters.load(load_file(path / "adapter.safetensors"))
        best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else {}
        trainer = torch.load(path / "trainer_state.pt", weights_only=True)
        masters.load_optimizer_state(model, optimizer, trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        rng = trainer["torch_rng"]  # one per rank of the run that saved it
        _set_rng_state(rng[distributed.rank() % len(rng)], next(model.parameters()).device)
        return json.loads((path / "state.json").read_text()), best


class LoraRecovery(FineTuning):
    """LoRA adapters on ``target_modules``; the stored artifact is peft's adapter folder."""

    label = "LoRA recovery"

    # the defaults are LLM-Pruner's recipe, as conf/recovery/lora.yaml states them (a test holds the two equal)
    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                 lr: float = 1e-4, epochs: int = 2, batch_size: int = 64, micro_batch_size: int = 4,
                 cutoff: int = 256, warmup_steps: int = 100, weight_decay: float = 0.0,
                 dtype: str = "bfloat16", checkpoint_every: int = 10, seed: int = 0, val_size: int = 2000,
                 val_seed: int = 0, eval_every: int = 100, keep: str = "best", fsdp: bool = False):
        super().__init__(epochs=epochs, batch_size=batch_size, micro_batch_size=micro_batch_size, cutoff=cutoff,
                         dtype=dtype, checkpoint_every=checkpoint_every, seed=seed, val_size=val_size,
                         val_seed=val_seed, eval_every=eval_every, keep=keep, fsdp=fsdp)
        if lr <= 0:
            raise ConfigError(f"recovery.lr ({lr}) must be > 0")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps

    # -------------------------------------------------------------------------------- setup

    def prepare(self, model):
        return self.wrap(model)

    def wrap(self, model):
        from peft import LoraConfig, get_peft_model

        model.to(self.dtype)
        self._check_targets(model)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")
        # adapters in the model's dtype: bf16 LoRA matmuls (fp32 ones cost a cast of every LoRA input and
        # the slow fp32 path); the optimizer keeps fp32 master weights (MasterWeights)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
        for module in peft_model.modules():
            for name, layer in getattr(module, "lora_dropout", {}).items():
                if isinstance(layer, torch.nn.Dropout):
                    module.lora_dropout[name] = HostDropout(layer.p)
        return peft_model

    def _check_targets(self, model) -> None:
        """Every ``target_modules`` name must name a layer of this model: peft only refuses when none does,
        so a fused projection (Baichuan's W_pack instead of q/k/v) or expert banks stored as 3-D parameters
        (Mixtral) would silently train fewer adapters than the recipe says."""
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in self.target_modules if t not in names]
        if missing:
            raise ConfigError(
                f"recovery.target_modules names {missing}, which {type(model).__name__} has no Linear layer "
                f"of; its Linear layers are {sorted(names)}. Set recovery.target_modules to the ones to adapt "
                "(e.g. [W_pack, o_proj, gate_proj, up_proj, down_proj] for Baichuan2, the attention "
                "projections for Mixtral, whose experts are not Linear layers)")

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer, total_steps: int):
        return linear_warmup_decay(optimizer, total_steps, self.warmup_steps)

    # -------------------------------------------------------------------------------- the artifact

    def trained(self, model, masters, sharded: bool):
        return sharding.AdapterWeights(model, masters.state()) if sharded else model

    def save(self, trained, folder: Path) -> None:
        trained.save_pretrained(folder)  # a PeftModel, or the adapter gathered from FSDP shards

    def load(self, base_model, folder: Path) -> torch.nn.Module:
        from peft import PeftModel

        return merged(PeftModel.from_pretrained(base_model, folder))


def merged(peft_model):
    """The base model with the LoRA weights folded in (W + BA·α/r), in eval mode: it runs at the pruned model's
    speed. Consumes ``peft_model``: its base modules are modified in place."""
    return peft_model.merge_and_unload().eval()


class FullFineTuning(FineTuning):
    """Every weight of the pruned model trained (LLM-Pruner's other recovery baseline); the stored artifact is
    the whole model's weights. The optimizer and the schedule are built from the config (``_partial_``
    ``_target_`` nodes, as torchtune builds them), by default AdamW and linear warm-up and decay. The loop
    keeps fp32 master weights and optimizer state for every weight: memory for a small model, not a 7B one
    on one GPU."""

    label = "full fine-tuning"
    neutral_knobs = ("checkpoint_every",)

    def __init__(self, optimizer=None, scheduler=None, epochs: int = 2, batch_size: int = 64,
                 micro_batch_size: int = 4, cutoff: int = 256, dtype: str = "bfloat16", checkpoint_every: int = 10,
                 seed: int = 0, val_size: int = 2000, val_seed: int = 0, eval_every: int = 100, keep: str = "best"):
        super().__init__(epochs=epochs, batch_size=batch_size, micro_batch_size=micro_batch_size, cutoff=cutoff,
                         dtype=dtype, checkpoint_every=checkpoint_every, seed=seed, val_size=val_size,
                         val_seed=val_seed, eval_every=eval_every, keep=keep)
        self.optimizer = optimizer or functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.0)
        self.scheduler = scheduler or functools.partial(linear_warmup_decay, warmup_steps=100)
        for key, built in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            if not callable(built):
                raise ConfigError(f"recovery.{key} must be a _target_ node with _partial_: true (got {built!r})")

    def prepare(self, model):
        model.to(self.dtype)
        model.requires_grad_(True)
        return model

    def make_optimizer(self, params):
        return self.optimizer(params)

    def make_scheduler(self, optimizer, total_steps: int):
        return self.scheduler(optimizer, total_steps=total_steps)

    def trained(self, model, masters, sharded: bool):
        return model.to(self.dtype)  # the fp32 masters rounded to the training dtype, as the pruned model is stored

    def save(self, trained, folder: Path) -> None:
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        save_model(trained, str(folder / "model.safetensors"))  # tied weights stored once

    def load(self, base_model, folder: Path) -> torch.nn.Module:
        from safetensors.torch import load_model

        base_model.to(self.dtype)
        load_model(base_model, str(folder / "model.safetensors"))
        return base_model.eval()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint in ``path`` if it is complete and every file has the sha256 recorded when
    it was written, else None (logged: a damaged checkpoint is skipped, not loaded)."""
    try:
        digests = json.loads((path / DIGESTS).read_text())
        bad = sorted(CHECKPOINT_FILES - digests.keys()) + [
            name for name, digest in digests.items() if file_sha256(path / name) != digest]
        if not bad:
            return int(json.loads((path / "state.json").read_text())["step"])
        problem = f"{', '.join(bad)} missing or changed since it was written"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
    log.warning("recovery: checkpoint %s is incomplete or damaged (%s): not resuming from it", path, problem)
    return None


def _latest_checkpoint(path: Path) -> Path | None:
    """The newest intact checkpoint: ``path``, the one before it (``.prev``), or one that was complete but
    not yet renamed into place when its writer was killed (``.tmp``); None to start over."""
    steps = {}
    for candidate in (path, path.with_name(path.name + ".prev"), path.with_name(path.name + ".tmp")):
        if candidate.is_dir() and (step := _checkpoint_step(candidate)) is not None:
            steps[candidate] = step
    return max(steps, key=steps.get, default=None)


def _rng_state(device: torch.device) -> dict:
    """The generators dropout draws from: the CPU's, and the model's CUDA device's when it has one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def training_attention(peft_model):
    """Train with eager attention on the CPU, yielding the implementation used; the model's own is restored
    after. On the CPU the backward of SDPA's flash attention cost 4x its forward (a fifth of a SmolLM2 LoRA
    step, torch profiler); eager attention's backward is a few batched matmuls, and its steps were 15%
    faster with the same losses (bf16 rounding). Other devices keep the model's implementation."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    own = getattr(base.config, "_attn_implementation", None)
    device = next(base.parameters()).device
    if device.type != "cpu" or own in (None, "eager"):
        yield own
        return
    base.set_attn_implementation("eager")
    try:
        yield "eager"
    finally:
        base.set_attn_implementation(own)


class HostDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask, on the CPU, comes from 16-bit slices of 64-bit random integers: four mask
    entries per draw of the torch generator instead of one, which made the LoRA inputs' dropout (a quarter
    of a CPU training step with torch's Bernoulli sampler) 4-5x cheaper. The drop probability is rounded to
    a multiple of 2^-16 (0.05 → 0.0500031); kept entries are scaled by 1/(1 − p) in fp32 before rounding to
    the input's dtype. On other devices, and in eval mode, it is ``nn.Dropout``."""

    LEVELS = 1 << 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        draws = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
        lanes = draws.view(torch.int16)[:x.numel()].view(x.shape)
        keep = lanes >= round(self.p * self.LEVELS) - self.LEVELS // 2  # int16 uniform on [-2^15, 2^15)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0)


class MasterWeights:
    """fp32 master copies of the trainable parameters, as mixed-precision training keeps them: forward and
    backward run in the model's dtype (bf16 matmuls, which the hardware is fast at), while the optimizer
    updates fp32 copies, so that updates smaller than half a bf16 step of a weight still accumulate. For
    fp32 parameters the master *is* the parameter."""

    same_backwards, grad_scale = False, 1.0  # see paser.sharding.ShardedWeights

    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                        for _, p in self.named]
        # the parameters kept in a lower precision, their masters and the masters' fp32 gradient sums: the
        # updates below are one foreach op over all of them, not a Python iteration and a kernel per tensor
        # (LoRA has two per adapted projection: 448 for the seven projections of a 32-layer 7B)
        self.mixed = [(p, m) for (_, p), m in zip(self.named, self.masters) if m is not p]
        self.sums = [torch.zeros_like(m) for _, m in self.mixed]

    def tensors(self) -> list[torch.Tensor]:
        return self.masters

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move the gradients of the last backward into fp32 sums on the masters: accumulating over the
        micro-batches of a step in bf16 would lose precision (and make the sum depend on how the
        micro-batches are split across ranks)."""
        fresh = [(p, m, s) for (p, m), s in zip(self.mixed, self.sums) if p.grad is not None]
        if not fresh:
            return
        if any(m.grad is None for _, m, _ in fresh):  # the first backward since the optimizer step
            torch._foreach_zero_(self.sums)
            for (_, m), s in zip(self.mixed, self.sums):
                m.grad = s
        torch._foreach_add_([s for _, _, s in fresh], [p.grad for p, _, _ in fresh])
        for p, _, _ in fresh:
            p.grad = None

    def collect_grads(self) -> list[torch.Tensor]:
        """The step's fp32 gradients on the masters (zeros for a parameter that got none)."""
        self.accumulate()
        for m in self.masters:
            if m.grad is None:
                m.grad = torch.zeros_like(m)
        return [m.grad for m in self.masters]

    @torch.no_grad()
    def push(self) -> None:
        """Copy the updated masters into the model's parameters (rounded to their dtype)."""
        if self.mixed:
            torch._foreach_copy_([p for p, _ in self.mixed], [m for _, m in self.mixed])

    def state(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().to("cpu", copy=True).contiguous() for (n, _), m in zip(self.named, self.masters)}

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        for (n, _), m in zip(self.named, self.masters):
            m.copy_(weights[n])
        self.push()

    @torch.no_grad()
    def finish(self) -> None:
        """The trained adapter keeps its fp32 weights (what is stored and merged for evaluation)."""
        for (_, p), m in zip(self.named, self.masters):
            p.data = m.detach()

    @staticmethod
    def optimizer_state(model, optimizer) -> dict:
        return optimizer.state_dict()

    @staticmethod
    def load_optimizer_state(model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


def response_nll(model, micro: list, pad_id: int, device) -> torch.Tensor:
    """Summed next-token NLL over the response tokens of a micro-batch of EncodedSamples.

    Only the positions that predict a response token go through the LM head and the fp32 log-softmax
    (``paser.scoring.logits_at``): the prompt positions' full-vocabulary logits (often half the tokens; 262K
    columns for Gemma) are never formed. Models that post-process their logits (soft-capping, a logit scale)
    and sharded models (whose forward hooks gather the weights) run whole.
    """
    ids, mask = pad_right([e.input_ids for e in micro], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    spans = answer_spans([len(e.input_ids) for e in micro], [e.prompt_len for e in micro])
    rows, cols = span_index(spans, device)
    logits = logits_at(model, ids, mask, whole=sharding.is_sharded(model))(rows, cols)
    # a device_map model's logits come from the LM head's GPU, its inputs sit on the embeddings' one: the
    # targets join the logits, the summed loss comes back to the inputs' device (the step's totals are there)
    targets = ids[rows, cols + 1].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").to(device)
