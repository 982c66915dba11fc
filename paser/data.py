"""Instruction pools, the Alpaca prompt template, calibration windows and evaluation corpora.

Everything is read from a configured location (by default the offline copies in ``../shared/data``) or,
when that file does not exist, from a dataset hub id. Rows are validated strictly: a malformed line stops
the run with the file and line number, because a silently skipped row changes the pool.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FIELDS = ("instruction", "input", "output")


def alpaca_prompt(sample: dict) -> str:
    """The Stanford Alpaca prompt (everything before the response)."""
    template = PROMPT_WITH_INPUT if sample.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=sample["instruction"], input=sample.get("input", ""))


@dataclass(frozen=True)
class Pool:
    """The candidate instruction data D: rows of {instruction, input, output}."""

    rows: list[dict]
    source: str
    fingerprint: str  # content hash: caches keyed on the pool survive renames and moves

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> list[dict]:
        return [self.rows[i] for i in indices]


def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r[f] for f in FIELDS], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; any undecodable line or missing field is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}; every row needs {list(required)}")
            bad = [k for k in required if not isinstance(row[k], str)]
            if bad:
                raise DataError(f"{path}:{lineno}: field(s) {bad} must be strings")
            rows.append(row)
    return rows


def _rows_from_hub(hub_id: str, split: str, fields: tuple[str, ...], local_path) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 -- offline failures come as many types: say what to do instead
        raise DataError(
            f"instruction pool not found at '{local_path}', and the hub dataset '{hub_id}' could not be "
            f"loaded ({type(e).__name__}: {e}). Point data.path (or paths.data_dir) at a local JSONL file "
            "with instruction/input/output fields."
        ) from None
    return [{k: str(r.get(k) or "") for k in fields} for r in ds]


def load_pool(path: str | None, hub_id: str | None = None, split: str = "train",
              subsample: int | None = None, seed: int = 0, field_map: dict | None = None) -> Pool:
    """Load the instruction pool from ``path`` (JSONL) if it exists, else from ``hub_id``.

    ``field_map`` maps our fields to the source's, e.g. {output: response, input: null} for LaMini
    (null: the source has no such field, so it is empty); every other field must be on every row. ``subsample`` draws a seeded random subset of that many rows
    (kept in pool order), for quick runs.
    """
    field_map = dict(field_map or {})
    unknown = sorted(set(field_map) - set(FIELDS), key=str)
    if unknown:
        raise ConfigError(f"data.field_map: {unknown} are not fields of a pool row; allowed: {list(FIELDS)} "
                          "(each mapped to the source's field name, or null when the source has none)")
    source_fields = tuple(field_map.get(f, f) for f in FIELDS)
    if path and Path(path).is_file():
        rows = read_jsonl(Path(path), required=tuple(f for f in source_fields if f))
        source = str(path)
    elif hub_id:
        log.info("pool file %s not found; loading hub dataset %s", path, hub_id)
        rows = _rows_from_hub(hub_id, split, tuple(f for f in source_fields if f), path)
        source = hub_id
    else:
        raise DataError(f"instruction pool not found at '{path}' and no data.hub_id configured; "
                        "set data.path to a JSONL file of {instruction, input, output} rows")
    rows = [{ours: r[theirs] if theirs else "" for ours, theirs in zip(FIELDS, source_fields)} for r in rows]
    if not rows:
        raise DataError(f"instruction pool {source} is empty")
    if subsample is not None:
        if isinstance(subsample, bool) or not isinstance(subsample, int) or not 0 < subsample <= len(rows):
            raise ConfigError(f"data.subsample={subsample} must be a whole number of samples in 1..{len(rows)} "
                              "(the pool size), or null for the whole pool")
        keep = sorted(random.Random(seed).sample(range(len(rows)), subsample))
        rows = [rows[i] for i in keep]
        source += f" (seeded subsample {subsample}, seed {seed})"
    return Pool(rows=rows, source=source, fingerprint=_fingerprint(rows))


def pool_from_config(path: str | None = None, hub_id: str | None = None, split: str = "train",
                     subsample: int | None = None, subsample_seed: int = 0, field_map: dict | None = None,
                     name: str | None = None, **unknown) -> Pool:
    """The ``_target_`` of every data preset (conf/data/jsonl.yaml names each key): the pool it describes.

    A key that is not one of these parameters stops the run with its name and the allowed ones: Hydra adds
    keys that an experiment or a ``+data.<key>`` override sets, and a silently ignored key changes the pool.
    ``name`` labels the preset (logs, W&B); the pool's identity is its content (``Pool.fingerprint``).
    """
    if unknown:
        allowed = [p for p in inspect.signature(pool_from_config).parameters if p != "unknown"]
        raise ConfigError(f"data.{min(unknown)} is not a key of the data config"
                          f"{f' ({name})' if name else ''}; allowed: {', '.join(allowed)}")
    if not path and not hub_id:
        raise ConfigError(f"data.path is not set{f' (data={name})' if name else ''}: add data.path=<a JSONL "
                          "file of {instruction, input, output} rows>")
    return load_pool(path, hub_id, split, subsample, subsample_seed, field_map=field_map)


def resolve_budget(budget: float, pool_size: int) -> int:
    """A budget is a count (int >= 1) or a fraction of the pool (0 < float <= 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"budget must be a count or a fraction of the pool, got {budget!r}")
    if budget <= 0:
        raise ConfigError(f"budget={budget} must be > 0 (a count, or a fraction in (0, 1])")
    if isinstance(budget, float) and budget <= 1.0:
        return max(1, int(budget * pool_size))
    if budget != int(budget):
        raise ConfigError(f"budget={budget} is neither a fraction in (0, 1] nor a whole count")
    if budget > pool_size:
        raise ConfigError(f"budget={int(budget)} is larger than the pool ({pool_size} samples)")
    return int(budget)


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    prompt_len: int  # tokens before the response; labels start here
    truncated: bool


