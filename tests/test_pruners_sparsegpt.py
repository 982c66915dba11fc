"""SparseGPT: closed-form OBS update on a 2-column case, lower reconstruction error than Wanda and
magnitude at the same sparsity, N:M pattern, and the dampening retry when Cholesky fails."""

from __future__ import annotations

import logging

import pytest
import torch

from paser.models import decoder_layers, tiny_llama
from paser.pruners.common import prune_mask
from paser.pruners.sparsegpt import Hessian, SparseGPTPruner, inverse_cholesky, sparsegpt_prune
from paser.pruners.wanda import wanda_score


def test_obs_update_by_hand():
    # H = [[2, 1], [1, 2]]; w0 = 0.1 has the lower w^2/[H^-1]_jj and goes; OBS moves w1 by w0 * H01/H11
    w = torch.tensor([[0.1, 1.0]])
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    out = sparsegpt_prune(w, h, sparsity=0.5, percdamp=0.0)
    assert torch.allclose(out, torch.tensor([[0.0, 1.05]]), atol=1e-6)


def test_identity_hessian_is_blockwise_magnitude():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    out = sparsegpt_prune(w, torch.eye(8), sparsity=0.5, blocksize=8, percdamp=0.0)
    # no correlations: no error feedback, the lowest half of |W| over the whole block goes
    threshold = w.abs().flatten().sort().values[24]
    assert torch.equal(out, torch.where(w.abs() < threshold, 0.0, w))


def _layer_problem(seed=0, rows=32, cols=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with unequal scales, as real activations
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _err(w, w_hat, x):
    return torch.linalg.norm(x @ w.t() - x @ w_hat.t()).item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_error_lower_than_wanda_and_magnitude(nm, seed):
    w, x = _layer_problem(seed)
    stat = Hessian(w)
    stat.add(x[:256])
    stat.add(x[256:])
    sgpt = sparsegpt_prune(w, stat.matrix(), sparsity=0.5, nm=nm)
    wanda = torch.where(prune_mask(wanda_score(w, x.pow(2).sum(0)), 0.5, nm), 0.0, w)
    magnitude = torch.where(prune_mask(w.abs(), 0.5, nm), 0.0, w)
    for pruned in (sgpt, wanda, magnitude):
        assert (pruned == 0).float().mean().item() == pytest.approx(0.5)
    e_sgpt, e_wanda, e_mag = _err(w, sgpt, x), _err(w, wanda, x), _err(w, magnitude, x)
    assert e_sgpt < e_wanda and e_sgpt < e_mag
    if nm:
        assert torch.all((sgpt == 0).reshape(32, -1, 4).sum(2) == 2)


def test_singular_hessian_raises_dampening(caplog):
    h = torch.ones(8, 8)  # rank 1: Cholesky fails without dampening
    with caplog.at_level(logging.WARNING, logger="paser.pruners.sparsegpt"):
        upper = inverse_cholesky(h, percdamp=0.0, name="layers.0.q_proj")
    assert torch.isfinite(upper).all()
    assert "layers.0.q_proj: Cholesky factorisation failed with dampening 0" in caplog.text
    assert "retrying with 0.01" in caplog.text


def test_pruner_survives_singular_hessian(caplog):
    """Through the whole pruner: inputs with duplicated features make H exactly singular."""
    model, tok = tiny_llama()
    layer0 = decoder_layers(model)[0]
    # make the normed input of layer 0 have identical features 0 and 1
    with torch.no_grad():
        layer0.input_layernorm.weight[1] = layer0.input_layernorm.weight[0]
        model.model.embed_tokens.weight[:, 1] = model.model.embed_tokens.weight[:, 0]
    with caplog.at_level(logging.WARNING, logger="paser.pruners.sparsegpt"):
        report = SparseGPTPruner(percdamp=0.0).prune(model, torch.randint(3, len(tok), (2, 16)))
    assert "layers.0.self_attn.q_proj: Cholesky factorisation failed" in caplog.text
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(model(torch.randint(3, len(tok), (1, 8))).logits).all()


def test_tiny_model_nm_and_block_sparsity():
    model, tok = tiny_llama()
    calib = torch.randint(3, len(tok), (4, 32))
    SparseGPTPruner(sparsity=None, pattern="2:4").prune(model, calib)
    for layer in decoder_layers(model):
        w = layer.mlp.down_proj.weight
        assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(2) == 2)
    model, _ = tiny_llama()
    report = SparseGPTPruner(sparsity=0.5, blocksize=32).prune(model, calib)
    # unstructured: exactly half of every 32-column block of every matrix
    for layer in decoder_layers(model):
        w = layer.self_attn.q_proj.weight
        assert torch.all((w == 0).reshape(w.shape[0], -1, 32).sum(dim=(0, 2)) == w.shape[0] * 16)
    assert report["sparsity"] == pytest.approx(0.5)
