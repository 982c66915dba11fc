"""The token sequences IFD and Nuggets score, against their reference code, on the tiny byte-level BPE and on
a SentencePiece-style (Metaspace) one where tokenising an answer apart from its prompt changes its first token.

Golden sequences are written out here from what the references do, not from the code under test:
- IFD, tianyi-lab/Cherry_LLM (cherry_seletion/data_analysis.py --mod cherry --prompt alpaca, data_by_IFD.py):
  ``cherry_sequences`` in test_selectors_baselines.py;
- Nuggets, pldlgb/nuggets (tasks/alpaca.py, tasks/loader.py, instruction_main.py): ``nuggets_reference`` below.
"""

from __future__ import annotations

import numpy as np
import pytest

from paser.budget import Budget
from paser.errors import ConfigError
from paser.models import tiny_tokenizer
from paser.selectors import lm_scores, nuggets
from paser.selectors.lm_scores import answer_sequences
from tests.test_selectors_baselines import CHERRY_PROMPT_DICT, cherry_sequences, make_ctx, make_pool
from tests.test_tokenisation import SlowView, sentencepiece_tokenizer, varied_rows

RGB = {"instruction": "What are the three primary colors?", "input": "", "output": "Red, blue and yellow."}
COLOR = {"instruction": "Name a color.", "input": "", "output": "Red."}
TOKENIZERS = {"byte_level": tiny_tokenizer, "metaspace": sentencepiece_tokenizer}


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def cherry(tok, rows, cutoff, conditioned, prefix="### Response:"):
    return answer_sequences(tok, rows, cutoff, conditioned, prefix, template="cherry", truncation="cherry")


# ------------------------------------------------------------------------------------------- IFD

def test_cherry_sequences_on_metaspace_by_hand():
    """The answer follows "### Response:" directly and is tokenised with it: "R", not "▁" "R"."""
    tok = sentencepiece_tokenizer()
    prompt = CHERRY_PROMPT_DICT["prompt_no_input"].format_map(RGB)
    assert prompt.endswith("### Response:")
    (cond,), (start,) = cherry(tok, [RGB], 1000, conditioned=True)
    assert cond == tok(prompt + RGB["output"])["input_ids"] and start == len(tok(prompt)["input_ids"])
    assert tokens(tok, cond[start - 2:]) == ["▁Response", ":", "R", "ed,", "▁blue", "▁and", "▁yellow."]
    (alone,), (start,) = cherry(tok, [RGB], 1000, conditioned=False)
    assert tokens(tok, alone) == ["<s>", "▁", "###", "▁Response", ":", "R", "ed,", "▁blue", "▁and", "▁yellow."]
    assert start == 5
    # the seam this guards: tokenised on its own, the answer starts with a word-initial "▁"
    assert tokens(tok, tok(RGB["output"], add_special_tokens=False)["input_ids"])[:2] == ["▁", "R"]


def test_cherry_sequences_on_byte_level_by_hand():
    tok = tiny_tokenizer()
    (alone,), (start,) = cherry(tok, [RGB], 1000, conditioned=False)
    assert tokens(tok, alone[:start]) == ["<s>", "##", "#", "ĠR", "esponse", ":"]
    assert alone[start:] == tok(RGB["output"], add_special_tokens=False)["input_ids"]  # a byte-level BPE splits there
    (bare,), (start,) = cherry(tok, [RGB], 1000, conditioned=False, prefix="")  # the paper's s(answer)
    assert bare == tok(RGB["output"])["input_ids"] and start == 1


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("prefix", ["### Response:", ""])
def test_cherry_sequences_follow_the_reference(name, prefix):
    tok = TOKENIZERS[name]()
    rows = varied_rows()
    skipped = []
    for cutoff in (1000, 128, 64, 40):
        conds, cond_starts = cherry(tok, rows, cutoff, conditioned=True, prefix=prefix)
        alones, alone_starts = cherry(tok, rows, cutoff, conditioned=False, prefix=prefix)
        for row, c, cs, a, as_ in zip(rows, conds, cond_starts, alones, alone_starts):
            ref = cherry_sequences(tok, row, cutoff, direct_prefix=prefix)
            skipped.append(ref is None)
            if ref is None:  # skipped by data_by_IFD.py: one of the two losses has no token
                assert c[cs:] == [] or a[as_:] == [], (row, cutoff)
            else:
                assert ((c, cs), (a, as_)) == ref, (row, cutoff)
    assert 0 < sum(skipped) < len(skipped)  # both kinds occur


