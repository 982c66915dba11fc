"""LLM-Pruner channel-wise (the reference's ``--channel_wise``, the paper's "channel" strategy): removes the
``ratio`` of the hidden (residual-stream) channels of the whole model. A hidden channel's coupled group is
its column of the embeddings, of every q/k/v/gate/up projection and of an untied lm_head, its row of every
o/down projection and its entry of every RMSNorm; its importance is the sum over that group of LLM-Pruner's
per-weight scores (``paser.pruners.taylor``; norms contribute elementwise). Heads, KV groups and MLP widths
stay; the hidden size shrinks, so unlike block-wise pruning (``paser.pruners.llm_pruner``) this changes the
embeddings and lm_head and cannot be restricted to a layer range."""

from __future__ import annotations

import torch

from paser.errors import ConfigError
from paser.models import decoder_layers
from paser.pruners.taylor import StructuredPruner, keep_cols, keep_rows, n_pruned, random_importance

# Linear layers of a decoder layer that read the hidden state (pruned along columns) or write it (rows).
READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES_HIDDEN = ("o_proj", "down_proj")


class LLMPrunerChannel(StructuredPruner):
    def remove(self, model, calib: torch.Tensor | None) -> dict:
        return {"hidden_size": self._prune_hidden(model, calib)}

    @staticmethod
    def _hidden_groups(model) -> tuple[list, list, list]:
        """The modules that carry the hidden dimension: Linear layers that read it (columns), that write it
        (rows), and RMSNorms. Raises if any other parameter has a hidden-size axis (e.g. fused MoE experts),
        so that nothing is pruned half-way."""
        hidden = model.config.hidden_size
        reads, writes, norms = [], [], []
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and leaf in READS_HIDDEN:
                reads.append((name, module))
            elif isinstance(module, torch.nn.Linear) and leaf in WRITES_HIDDEN:
                writes.append((name, module))
            elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None \
                    and tuple(module.weight.shape) == (hidden,):
                norms.append((name, module))
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        known = {id(m.weight) for _, m in reads + writes + norms} | {id(embed.weight), id(head.weight)}
        # biases: a reader's is on its output side (kept whole), a writer's along the hidden size (cut with its rows)
        known |= {id(m.bias) for _, m in reads + writes if m.bias is not None}
        for name, param in model.named_parameters():
            if id(param) not in known and hidden in param.shape:
                raise ConfigError(f"channel-wise LLM-Pruner does not know how to prune '{name}' "
                                  f"{tuple(param.shape)} along the hidden size {hidden}: it supports dense "
                                  f"Llama-family layouts ({', '.join(READS_HIDDEN + WRITES_HIDDEN)}, RMSNorm)")
        return reads, writes, norms

    def _prune_hidden(self, model, calib: torch.Tensor | None) -> int:
        """Remove the least important hidden channels everywhere; returns the new hidden size."""
        reads, writes, norms = self._hidden_groups(model)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head.weight is embed.weight
        # (weight, dim along which a channel's scores are summed): readers' columns, writers' rows
        scored = [(m.weight, 0) for _, m in reads] + [(m.weight, 1) for _, m in writes]
        scored += [(m.weight, 0) for _, m in norms] + [(embed.weight, 0)] + ([] if tied else [(head.weight, 0)])
        hidden, device = model.config.hidden_size, embed.weight.device
        if self.importance == "random":
            imp = random_importance(hidden, torch.Generator().manual_seed(self.seed), device)
        else:
            score = self.scorer(model, calib, [w for w, _ in scored])
            imp = sum(score(w, dim).to(device) for w, dim in scored)
        keep = torch.sort(torch.topk(imp, hidden - n_pruned(self.ratio, hidden)).indices).values

        if getattr(model.config, "head_dim", None) is None:  # it would otherwise be re-derived from hidden_size
            model.config.head_dim = decoder_layers(model)[0].self_attn.head_dim
        with torch.no_grad():
            for group, cut in ((reads, keep_cols), (writes, keep_rows)):
                for name, module in group:
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, cut(module, keep))
            for _, norm in norms:
                norm.weight = torch.nn.Parameter(norm.weight.data[keep.to(norm.weight.device)].clone())
            embed.weight = torch.nn.Parameter(embed.weight.data[:, keep].clone())
            embed.embedding_dim = len(keep)
            head.weight = embed.weight if tied else \
                torch.nn.Parameter(head.weight.data[:, keep.to(head.weight.device)].clone())
            head.in_features = len(keep)
        for module in model.modules():  # cached copies of the size (e.g. LlamaMLP.hidden_size)
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = len(keep)
        model.config.hidden_size = len(keep)
        return len(keep)