def encode_sample(tokenizer, sample: dict, cutoff: int, add_eos: bool = True) -> EncodedSample:
    """Tokenise prompt + response (Alpaca template) as one text, truncated to ``cutoff`` tokens.

    The ids are those of the joined text with the tokenizer's special tokens, EOS appended, so training
    and scoring see what the tokenizer makes of the whole sample. Tokenising the response on its own
    differs for SentencePiece-style vocabularies (LLaMA-2, Mistral, Baichuan: "▁" is prepended to a
    text's first word): after "### Response:\n" the joined text has "Red", the response alone "▁Red".
    Byte-level BPEs (GPT-2, LLaMA-3, SmolLM2) split at that newline anyway and give the same ids both ways.

    ``prompt_len`` indexes the first token of the text whose character span starts at or after the
    prompt's end (a fast tokenizer's offsets), so a token merged across the boundary counts as prompt.
    Slow tokenizers have no offsets: there it is the common prefix of the joined text's ids and those of
    the prompt tokenised alone.
    """
    return _encode(tokenizer, [sample], cutoff, add_eos)[0]


def _encode(tokenizer, samples: list[dict], cutoff: int, add_eos: bool) -> list[EncodedSample]:
    """encode_sample for each sample, in one batched call of a fast tokenizer."""
    prompts = [alpaca_prompt(s) for s in samples]
    texts = [p + s["output"] for p, s in zip(prompts, samples)]
    if getattr(tokenizer, "is_fast", False):
        batch = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                          return_special_tokens_mask=True, return_attention_mask=False)
        all_ids = batch["input_ids"]
        starts = [_response_start(offsets, special, len(p))
                  for offsets, special, p in zip(batch["offset_mapping"], batch["special_tokens_mask"], prompts)]
    else:
        all_ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        starts = [_common_prefix(tokenizer(p, add_special_tokens=True)["input_ids"], ids)
                  for p, ids in zip(prompts, all_ids)]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    encoded = []
    for ids, start in zip(all_ids, starts):
        ids = ids + eos
        encoded.append(EncodedSample(input_ids=ids[:cutoff], prompt_len=min(start, cutoff),
                                     truncated=len(ids) > cutoff))
    return encoded


def _response_start(offsets, special, prompt_chars: int) -> int:
    """The first token starting at or after ``prompt_chars``; the text's tokens come in order of their spans.

    Tokens the post-processor adds have empty spans at 0: a leading BOS sorts before every span, and those
    after the text (an EOS some templates append) are left out of the search, so they belong to the response.
    """
    end = len(offsets)
    while end and special[end - 1]:
        end -= 1
    return bisect.bisect_left(offsets, (prompt_chars,), 0, end)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


_BATCH = 1024  # rows per tokenizer call: bounds the Python offset lists alive at once

