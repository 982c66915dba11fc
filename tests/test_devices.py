"""Every compute stage keeps its tensors on the model's device, checked on a CPU-only machine.

A test that only sees CPU tensors cannot catch a tensor left on the host while the model sits on an
accelerator. These tests run each stage under torch's FakeTensorMode with the model on a fake accelerator:
fake tensors carry shape, dtype and device but no data, and any op that mixes devices raises
FakeTensorDeviceMismatchError, as CUDA would (CPU scalars excepted, as on CUDA).

The fake accelerator is the ``meta`` device. In a CPU-only build fake *CUDA* tensors exist but can neither
be indexed (the CUDA device guard is missing: ``t[1:]`` raises) nor take part in autograd (the process
aborts), so a model cannot run on them; fake meta tensors have a kernel for every op, and FakeTensorMode
treats meta as a device of its own, distinct from the CPU. ``scripts/gpu_smoke.sh`` checks the same stages
on a real GPU.

Values do not exist on fake tensors, so data-dependent steps (``.item()``, ``.numpy()``, ``nonzero``) are
impossible. The stages are written so that the device work has none: results reach the host through
``paser.scoring.to_host`` only, which these tests replace by a stand-in that asserts that the tensor is on
the accelerator and returns zeros of its shape. Two host-side decisions are stood in for the same way:
SparseGPT's Cholesky retry loop (it branches on the factorisation's status) and the pruners' sparsity
report (it counts zeros).
"""

from __future__ import annotations

import copy
import mmap

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from transformers import LlamaForCausalLM

from paser.evaluation import perplexity as perplexity_module
from paser.evaluation import shared_context_lm
from paser.evaluation.shared_context_lm import SharedContextHFLM
from paser.evaluation.zeroshot import split_over_devices
from paser.models import tiny_llama
from paser.pruners import common, magnitude, sparsegpt, taylor, wanda
from paser.pruners.llm_pruner import LLMPruner
from paser.pruners.llm_pruner_channel import LLMPrunerChannel
from paser.pruners.magnitude import MagnitudePruner
from paser.pruners.sparsegpt import SparseGPTPruner
from paser.pruners.wanda import WandaPruner
from paser.selectors import lm_scores, nuggets
from paser.selectors.instruction_mining import knn_distance
from paser.selectors.nuggets import AnchorSet, golden_scores
from paser.selectors.paser import clustering, divergence
from paser.selectors.paser.divergence import DIVERGENCES, make_divergence, sample_divergences, span_bounds

ACCELERATOR = torch.device("meta")
# every module that hands device results to the host
HOST_USERS = (divergence, lm_scores, nuggets, clustering, taylor, perplexity_module, shared_context_lm)


@pytest.fixture(scope="module")
def tiny():
    """(config, tokenizer) of the tiny Llama."""
    model, tok = tiny_llama()
    return model.config, tok


@pytest.fixture
def host(monkeypatch):
    """Replaces ``to_host``: asserts the result is on the accelerator, returns zeros; records the shapes."""
    shapes = []

    def to_host(t: torch.Tensor) -> np.ndarray:
        assert t.device == ACCELERATOR, f"a result reached the host from {t.device}, not the model's device"
        shapes.append(tuple(t.shape))
        return np.zeros(t.shape, dtype=np.float64 if t.dtype.is_floating_point else np.int64)

    for module in HOST_USERS:
        monkeypatch.setattr(module, "to_host", to_host)
    return shapes


def _inputs_on_accelerator(module, args, kwargs) -> None:
    """Forward pre-hook: every tensor a module receives is on the accelerator. (Fake meta tensors accept host
    index tensors, as CUDA indexing does, so host input_ids would otherwise reach the embedding unnoticed;
    CUDA's embedding refuses them.)"""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            assert value.device == ACCELERATOR, f"{type(module).__name__} received a tensor on {value.device}"


@pytest.fixture
def accelerator():
    """Inside: FakeTensorMode; ``place(config, dtype)`` gives a tiny Llama on the fake accelerator whose
    modules check that their inputs are there too."""
    def place(config, dtype=torch.float32):
        with unset_fake_temporarily(), torch.device("meta"):
            model = LlamaForCausalLM(copy.deepcopy(config)).to(dtype)  # channel pruning edits the config
        for module in model.modules():
            module.register_forward_pre_hook(_inputs_on_accelerator, with_kwargs=True)
        return model.to_empty(device=ACCELERATOR).eval()

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield place


