"""Tokenising Alpaca samples as one text: the response seam of SentencePiece-style vocabularies, the
byte-level case that must not change, batched pool encoding and its memo."""

from __future__ import annotations

import string
from collections import OrderedDict

import pytest

from paser import data
from paser.data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, alpaca_prompt, encode_pool, encode_sample
from paser.models import tiny_tokenizer

SP_CORPUS = [
    PROMPT_NO_INPUT, PROMPT_WITH_INPUT,
    "Give three tips for staying healthy.\nEat a balanced diet, exercise regularly and sleep well.",
    "What are the three primary colors?\nRed, blue and yellow.",
    "Describe the structure of an atom.\nAn atom is made up of a nucleus surrounded by electrons.",
]


def sentencepiece_tokenizer(prepend_scheme: str = "first"):
    """A LLaMA-2/Mistral-like BPE: Metaspace turns spaces into "▁" and prepends one to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable), show_progress=False)
    tok.train_from_iterator(SP_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class SlowView:
    """A fast tokenizer seen as a slow one: ids only, no offsets."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


def old_encoding(tok, sample, cutoff):
    """The former encode_sample: prompt and response tokenised apart, then concatenated."""
    prompt = tok(alpaca_prompt(sample))["input_ids"]
    ids = prompt + tok(sample["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids[:cutoff], min(len(prompt), cutoff), len(ids) > cutoff


def varied_rows():
    instructions = ["Name a color.", "Übersetze: 漢字", ""]
    inputs = ["", "2 and 3", "naïve 😀\ttab"]
    outputs = ["Red, blue and yellow.", "", " A leading space.", "tabs\tand  two  spaces", "ünïcödé — 漢字 😀",
               "a literal </s> inside", "word " * 120, "Line one.\nLine two.\n"]
    return [{"instruction": i, "input": x, "output": o} for i in instructions for x in inputs for o in outputs]


@pytest.fixture(autouse=True)
def empty_memo(monkeypatch):
    monkeypatch.setattr(data, "_POOL_MEMO", OrderedDict())


def as_tuple(e):
    return e.input_ids, e.prompt_len, e.truncated


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_sentencepiece_ids_are_those_of_the_joined_text(scheme):
    tok = sentencepiece_tokenizer(scheme)
    sample = {"instruction": "What are the three primary colors?", "input": "", "output": "Red, blue and yellow."}
    prompt = alpaca_prompt(sample)
    enc = encode_sample(tok, sample, cutoff=1000)
    joined = tok(prompt + sample["output"], return_offsets_mapping=True)
    assert enc.input_ids == joined["input_ids"] + [tok.eos_token_id]
    assert tok.unk_token_id not in enc.input_ids
    # prompt_len is the first response token: its span starts where the prompt ends
    offsets = joined["offset_mapping"]
    assert offsets[enc.prompt_len - 1][0] < len(prompt) == offsets[enc.prompt_len][0]
    assert tok.decode(enc.input_ids[enc.prompt_len:-1]) == sample["output"]
    # the bug this guards against: alone, the response gets a word-initial "▁" the joined text lacks
    old_ids, old_prompt_len, _ = old_encoding(tok, sample, 1000)
    assert old_ids != enc.input_ids and old_prompt_len == enc.prompt_len
    assert tok.convert_ids_to_tokens(old_ids[old_prompt_len]).startswith("▁")
    assert not tok.convert_ids_to_tokens(enc.input_ids[enc.prompt_len]).startswith("▁")


def test_a_token_merged_across_the_boundary_counts_as_prompt():
    tok = sentencepiece_tokenizer()
    sample = {"instruction": "Name a color.", "input": "", "output": "\nRed."}  # "\n\n" is one token
    prompt = alpaca_prompt(sample)
    enc = encode_sample(tok, sample, cutoff=1000)
    offsets = tok(prompt + sample["output"], return_offsets_mapping=True)["offset_mapping"]
    start, end = offsets[enc.prompt_len - 1]
    assert start < len(prompt) < end and offsets[enc.prompt_len][0] == len(prompt) + 1


def test_tokens_a_template_appends_after_the_text_are_not_prompt():
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    sample = {"instruction": "Name a color.", "input": "", "output": "Red."}
    enc = encode_sample(tok, sample, cutoff=1000)
    assert enc.input_ids[:enc.prompt_len] == tok(alpaca_prompt(sample))["input_ids"][:-1]
    assert enc.input_ids[enc.prompt_len:] == tok("Red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * 2
    empty = encode_sample(tok, {**sample, "output": ""}, cutoff=1000)
    assert empty.prompt_len == len(empty.input_ids) - 2


def test_byte_level_bpe_ids_are_unchanged():
    """At the template's newline a byte-level BPE splits anyway: the former ids, masks and flags stand."""
    tok = tiny_tokenizer()
    for cutoff in (16, 128, 1000):
        for row in varied_rows():
            assert as_tuple(encode_sample(tok, row, cutoff)) == old_encoding(tok, row, cutoff), (row, cutoff)


@pytest.mark.parametrize("make", [tiny_tokenizer, sentencepiece_tokenizer])
def test_pool_encoding_equals_per_sample_encoding(make, monkeypatch):
    monkeypatch.setattr(data, "_BATCH", 7)  # several batches, the last one short
    tok = make()
    rows = varied_rows()
    for cutoff in (16, 128):
        pool = encode_pool(tok, rows, cutoff)
        assert pool == [encode_sample(tok, r, cutoff) for r in rows]
        assert {e.truncated for e in pool} == ({True} if cutoff == 16 else {True, False})
        for e, r in zip(pool, rows):
            full = tok(alpaca_prompt(r) + r["output"])["input_ids"] + [tok.eos_token_id]
            assert e.input_ids == full[:cutoff] and e.truncated == (len(full) > cutoff)
            assert e.prompt_len <= len(e.input_ids)


@pytest.mark.parametrize("make", [tiny_tokenizer, sentencepiece_tokenizer])
def test_slow_tokenizers_find_the_boundary_from_the_prompt_alone(make):
    tok = make()
    for row in varied_rows():
        assert encode_sample(SlowView(tok), row, 128) == encode_sample(tok, row, 128), row
    encode_pool(SlowView(tok), varied_rows(), 128)
    assert not data._POOL_MEMO  # nothing to key a slow tokenizer on


def test_the_memo_serves_equal_content_and_only_that():
    tok = tiny_tokenizer()
    rows = varied_rows()
    first = encode_pool(tok, rows, 1000)
    again = encode_pool(tok, [dict(r) for r in rows], 1000)  # a copy: keyed on content, not identity
    assert again is not first and all(a is b for a, b in zip(first, again))
    changed = [dict(r) for r in rows]
    changed[0]["output"] = "Green."
    fresh = encode_pool(tok, changed, 1000)
    assert fresh[0] == encode_sample(tok, changed[0], 1000) != first[0] and fresh[1] is not first[1]
    assert encode_pool(tok, rows, 999)[0] is not first[0]
    tok.add_tokens(["Green"])  # a tokenizer changed in place is a different key
    assert encode_pool(tok, changed, 1000)[0] == encode_sample(tok, changed[0], 1000) != fresh[0]
    assert len(data._POOL_MEMO) == data._POOL_MEMO_SIZE