def test_cherry_cutoff_by_hand():
    """Answer-only text cut at cutoff - P + 4 tokens; unscored when its answer does not fit beside the prompt."""
    tok = tiny_tokenizer()
    row = {"instruction": "Count.", "input": "", "output": "word " * 60}
    prompt = tok(CHERRY_PROMPT_DICT["prompt_no_input"].format_map(row))["input_ids"]
    cutoff = len(prompt) + 10
    (cond,), (start,) = cherry(tok, [row], cutoff, conditioned=True)
    assert start == len(prompt) and len(cond) == cutoff  # 10 answer tokens
    (alone,), (a_start,) = cherry(tok, [row], cutoff, conditioned=False)
    assert len(alone) == 10 + 4 and a_start == 6  # <s> ## # ĠR esponse : -> 8 answer tokens, beside the prompt
    (bare,), (b_start,) = cherry(tok, [row], cutoff, conditioned=False, prefix="")
    assert bare == tok(row["output"])["input_ids"][:1] and b_start == 1  # 13 answer tokens would not fit: unscored
    seqs, starts = answer_sequences(tok, [row], cutoff, False, "", template="cherry", truncation="same_answer")
    assert seqs[0] == [tok.bos_token_id] + cond[start:] and starts == [1]  # ours: exactly the conditioned targets


def test_slow_tokenizers_give_the_same_sequences():
    tok = sentencepiece_tokenizer()
    rows = varied_rows()
    for template in ("cherry", "alpaca"):
        for conditioned in (True, False):
            got = answer_sequences(SlowView(tok), rows, 128, conditioned, "### Response:", template, "cherry")
            assert got == answer_sequences(tok, rows, 128, conditioned, "### Response:", template, "cherry")


def test_alpaca_template_is_the_joined_recovery_encoding():
    """prompt_format: alpaca scores what recovery trains on (paser.data.encode_sample, less its EOS)."""
    from paser.data import encode_sample

    tok = sentencepiece_tokenizer()
    rows = varied_rows()
    seqs, starts = answer_sequences(tok, rows, 128, conditioned=True)
    for row, seq, start in zip(rows, seqs, starts):
        enc = encode_sample(tok, row, 128, add_eos=False)
        assert (seq, start) == (enc.input_ids, enc.prompt_len)


def test_ifd_options_key_the_cache_apart(tmp_path):
    from paser.selectors.ifd import IFDSelector

    ctx = make_ctx(tmp_path)
    pool = make_pool()
    options = [{}, {"unconditioned_prefix": ""}, {"truncation": "same_answer"}, {"prompt_format": "alpaca"}]
    scores = [IFDSelector(**kw).select(pool, Budget.samples(3), ctx).scores for kw in options]
    root = tmp_path / "cache" / "scores"
    assert len(list((root / "answer_nll_conditioned").iterdir())) == 2  # one per template
    assert len(list((root / "answer_nll_unconditioned").iterdir())) == 4
    for i in range(len(scores)):
        for j in range(i):
            assert not np.allclose(scores[i], scores[j], equal_nan=True), (options[i], options[j])


def test_ifd_option_errors_name_key_and_values():
    with pytest.raises(ConfigError, match=r"selector.prompt_format='wiz' is unknown; allowed: \['alpaca', 'cherry'\]"):
        lm_scores.prompt_text(RGB, "wiz")
    with pytest.raises(ConfigError, match=r"selector.truncation='x' is unknown; allowed: \['cherry', 'same_answer'\]"):
        answer_sequences(tiny_tokenizer(), [RGB], 10, False, truncation="x")


# --------------------------------------------------------------------------------------- Nuggets

def nuggets_reference(tok, demo_row, anchor_row, cutoff=1000):
    """(zero-shot ids, one-shot ids, answer start in the anchor) as pldlgb/nuggets builds them: fields stripped
    (dataset_preprocess); "Instruction:\\n...\\nResponse:\\n" + output (multiple_gen_promptify, version "sp");
    the anchor encoded whole without special tokens, its answer after the query's own tokens
    (TokenizedForGenRightPad.tokenize); zero-shot = the anchor alone (do_infer_probs_zero); one-shot = the
    demonstration encoded with its special tokens (tokenize_demonstration), then the anchor (do_infer_probs
    with the demonstration's past_key_values). The reference cuts anchors at 200 tokens, we at the cutoff."""
    def text(r):
        r = {k: v.strip() for k, v in r.items()}
        query = (f"Instruction:\n{r['instruction']}\nInput:\n{r['input']}\nResponse:\n" if r["input"]
                 else f"Instruction:\n{r['instruction']}\nResponse:\n")
        return query, query + r["output"]

    query, full = text(anchor_row)
    anchor = tok(full, add_special_tokens=False)["input_ids"][:cutoff]
    demo = tok(text(demo_row)[1])["input_ids"]
    return anchor, demo + anchor, len(tok(query, add_special_tokens=False)["input_ids"])