def _on_accelerator(model) -> None:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    assert devices == {ACCELERATOR}, devices


SEQS = [[1, 5, 9, 13, 17, 21, 25], [4, 8, 12, 16, 20], [7, 11, 15, 19], [3, 6]]
PROMPTS = [3, 2, 2, 5]  # the last sequence has no response token: its batch compares no position


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences(kind, tiny, host, accelerator):
    config, _ = tiny
    original, pruned = accelerator(config), accelerator(config)
    fn = make_divergence(kind, original, seed=0)
    for span in ("response", "full"):
        for reduction in ("mean", "sum"):
            out = sample_divergences(original, pruned, SEQS, span_bounds([len(s) for s in SEQS], PROMPTS, span),
                                     fn, reduction, batch_size=3, pad_id=2, rows_per_chunk=4)
            assert out.shape == (len(SEQS),)
    assert host == [(3,), (1,)] * 4  # one transfer per batch


def test_mean_answer_nll(tiny, host, accelerator):
    model = accelerator(tiny[0], torch.bfloat16)
    assert lm_scores.mean_answer_nll(model, SEQS, PROMPTS, batch_size=3, pad_id=2).shape == (len(SEQS),)
    assert host == [(3,), (1,)]


@pytest.mark.parametrize("reuse_prefix_kv", [True, False])
def test_nuggets_scoring(reuse_prefix_kv, tiny, host, accelerator):
    config, tok = tiny
    model = accelerator(config)
    rows = [{"instruction": f"Name {i} colours", "input": "", "output": "Red, blue and yellow. " * (i + 1)}
            for i in range(3)]
    anchors = AnchorSet(tok, rows, cutoff=48, prompt_format="alpaca")
    zero = anchors.zero_shot(model, batch_size=2)
    golden = golden_scores(model, tok, rows[:2], anchors, zero, cutoff=48, prompt_format="alpaca", batch_size=2,
                           reuse_prefix_kv=reuse_prefix_kv)
    assert zero.shape == (3,) and golden.shape == (2,)
    assert host == [(2,), (1,)] * 3