# The last few pool encodings, so that the stages of one process (selection, scoring, a multirun's budgets)
# tokenise a pool once. Keyed on content (the rows' texts, the tokenizer's serialised state), not on object
# ids: Python reuses ids, and rows or a tokenizer changed in place keep theirs.
_POOL_MEMO: OrderedDict[str, list[EncodedSample]] = OrderedDict()
_POOL_MEMO_SIZE = 2  # a pool and its latest subset; all 52K Alpaca rows at cutoff 256 hold ~170 MiB


def encode_pool(tokenizer, rows: list[dict], cutoff: int) -> list[EncodedSample]:
    """encode_sample for each row, in batched tokenizer calls, memoised in this process for fast tokenizers.

    A repeated call returns a new list of the same EncodedSample objects: treat their ids as read-only.
    """
    key = _pool_key(tokenizer, rows, cutoff)
    if key in _POOL_MEMO:
        _POOL_MEMO.move_to_end(key)
        return list(_POOL_MEMO[key])
    encoded = []
    for i in range(0, len(rows), _BATCH):
        encoded += _encode(tokenizer, rows[i:i + _BATCH], cutoff, add_eos=True)
    n_trunc = sum(e.truncated for e in encoded)
    if n_trunc:
        log.info("%d of %d samples truncated to %d tokens", n_trunc, len(encoded), cutoff)
    if key is not None:
        _POOL_MEMO[key] = encoded
        while len(_POOL_MEMO) > _POOL_MEMO_SIZE:
            _POOL_MEMO.popitem(last=False)
    return list(encoded)


def _pool_key(tokenizer, rows: list[dict], cutoff: int) -> str | None:
    """A hash of everything the encoding depends on; None for slow tokenizers, which have no state to hash."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return None
    h = hashlib.sha256(json.dumps([cutoff, tokenizer.eos_token_id, tokenizer.split_special_tokens]).encode())
    h.update(backend.to_str().encode())
    h.update(json.dumps([[r["instruction"], r.get("input", ""), r["output"]] for r in rows]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- calibration and evaluation corpora


def calibration_windows(tokenizer, path: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Random ``seqlen``-token windows from random C4 documents (the Wanda/SparseGPT recipe).

    Documents shorter than the window are skipped, as in the reference code; if too few documents are
    long enough the error says so instead of silently changing the recipe.
    """
    if nsamples <= 0 or seqlen <= 1:
        raise ConfigError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if not Path(path).is_file():
        raise DataError(f"calibration text not found at {path}; set pruner.calibration.path to a JSONL "
                        "file with a 'text' field (e.g. a C4 shard)")
    docs = [r["text"] for r in read_jsonl(Path(path), required=("text",))]
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    windows = []
    for i in order:
        ids = tokenizer(docs[i], return_tensors="pt")["input_ids"][0]
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
        if len(windows) == nsamples:
            return torch.stack(windows)
    raise DataError(f"only {len(windows)} of {len(docs)} documents in {path} are longer than {seqlen} "
                    f"tokens, but {nsamples} windows were asked for; lower pruner.calibration.seqlen "
                    "or nsamples")


def ppl_corpus_path(name: str, data_dir: str) -> Path:
    """The file a perplexity corpus is read from: wikitext2 = WikiText-2 raw *test*; ptb = Penn Treebank
    *validation* (LLM-Pruner's choice); ptb_test = PTB test."""
    root = Path(data_dir)
    paths = {"wikitext2": root / "wikitext2" / "test.rows.jsonl", "ptb": root / "ptb" / "ptb.valid.txt",
             "ptb_test": root / "ptb" / "ptb.test.txt"}
    if name not in paths:
        raise ConfigError(f"unknown perplexity corpus '{name}'; allowed: {', '.join(paths)}")
    _require(paths[name], name)
    return paths[name]


def ppl_corpus_text(name: str, data_dir: str) -> str:
    """The evaluation text joined as LLM-Pruner does: rows joined with blank lines."""
    path = ppl_corpus_path(name, data_dir)
    if name == "wikitext2":
        return "\n\n".join(r["text"] for r in read_jsonl(path, required=("text",)))
    # the hub's ptb_text_only rows are the stripped lines of this file
    return "\n\n".join(line.strip() for line in path.read_text().splitlines())


def _require(path: Path, name: str) -> None:
    if not path.is_file():
        raise DataError(f"{name}: expected {path}; set paths.data_dir to the folder holding the offline "
                        "datasets (see the README)")
