"""SelectionContext builds models outside inference mode, whatever the selector is doing."""

from __future__ import annotations

import torch

from paser.components import SelectionContext


def test_models_built_inside_a_selectors_inference_mode_stay_trainable(tmp_path):
    ctx = SelectionContext(tokenizer=None, original_model=lambda: torch.nn.Linear(2, 2),
                           pruned_model=lambda: torch.nn.Linear(2, 2), embedder=lambda: None,
                           embedder_name="x", cache=None, cache_key={}, seed=0)
    with torch.inference_mode():  # as a scoring loop would be when it first asks for the model
        model = ctx.pruned_model
        model(torch.ones(1, 2))
    assert not model.weight.is_inference()
    model(torch.ones(1, 2)).sum().backward()  # LoRA recovery trains through these weights later
    assert model.weight.grad is not None