@pytest.mark.parametrize("strategy", ["block", "block_query_heads", "channel"])
@pytest.mark.parametrize("importance", ["param_first", "param_mix", "random"])
def test_llm_pruner(strategy, importance, tiny, host, accelerator, monkeypatch):
    monkeypatch.setattr(taylor, "sparsity_report", lambda model, before=None: {"params": 1})
    model = accelerator(tiny[0], torch.bfloat16)
    dtypes = set()
    model.register_forward_pre_hook(lambda module, args: dtypes.update(p.dtype for p in module.parameters()))
    model.float = lambda: pytest.fail("the gradient pass made an fp32 copy of the model on the accelerator")
    calib = torch.randint(3, 300, (2, 16))  # on the host, as the pipeline hands it over
    pruner = LLMPrunerChannel(ratio=0.5, importance=importance) if strategy == "channel" else \
        LLMPruner(ratio=0.5, importance=importance, gqa="query_heads" if strategy == "block_query_heads" else "kv_groups")
    pruner.prune(model, calib)
    _on_accelerator(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if importance != "random":  # the gradient pass ran in bf16: no fp32 copy of the model
        assert dtypes == {torch.bfloat16}
        assert host == [()]  # the calibration loss, for the log
    if strategy == "channel":
        assert model.get_input_embeddings().weight.shape[1] == tiny[0].hidden_size // 2
    else:
        assert model.model.layers[1].mlp.gate_proj.weight.shape[0] == tiny[0].intermediate_size // 2


@pytest.mark.parametrize("pruner", [WandaPruner(0.5, batch_size=1), WandaPruner(None, "2:4"),
                                    SparseGPTPruner(0.5, blocksize=32), SparseGPTPruner(None, "2:4", blocksize=32),
                                    MagnitudePruner(0.5)], ids=["wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4",
                                                                "magnitude"])
def test_unstructured_pruners(pruner, tiny, accelerator, monkeypatch):
    for module in (wanda, sparsegpt, magnitude):
        monkeypatch.setattr(module, "sparsity_report", lambda model, before=None: {})
    monkeypatch.setattr(sparsegpt, "inverse_cholesky",
                        lambda hessian, percdamp, name="": torch.linalg.cholesky_ex(hessian, upper=True)[0])
    stats = []
    for stat in (wanda.SquaredNorms, sparsegpt.Hessian):  # the per-layer input statistics
        monkeypatch.setattr(stat, "add", lambda self, x, add=stat.add: (stats.append(x.device), add(self, x))[1])
    model = accelerator(tiny[0], torch.bfloat16)
    pruner.prune(model, torch.randint(3, 300, (2, 16)))
    _on_accelerator(model)
    assert set(stats) <= {ACCELERATOR} and (stats or isinstance(pruner, MagnitudePruner))


def test_prune_mask_on_device(accelerator):
    score = torch.empty(4, 8, device=ACCELERATOR)
    for nm in (None, (2, 4)):
        assert common.prune_mask(score, 0.5, nm).device == ACCELERATOR


@pytest.mark.parametrize("bf16", [True, False])
def test_knn_graph(bf16, host, accelerator, monkeypatch):
    monkeypatch.setattr(clustering, "_fast_bf16", lambda device: bf16)
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    # no FAISS on this device: the exact torch search runs there
    idx, dist, info = clustering.knn_graph(x, 5, block_elems=300, device=ACCELERATOR)  # several chunks
    assert idx.shape == dist.shape == (40, 5) and info == {"knn_index": "torch_exact"}
    assert host == [(40, 5), (40, 5)]  # the [N, k] results, once
    assert knn_distance(x, 3, device=ACCELERATOR)[0].shape == (40,)


def test_clustering_builds_its_graph_on_the_given_device(monkeypatch):
    seen = []
    knn = clustering.knn_graph

    def spy(x, k, device=None, **kw):
        seen.append(device)
        return knn(x, k, **kw)

    monkeypatch.setattr(clustering, "knn_graph", spy)
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    clustering.cluster_embeddings(x, n_components=4, n_clusters=3, device=ACCELERATOR)
    assert seen == [ACCELERATOR]


def test_perplexity_loop(tiny, host, accelerator):
    model = accelerator(tiny[0], torch.bfloat16)
    result = perplexity_module.perplexity(model, torch.randint(3, 300, (5, 12)), batch_size=2)
    assert result["windows"] == 5 and result["tokens"] == 5 * 11
    assert host == [(5,)]  # the windows' NLL sums stay on the device and are read once


def test_shared_context_scorer(tiny, host, accelerator):
    lm = SharedContextHFLM.__new__(SharedContextHFLM)  # only the packed scorer, without lm-eval's setup
    lm._model = accelerator(tiny[0], torch.bfloat16)
    requests = [(None, [1, 5, 9], [4, 8]), (None, [1, 5, 9], [12]), (None, [2, 6], [3, 7, 11])]
    out = lm._score_packed([((1, 5, 9), [0, 1]), ((2, 6), [2])], requests)
    assert len(out) == 3 and host == [(3,), (3,)]


def test_split_models_go_to_plain_hflm():
    model = torch.nn.Linear(2, 2)
    assert not split_over_devices(model)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0}
    assert not split_over_devices(model)
    model.hf_device_map["lm_head"] = 1
    assert split_over_devices(model)


def _on_device(device: str):
    """Forward pre-hook moving a module's tensor inputs to ``device``, as accelerate's dispatch hooks do."""
    def hook(module, args, kwargs):
        move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}
    return hook