class Recorder:
    """Stands in for the model pass: records the sequences and answer starts it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, seqs, starts, batch_size, pad_id):
        self.calls.append((list(seqs), list(starts)))
        return np.zeros(len(seqs))


def scored_sequences(monkeypatch, tok, demo_row, anchor_rows, cutoff=1000, **options):
    """(zero-shot sequences, one-shot sequences, starts) that Nuggets hands to the model (no KV reuse)."""
    rec = Recorder()
    monkeypatch.setattr(nuggets, "answer_logprob_sums", rec)
    bos = options.pop("zero_shot_bos", False)
    anchors = nuggets.AnchorSet(tok, anchor_rows, cutoff, "nuggets", zero_shot_bos=bos)
    zero = anchors.zero_shot(None, batch_size=4)
    nuggets.golden_scores(None, tok, [demo_row], anchors, zero, cutoff, "nuggets", 4, reuse_prefix_kv=False, **options)
    (zero_seqs, zero_starts), (one_seqs, one_starts) = rec.calls
    return zero_seqs, zero_starts, one_seqs, one_starts


def test_nuggets_sequences_on_metaspace_by_hand(monkeypatch):
    tok = sentencepiece_tokenizer()
    (zero,), (start,), (one,), (one_start,) = scored_sequences(monkeypatch, tok, RGB, [COLOR])
    anchor = ["▁In", "struction", ":\n", "N", "a", "m", "e", "▁a", "▁color", ".\n", "Response", ":\n", "R", "ed", "."]
    assert tokens(tok, zero) == anchor and start == 12  # no BOS; the answer "R" "ed" "." as in the joined text
    demo = ["<s>", "▁In", "struction", ":\n", "W", "hat", "▁are", "▁the", "▁three", "▁primary", "▁color", "s", "?", "\n",
            "Response", ":\n", "R", "ed,", "▁blue", "▁and", "▁yellow."]
    assert tokens(tok, one) == demo + anchor and one_start == len(demo) + 12  # the anchor directly after it
    assert (zero, one, start) == nuggets_reference(tok, RGB, COLOR)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_nuggets_sequences_follow_the_reference(name, monkeypatch):
    tok = TOKENIZERS[name]()
    rows = varied_rows()
    zero, starts, one, one_starts = scored_sequences(monkeypatch, tok, RGB, rows, cutoff=128)
    for row, z, s, o, os_ in zip(rows, zero, starts, one, one_starts):
        ref_zero, ref_one, ref_start = nuggets_reference(tok, RGB, row, cutoff=128)
        assert (z, o) == (ref_zero, ref_one), row
        assert s == min(ref_start, 128) and os_ == len(ref_one) - len(ref_zero) + s, row


def test_nuggets_options_bos_and_separator(monkeypatch):
    tok = tiny_tokenizer()
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    (zero,), (start,), (one,), _ = scored_sequences(monkeypatch, tok, RGB, [COLOR], zero_shot_bos=True,
                                                    separator="\n\n")
    ref_zero, ref_one, ref_start = nuggets_reference(tok, RGB, COLOR)
    assert zero == [tok.bos_token_id] + ref_zero and start == ref_start + 1
    demo = ref_one[:len(ref_one) - len(ref_zero)]
    assert one == demo + sep + ref_zero


def test_nuggets_options_key_the_cache_apart(tmp_path):
    from paser.selectors.nuggets import NuggetsSelector

    ctx = make_ctx(tmp_path)
    pool = make_pool()
    for kw in ({}, {"separator": "\n\n"}, {"zero_shot_bos": True}):
        NuggetsSelector(n_anchors=2, **kw).select(pool, Budget.samples(3), ctx)
    root = tmp_path / "cache" / "scores"
    assert len(list((root / "nuggets_zero_shot").iterdir())) == 2
    assert len(list((root / "nuggets_golden").iterdir())) == 3
