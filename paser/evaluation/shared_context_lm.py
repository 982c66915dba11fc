"""lm-eval's HFLM with each context computed once for all of its continuations.

A multiple-choice document is scored as log P(continuation_i | context) for every choice i. HFLM runs one
sequence per choice, so the context (HellaSwag's ~45 tokens, ARC's question) is recomputed per choice. Here
the requests that share a context are packed into one row: the context, then every continuation minus its
last token, each continuation attending to the context and to itself only (a 4-D attention mask) and
positioned right after the context (position ids). This is the same computation as HFLM's, with about half
the tokens on HellaSwag and ARC, and the vocabulary projection is applied only where a continuation token
is predicted. Log-probabilities are taken in fp32 (HFLM takes them in the model's dtype).

Requests the packing cannot express (a context plus continuation longer than the model's window, which
HFLM truncates on the left) and models other than a plain decoder stack go through HFLM's own code. A model
split over several devices is not supported (ZeroShotEvaluator uses plain HFLM for it); every tensor here
is on the model's device, and each batch's scores come back to the host in one transfer.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from paser.progress import tqdm
from paser.scoring import model_device, to_host

# logits rows put through log_softmax at once: bounds the fp32 [rows, vocab] buffer (~200 MB at 49k vocab)
_LOGIT_CHUNK = 1024


class SharedContextHFLM(HFLM):
    """``batch_size`` counts packed rows, i.e. documents (each with all of its choices)."""

    def _packable(self) -> bool:
        cfg = self._model.config
        return (self.backend == "causal" and getattr(cfg, "final_logit_softcapping", None) is None
                and hasattr(self._model, "get_decoder") and self._model.get_output_embeddings() is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._packable():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        fallback = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length + 1:
                fallback.append(i)
            else:
                groups[tuple(ctx)].append(i)
        if fallback:
            for i, r in zip(fallback, super()._loglikelihood_tokens([requests[i] for i in fallback],
                                                                    disable_tqdm, override_bs)):
                results[i] = r
        # longest rows first (as HFLM does): memory peaks at once and batches pad little
        order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + sum(len(requests[i][2]) - 1
                                                                        for i in kv[1])))
        batch_rows = override_bs or self.batch_size
        with tqdm(total=len(requests) - len(fallback), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (shared contexts)") as bar:
            for start in range(0, len(order), batch_rows):
                batch = order[start:start + batch_rows]
                for i, r in zip([i for _, idx in batch for i in idx], self._score_packed(batch, requests)):
                    results[i] = r
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                bar.update(sum(len(idx) for _, idx in batch))
        return results

    @torch.no_grad()
    def _score_packed(self, batch, requests) -> list[tuple[float, bool]]:
        """(sum log-prob, greedy) for every request of the batch, in the order of the batch's groups."""
        rows = []
        for ctx, idx in batch:
            rows.append((list(ctx), [requests[i][2] for i in idx]))
        width = max(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in rows)
        n = len(rows)
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        allowed = torch.zeros((n, width, width), dtype=torch.bool)
        allowed[:, torch.arange(width), torch.arange(width)] = True  # padding attends to itself: no NaN rows
        pred_rows, pred_cols, targets, spans = [], [], [], []
        for b, (ctx, conts) in enumerate(rows):
            lc = len(ctx)
            ids[b, :lc] = torch.tensor(ctx)
            pos[b, :lc] = torch.arange(lc)
            allowed[b, :lc, :lc] = torch.ones(lc, lc, dtype=torch.bool).tril()
            off = lc
            for cont in conts:
                k = len(cont) - 1  # the last continuation token is predicted, never read
                ids[b, off:off + k] = torch.tensor(cont[:-1], dtype=torch.long)
                pos[b, off:off + k] = torch.arange(lc, lc + k)
                allowed[b, off:off + k, :lc] = True
                allowed[b, off:off + k, off:off + k] = torch.ones(k, k, dtype=torch.bool).tril()
                spans.append((len(targets), len(targets) + len(cont)))
                pred_rows += [b] * len(cont)
                pred_cols += [lc - 1, *range(off, off + k)]
                targets += cont
                off += k
        # the layout is built on the host (many small writes), then moved to the model's device once
        dev, dtype = model_device(self._model), self._model.dtype
        mask = torch.zeros((n, 1, width, width), dtype=dtype, device=dev)
        mask.masked_fill_(~allowed.to(dev).unsqueeze(1), torch.finfo(dtype).min)
        hidden = self._model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                                           use_cache=False).last_hidden_state
        picked = hidden[torch.tensor(pred_rows, device=dev), torch.tensor(pred_cols, device=dev)]
        head = self._model.get_output_embeddings()
        target = torch.tensor(targets, device=dev)
        logp, greedy = [], []
        for s in range(0, len(targets), _LOGIT_CHUNK):
            logits = head(picked[s:s + _LOGIT_CHUNK]).float()
            t = target[s:s + _LOGIT_CHUNK]
            logp.append(F.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1))
            greedy.append(logits.argmax(-1) == t)
        logp, greedy = torch.cat(logp), torch.cat(greedy)
        sums = to_host(torch.stack([logp[a:b].sum() for a, b in spans]))
        all_greedy = to_host(torch.stack([greedy[a:b].all() for a, b in spans]))
        return [(float(v), bool(g)) for v, g in zip(sums, all_greedy)]