def test_lora_loss_of_a_model_split_over_two_devices(tiny, accelerator):
    """``device_map`` models put the LM head on the last GPU and the embeddings on the first: the micro-batch
    loss joins logits and targets on the head's device and returns on the inputs' (both fakes here: the head
    on the host, the rest on the accelerator; mixing them raises, as on CUDA)."""
    from paser.data import EncodedSample
    from paser.recovery import response_nll

    config = copy.deepcopy(tiny[0])
    config.tie_word_embeddings = False  # a split model's head has its own weight
    model = accelerator(config)
    head_device = torch.device("cpu")
    with unset_fake_temporarily(), torch.device("meta"):
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    model.lm_head = head.to_empty(device=head_device)
    model.lm_head.register_forward_pre_hook(_on_device(head_device), with_kwargs=True)
    micro = [EncodedSample(input_ids=[1, 5, 9, 13, 17], prompt_len=2, truncated=False),
             EncodedSample(input_ids=[4, 8, 12], prompt_len=1, truncated=False)]
    nll = response_nll(model, micro, pad_id=2, device=ACCELERATOR)
    assert nll.device == ACCELERATOR and nll.shape == ()  # summed into the step's total there
    nll.backward()
    assert model.lm_head.weight.grad.device == head_device
    assert model.model.embed_tokens.weight.grad.device == ACCELERATOR


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op writes off the ``meta`` device. ``torch.empty`` is left out: it
    reserves address space whose pages no one touches (accelerate's ``init_empty_weights`` creates each
    parameter so and moves it to meta at once); any initialisation, copy or cast is counted."""

    UNTOUCHED = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default})

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and func not in self.UNTOUCHED:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.fixture
def pruned_folder(tmp_path):
    """A tiny Llama with every layer pruned from 128 to 48 MLP channels and from 6 query / 2 KV heads to 3 / 1,
    saved as the prune stage stores it."""
    from paser.models import apply_layer_shapes, layer_shapes, save_model

    model, tok = tiny_llama()
    shapes = [{**s, "intermediate": 48, "q_heads": 3, "kv_heads": 1} for s in layer_shapes(model)]
    apply_layer_shapes(model, shapes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, tok, tmp_path / "pruned")
    return tmp_path / "pruned", model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_pruned_checkpoint_reloads_without_building_the_unpruned_shape(pruned_folder, dtype):
    """A 70B's unpruned shape is ~240 GB of host memory: the reload builds the model on ``meta`` and takes
    the stored tensors as its weights, so no tensor of an unpruned layer's shape is ever allocated."""
    from paser.models import layer_shapes, load_saved

    folder, saved = pruned_folder
    config = saved.config
    unpruned = {(config.intermediate_size, config.hidden_size), (config.hidden_size, config.intermediate_size),
                (config.hidden_size, config.hidden_size)}  # MLP in and out, q_proj and o_proj
    with _Allocations() as seen:
        loaded, _ = load_saved(folder, dtype=dtype)
    assert not seen.shapes & unpruned, seen.shapes & unpruned
    assert layer_shapes(loaded) == layer_shapes(saved)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert {p.dtype for p in loaded.parameters()} == {getattr(torch, dtype)}
    want = saved.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, want[name].to(value.dtype), rtol=0, atol=0, msg=name)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), saved.to(loaded.dtype)(ids).logits.float())


def test_device_map_keeps_each_decoder_layer_whole_and_balances_the_devices(pruned_folder):
    """``device_map=auto`` on a reloaded pruned model: accelerate is told the decoder layer class, so no
    layer is cut across two GPUs, and the model is spread over both instead of filling GPU 0 first."""
    from paser.models import device_map_for, load_saved

    model, _ = load_saved(pruned_folder[0])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    placement = device_map_for(model, "auto", max_memory={0: size, 1: size, "cpu": 0})
    layers = [k for k in placement if k.startswith("model.layers.")]
    assert all(k.count(".") == 2 for k in layers), placement  # model.layers.<i>, never one of its parts
    on = {next(d for k, d in placement.items() if f"model.layers.{i}".startswith(k)) for i in range(4)}
    assert on == {0, 1}, placement  # unbalanced, every layer fits GPU 0


RELOAD_RSS = """
import resource, sys
import torch
from paser.models import load_saved
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_saved(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow  # a fresh process importing transformers: 38 s on the shared 2-core test host
def test_reloading_a_pruned_checkpoint_does_not_raise_the_host_peak_by_the_unpruned_size(tmp_path):
    """The same claim measured: a one-layer Llama whose MLP is 805 MB in fp32 unpruned and 0.2 MB pruned
    reloads in a fresh process without its peak resident memory (ru_maxrss) growing by more than 100 MB."""
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig

    from paser.models import apply_layer_shapes, layer_shapes, save_model, tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=262_144, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_layer_shapes(model, [{**s, "intermediate": 64} for s in layer_shapes(model)])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, tok, tmp_path / "pruned")
    out = subprocess.run([sys.executable, "-c", RELOAD_RSS, str(tmp_path / "pruned")], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 100, f"the reload raised the host peak by {grown_mb:.0f} MB (unpruned MLP: 805 MB)"


class _FakeGpu:
    """torch.cuda's peak counters on a CPU-only machine: ``hold(gib)`` sets what is allocated now."""

    def __init__(self, monkeypatch):
        self.now = self.peak = 0.0
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak * 2**30)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.now))

    def hold(self, gib: float) -> None:
        self.now, self.peak = gib, max(self.peak, gib)


