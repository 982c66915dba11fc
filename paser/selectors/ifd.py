"""IFD, Instruction-Following Difficulty (Li et al. 2024, "From Quantity to Quality", Cherry LLM).

IFD(x, y) = s(y | x) / s(y), with s the mean cross-entropy of the answer tokens. Samples with IFD > 1 (the
instruction does not help at all) are dropped, as in the reference; the highest IFD are kept.

The defaults are the reference code's (tianyi-lab/Cherry_LLM, cherry_seletion/data_analysis.py with
``--mod cherry --prompt alpaca``, then data_by_IFD.py):

- ``prompt_format: cherry``: s(y | x) on its PROMPT_DICT, the Alpaca template ending in "### Response:"
  without a newline, the answer appended directly and the whole text tokenised at once;
- ``unconditioned_prefix: "### Response:"``: s(y) on "### Response:" + answer (its ``direct_answer_text``),
  again one text with the tokenizer's BOS; the paper's formula conditions on nothing (``""``);
- ``truncation: cherry``: the templated text is cut at the cutoff (its ``max_length``), the answer-only text
  at cutoff - P + 4 tokens (P: the prompt's tokens), and a sample is unscored if its prompt fills the
  cutoff or its answer-only tokens do not fit beside the prompt (P + that count > cutoff).

Ours, kept as options: ``prompt_format: alpaca`` (the recovery template, "### Response:\\n"; Instruction
Mining's perplexity uses it, so the two then share one cached conditioned loss) and ``truncation:
same_answer`` (the unconditioned loss over exactly the conditioned sequence's answer tokens, after the
start token and the prefix). In every mode the answer is tokenised together with the text before it
(``lm_scores.joined_encoding``), as the reference does, so SentencePiece vocabularies see no spurious "▁".
"""

from __future__ import annotations

import time

import numpy as np

from paser.errors import ConfigError
from paser.selectors.clustered import Scored, ScoredSelector, describe
from paser.selectors.lm_scores import TEMPLATES, TRUNCATIONS, answer_losses, check_choice, check_model_choice

CHERRY_PREFIX = "### Response:"


class IFDSelector(ScoredSelector):
    name = "ifd"

    def __init__(self, model: str = "pruned", prompt_format: str = "cherry",
                 unconditioned_prefix: str | None = CHERRY_PREFIX, truncation: str = "cherry",
                 drop_above_one: bool = True, cluster: str | None = None, clustering: dict | None = None):
        super().__init__(cluster, clustering)
        self.model = check_model_choice(model)
        self.prompt_format = check_choice(prompt_format, TEMPLATES, "selector.prompt_format")
        self.truncation = check_choice(truncation, TRUNCATIONS, "selector.truncation")
        if unconditioned_prefix is not None and not isinstance(unconditioned_prefix, str):
            raise ConfigError(f"selector.unconditioned_prefix={unconditioned_prefix!r} must be a string "
                              f"({CHERRY_PREFIX!r}: Cherry_LLM's code; \"\": the paper's s(answer))")
        self.unconditioned_prefix = unconditioned_prefix or ""
        self.drop_above_one = bool(drop_above_one)

    def score(self, pool, ctx) -> Scored:
        t0 = time.perf_counter()
        cond = answer_losses(ctx, pool.rows, self.model, conditioned=True, template=self.prompt_format)
        t1 = time.perf_counter()
        uncond = answer_losses(ctx, pool.rows, self.model, conditioned=False, prefix=self.unconditioned_prefix,
                               template=self.prompt_format, truncation=self.truncation)
        t2 = time.perf_counter()
        with np.errstate(divide="ignore", invalid="ignore"):
            ifd = cond / uncond
        ifd[~np.isfinite(ifd)] = np.nan  # no answer token left after truncation, or excluded by the cutoff rule
        key = ifd.copy()
        if self.drop_above_one:
            key[ifd > 1] = np.nan
        return Scored(scores=ifd, rank_key=key, diagnostics={
            "model": self.model, "prompt_format": self.prompt_format,
            "unconditioned_prefix": self.unconditioned_prefix, "truncation": self.truncation,
            "above_one": int((ifd > 1).sum()),
            "no_answer_tokens": int(np.isnan(cond).sum()),
            "unscored": int(np.isnan(ifd).sum()),
            "loss_conditioned": describe(cond),
            "loss_unconditioned": describe(uncond),
            "time_s": {"loss_conditioned": round(t1 - t0, 3), "loss_unconditioned": round(t2 - t1, 3)},
        })
