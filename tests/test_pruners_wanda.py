"""Wanda: masks on hand-made matrices, exact per-row / N:M sparsity, and the layer-wise runner feeding the
pruned layer's outputs to the next layer (checked against masks computed independently here)."""

from __future__ import annotations

import copy

import pytest
import torch

from paser.models import decoder_layers, tiny_llama
from paser.pruners.common import prune_mask
from paser.pruners.wanda import SquaredNorms, WandaPruner, wanda_score


def _mask(w, x, sparsity=0.5, nm=None):
    stat = SquaredNorms(w)
    stat.add(x)
    return prune_mask(wanda_score(w, stat.sum), sparsity, nm)


def test_unstructured_mask_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [4.0, 3.0, -2.0, 1.0]])
    # one token per feature: ||X_j|| = 4, 1, 1, 0.25
    x = torch.diag(torch.tensor([4.0, 1.0, 1.0, 0.25]))
    # scores row 0: 4, 2, 3, 1 -> drop columns 3, 1; row 1: 16, 3, 2, 0.25 -> drop columns 3, 2
    expected = torch.tensor([[False, True, False, True],
                             [False, False, True, True]])
    assert torch.equal(_mask(w, x), expected)
    # magnitude alone would have dropped columns 0 and 1 of row 0: the activations matter
    assert not torch.equal(prune_mask(w.abs(), 0.5, None), expected)


def test_nm_mask_by_hand():
    w = torch.arange(1.0, 9.0).unsqueeze(0)              # 1..8
    x = torch.diag(torch.tensor([1.0, 1, 1, 1, 8, 4, 2, 1]))
    # scores 1, 2, 3, 4 | 40, 24, 14, 8: 2:4 drops the two lowest of each block
    expected = torch.tensor([[True, True, False, False, False, False, True, True]])
    assert torch.equal(_mask(w, x, nm=(2, 4)), expected)
    # unstructured 50% would drop the whole first block instead
    assert torch.equal(_mask(w, x), torch.tensor([[True] * 4 + [False] * 4]))


def test_norm_sums_over_batches():
    stat = SquaredNorms(torch.zeros(1, 2))
    stat.add(torch.tensor([[3.0, 0.0]]))
    stat.add(torch.tensor([[4.0, 1.0]]))
    assert torch.allclose(stat.sum, torch.tensor([25.0, 1.0])) and stat.tokens == 2


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_row_sparsity(sparsity):
    model, tok = tiny_llama()
    WandaPruner(sparsity=sparsity).prune(model, torch.randint(3, len(tok), (4, 32)))
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            zeros = (linear.weight == 0).sum(dim=1)
            assert torch.all(zeros == int(linear.in_features * sparsity))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_every_group(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    model, tok = tiny_llama()
    report = WandaPruner(sparsity=None, pattern=pattern).prune(model, torch.randint(3, len(tok), (4, 32)))
    assert report["sparsity"] == pytest.approx(n / m)
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            groups = (linear.weight == 0).reshape(linear.out_features, -1, m).sum(dim=2)
            assert torch.all(groups == n)


def _inputs_of(model, linear, calib):
    seen = []
    h = linear.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    return torch.cat(seen)


def test_sequential_masks_match_independent_computation():
    """Layer 0 is pruned from the dense activations; layer 1 from the outputs of the *pruned* layer 0."""
    model, tok = tiny_llama()
    dense = copy.deepcopy(model)
    calib = torch.randint(3, len(tok), (4, 32))
    x0 = _inputs_of(dense, decoder_layers(dense)[0].mlp.up_proj, calib)
    WandaPruner(sparsity=0.5).prune(model, calib)

    w0 = decoder_layers(dense)[0].mlp.up_proj.weight
    got0 = decoder_layers(model)[0].mlp.up_proj.weight == 0
    assert torch.equal(got0, _mask(w0, x0))

    # inputs of layer 1 = outputs of the pruned layer 0 and the dense rest: rebuild that model
    mixed = copy.deepcopy(dense)
    decoder_layers(mixed)[0].load_state_dict(decoder_layers(model)[0].state_dict())
    x1 = _inputs_of(mixed, decoder_layers(mixed)[1].self_attn.q_proj, calib)
    w1 = decoder_layers(dense)[1].self_attn.q_proj.weight
    assert torch.equal(decoder_layers(model)[1].self_attn.q_proj.weight == 0, _mask(w1, x1))
    # and not the mask the dense activations would give
    x1_dense = _inputs_of(dense, decoder_layers(dense)[1].self_attn.q_proj, calib)
    assert not torch.equal(_mask(w1, x1_dense), _mask(w1, x1))


def test_kept_weights_unchanged():
    model, tok = tiny_llama()
    dense = copy.deepcopy(model)
    WandaPruner().prune(model, torch.randint(3, len(tok), (2, 16)))
    w, w_dense = decoder_layers(model)[2].mlp.up_proj.weight, decoder_layers(dense)[2].mlp.up_proj.weight
    kept = w != 0
    assert torch.equal(w[kept], w_dense[kept])