def test_each_stage_records_its_own_host_and_gpu_peak(tmp_path, monkeypatch):
    """results.json's per-stage peaks (Run.cached): the counters restart with every stage, so a stage that
    follows a hungry one reports its own peak, and a stage run inside another (the prune stage inside the
    pruned model's evaluation) hands its peak on to the one around it."""
    from types import SimpleNamespace

    from paser.cache import StageCache
    from paser.hardware import StagePeaks
    from paser.pipeline import Run
    from paser.stages.runner import Timer

    gpu = _FakeGpu(monkeypatch)
    run = SimpleNamespace(timer=Timer(), peaks=StagePeaks(torch.device("cuda", 0)), cache=StageCache(tmp_path),
                          cfg=None)  # what Run.cached reads of a Run (the stage names below need no config)

    def stage(name, work):
        def compute():
            work()
            return name
        return Run.cached(run, name, "peaks", {"stage": name}, compute, save=lambda v, d: None, load=lambda d: None)

    def resident(mib):  # fresh pages: numpy's allocator could reuse freed, still resident heap memory (CI did)
        block = mmap.mmap(-1, mib * 2**20)
        block.write(b"\1" * len(block))
        return block

    def hungry():  # 400 MB on the host and 30 GiB on the GPU, freed before the inner stage
        block = resident(400)
        gpu.hold(30.0)
        block.close()
        gpu.hold(2.0)
        stage("inner", modest)

    def modest():  # 100 MB and 5 GiB
        block = resident(100)
        gpu.hold(5.0)
        block.close()
        gpu.hold(2.0)

    stage("outer", hungry)
    stage("after", lambda: None)
    t = run.timer.stages
    assert [t[s]["peak_gpu_memory_gib"] for s in ("outer", "inner", "after")] == [30.0, 5.0, 2.0]
    host = {s: t[s]["peak_host_rss_gib"] for s in ("outer", "inner", "after")}
    assert host["outer"] > host["inner"] + 0.25 and host["outer"] > host["after"] + 0.3, host
    assert host["inner"] > host["after"] + 0.05, host
    assert not any("peak_host_rss_since" in t[s] for s in t)  # Linux resets the high-water mark


def test_without_a_resettable_high_water_mark_the_host_peak_says_so(tmp_path, monkeypatch):
    from paser import hardware

    monkeypatch.setattr(hardware, "reset_host_peak", lambda: False)
    into = {}
    with hardware.StagePeaks(torch.device("cpu")).measure(into):
        pass
    assert into["peak_gpu_memory_gib"] is None and into["peak_host_rss_gib"] > 0
    assert into["peak_host_rss_since"] == "process start"


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched (each a kernel launch or more on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_master_weight_updates_are_a_few_foreach_ops_with_the_per_parameter_loops_results():
    """LoRA's master-weight bookkeeping (paser.recovery.MasterWeights) sums each micro-batch's bf16 gradients
    into fp32 and copies the updated masters back as foreach ops: a constant number of dispatches per
    micro-batch instead of one per LoRA tensor (56 here), with the numbers of the loop it replaced."""
    from paser.data import EncodedSample
    from paser.recovery import LoraRecovery, MasterWeights, response_nll

    model = LoraRecovery(r=4, alpha=8, dropout=0.0, dtype="bfloat16").wrap(tiny_llama()[0])
    with torch.no_grad():  # B starts at zero, which would leave A without gradients
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    masters = MasterWeights(model)
    assert len(masters.mixed) == 56  # 4 layers x 7 projections x (A, B)
    expected = [None] * len(masters.named)
    g = torch.Generator().manual_seed(0)
    for micro in range(3):
        batch = [EncodedSample(torch.randint(3, 300, (12 - micro,), generator=g).tolist(), 4, False)] * 2
        response_nll(model, batch, 2, torch.device("cpu")).backward()
        for i, (_, p) in enumerate(masters.named):  # the loop before: fp32 copy of the first, then add_
            expected[i] = p.grad.float() if expected[i] is None else expected[i].add_(p.grad)
        with _Ops() as ops:
            masters.accumulate()
        assert ops.count <= 2  # zero the sums (first micro-batch only) and one foreach addition
    for m, want in zip(masters.masters, expected):
        assert torch.equal(m.grad, want)
    with torch.no_grad():
        for m in masters.masters:
            m.add_(torch.randn(m.shape, generator=g) * 1e-3)
    with _Ops() as ops:
        masters.push()
    assert ops.count == 1
    for (_, p), m in zip(masters.named, masters.masters):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
