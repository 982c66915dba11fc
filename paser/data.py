"""Instruction pools, the Alpaca prompt template, calibration windows and evaluation corpora.

Everything is read from a configured location (by default the offline copies in ``../shared/data``) or,
when that file does not exist, from a dataset hub id. Rows are validated strictly: a malformed line stops
the run with the file and line number, because a silently skipped row changes the pool.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import itertools
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    origin: tuple[int, ...] | None = None  # the rows' indices in the pool they were taken from (hold_out)
    lines: tuple[int, ...] | None = None  # a loaded pool's rows in its source: line of the file, row of a hub split

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def positions(self):
        """Index of each row in the pool it comes from (its own index for a pool that was not split)."""
        return self.origin if self.origin is not None else range(len(self.rows))

    def subset(self, indices) -> list[dict]:
        return [self.rows[i] for i in indices]


def hold_out(pool: Pool, size: int, seed: int) -> tuple[Pool, list[int]]:
    """(candidates, held-out indices): ``size`` rows drawn from the pool by ``seed`` alone and kept out of
    the candidates. Drawn before any selector runs, the held-out rows (recovery's validation set) are the
    same for every selector and run seed of a comparison, so validation curves compare across rows."""
    if size <= 0:
        return pool, []
    if size >= len(pool):
        raise ConfigError(f"recovery.val_size={size} leaves no candidates: the pool has {len(pool)} samples; "
                          "lower recovery.val_size")
    held = sorted(random.Random(seed).sample(range(len(pool)), size))
    kept = sorted(set(range(len(pool))) - set(held))
    rows = [pool.rows[i] for i in kept]
    return Pool(rows=rows, source=f"{pool.source} without {size} validation rows (seed {seed})",
                fingerprint=_fingerprint(rows), origin=tuple(kept)), held


def _fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r[f] for f in FIELDS], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; any undecodable line or missing field is an error naming file and line."""
    return [row for _, row in numbered_jsonl(path, required)]


def numbered_jsonl(path: Path, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                   hint: str = "") -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line of a JSONL file. Every ``required`` field must be a string,
    an ``optional`` one a string or null when present; an error names file and line (and adds ``hint`` when
    a field is missing)."""
    rows = []
    with open(path, "rb") as f:  # decoded line by line, so that a byte that is not UTF-8 is found by its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line is "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
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
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}; every row needs {list(required)} "
                                f"and this one has {list(row)}{hint}")
            bad = [k for k in required if not isinstance(row[k], str)] + \
                [k for k in optional if not isinstance(row.get(k, ""), str | None)]
            if bad:
                raise DataError(f"{path}:{lineno}: field(s) {bad} must be strings")
            rows.append((lineno, row))
    return rows


def load_hub_dataset(hub_id: str, error: type[Exception], explain, **kwargs):
    """``datasets.load_dataset(hub_id, **kwargs)``, or ``error(explain(reason))`` when it cannot be loaded:
    offline failures come as many exception types, and the message must say what to do instead."""
    try:
        import datasets

        return datasets.load_dataset(hub_id, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise error(explain(f"{type(e).__name__}: {e}")) from None


def _rows_from_hub(hub_id: str, split: str, fields: tuple[str, ...], local_path) -> list[dict]:
    ds = load_hub_dataset(hub_id, DataError, lambda reason: (
        f"instruction pool not found at '{local_path}', and the hub dataset '{hub_id}' could not be "
        f"loaded ({reason}). Point data.path (or paths.data_dir) at a local JSONL file "
        "with instruction/input/output fields."), split=split)
    return [{k: str(r.get(k) or "") for k in fields} for r in ds]


def load_pool(path: str | None, hub_id: str | None = None, split: str = "train",
              subsample: int | None = None, seed: int = 0, field_map: dict | None = None,
              drop_duplicates: bool = True) -> Pool:
    """Load the instruction pool from ``path`` (JSONL) if it exists, else from ``hub_id``.

    ``field_map`` maps our fields to the source's, e.g. {instruction: prompt, output: completion} (null: the
    source has no such field, so it is empty). Instruction and output must be on every row; a row without
    the input field has an empty input. ``subsample`` draws a seeded random subset of that many rows (kept
    in pool order), for quick runs. ``Pool.lines`` keeps each row's line in the file (row of a hub split).
    """
    field_map = dict(field_map or {})
    unknown = sorted(set(field_map) - set(FIELDS), key=str)
    if unknown:
        raise ConfigError(f"data.field_map: {unknown} are not fields of a pool row; allowed: {list(FIELDS)} "
                          "(each mapped to the source's field name, or null when the source has none)")
    source_fields = dict(zip(FIELDS, (field_map.get(f, f) for f in FIELDS)))
    required = tuple(source_fields[f] for f in ("instruction", "output") if source_fields[f])
    optional = (source_fields["input"],) if source_fields["input"] else ()
    if path and Path(path).is_file():
        numbered = numbered_jsonl(Path(path), required, optional, hint=(
            ". If your file names them differently, map them to ours with one override, e.g. "
            "data.field_map='{instruction: prompt, output: completion}' (README: Your own data)"))
        source = str(path)
    elif hub_id:
        log.info("pool file %s not found; loading hub dataset %s", path, hub_id)
        rows = _rows_from_hub(hub_id, split, required + optional, path)
        numbered = list(enumerate(rows, start=1))
        source = hub_id
    else:
        raise DataError(f"instruction pool not found at '{path}' and no data.hub_id configured; "
                        "set data.path to a JSONL file of {instruction, input, output} rows")
    rows = [{ours: (r.get(theirs) or "") if theirs else "" for ours, theirs in source_fields.items()}
            for _, r in numbered]
    lines = [lineno for lineno, _ in numbered]
    if not rows:
        raise DataError(f"instruction pool {source} is empty")
    rows, lines, source = without_duplicates(rows, lines, source, drop_duplicates)
    if subsample is not None:
        if isinstance(subsample, bool) or not isinstance(subsample, int) or not 0 < subsample <= len(rows):
            raise ConfigError(f"data.subsample={subsample} must be a whole number of samples in 1..{len(rows)} "
                              "(the pool size), or null for the whole pool")
        keep = sorted(random.Random(seed).sample(range(len(rows)), subsample))
        rows, lines = [rows[i] for i in keep], [lines[i] for i in keep]
        source += f" (seeded subsample {subsample}, seed {seed})"
    return Pool(rows=rows, source=source, fingerprint=_fingerprint(rows), lines=tuple(lines))


def pool_from_config(path: str | None = None, hub_id: str | None = None, split: str = "train",
                     subsample: int | None = None, subsample_seed: int = 0, field_map: dict | None = None,
                     drop_duplicates: bool = True, name: str | None = None, **unknown) -> Pool:
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
    if not isinstance(drop_duplicates, bool):
        raise ConfigError(f"data.drop_duplicates={drop_duplicates!r} is not a boolean; allowed: true or false")
    return load_pool(path, hub_id, split, subsample, subsample_seed, field_map=field_map,
                     drop_duplicates=drop_duplicates)


def without_duplicates(rows: list[dict], lines: list[int], source: str, drop: bool = True
                       ) -> tuple[list[dict], list[int], str]:
    """(rows, lines, source) with every repeat of an earlier row dropped (``drop``) or only counted: a
    repeat has the same instruction, input and output up to surrounding whitespace. A copy left in the pool
    can be drawn both for training and for validation (``hold_out``), where it leaks into ``keep: best``,
    and be selected twice. The count goes into the log and the pool's ``source`` (results.json's selection
    record, ``pool_source``)."""
    first: dict[tuple, int] = {}
    repeats = {}  # index of a repeat -> index of the row it repeats
    for i, r in enumerate(rows):
        j = first.setdefault(tuple(r[f].strip() for f in FIELDS), i)
        if j != i:
            repeats[i] = j
    if not repeats:
        return rows, lines, source
    log.warning("instruction pool %s: %d of its %d rows repeat an earlier one (line: line repeated, first few: "
                "%s); %s", source, len(repeats), len(rows),
                ", ".join(f"{lines[i]}: {lines[j]}" for i, j in list(repeats.items())[:5]),
                "dropped" if drop else "kept (data.drop_duplicates=false)")
    source += f" ({len(repeats)} duplicate rows {'dropped' if drop else 'kept'})"
    if not drop:
        return rows, lines, source
    kept = [i for i in range(len(rows)) if i not in repeats]
    return [rows[i] for i in kept], [lines[i] for i in kept], source


class TokenIds(Sequence):
    """A sample's token ids, read-only, kept in a numpy array that ``encode_pool`` shares between the
    samples of a batch (2 bytes a token, or 4 past 65,536 ids, instead of a Python int and its list slot:
    ~36 bytes; 2.58M LaMini samples would take ~10 GB as lists). It compares equal to a list of the same
    ids, an index gives an int and a slice a list, ``np.asarray`` and ``torch.tensor`` give int64 ids (as of a
    list) and ``array`` the stored ones without a copy."""

    __slots__ = ("_flat", "_start", "_stop")

    def __init__(self, flat: np.ndarray, start: int = 0, stop: int | None = None):
        self._flat, self._start, self._stop = flat, start, len(flat) if stop is None else stop

    @property
    def array(self) -> np.ndarray:
        return self._flat[self._start:self._stop]

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i):
        return self.array[i].tolist()

    def __iter__(self):
        return iter(self.array.tolist())

    def __array__(self, dtype=None, copy=None):  # int64 by default, as numpy and torch make a list of ints
        return self.array.astype(dtype or np.int64)

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenIds):
            return np.array_equal(self.array, other.array)
        if isinstance(other, list | tuple):
            return self.array.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # like the list it stands for

    def __repr__(self) -> str:
        return f"TokenIds({self.array.tolist()})"


@dataclass(frozen=True, slots=True)
class EncodedSample:
    input_ids: Sequence[int]  # TokenIds from encode_pool / encode_sample; a list works as well
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

    def tokenise(texts: list[str], prompts: list[str]) -> list[tuple[list[int], int]]:
        if getattr(tokenizer, "is_fast", False):
            batch = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                              return_special_tokens_mask=True, return_attention_mask=False)
            return [(ids, _response_start(offsets, special, len(p))) for ids, offsets, special, p in
                    zip(batch["input_ids"], batch["offset_mapping"], batch["special_tokens_mask"], prompts)]
        all_ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        return [(ids, _common_prefix(tokenizer(p, add_special_tokens=True)["input_ids"], ids))
                for p, ids in zip(prompts, all_ids)]

    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    heads = tokenise_heads(tokenise, texts, prompts, cutoff)[0]
    kept = [(ids + eos)[:cutoff] for ids, _ in heads]
    top = max((max(ids) for ids in kept if ids), default=0)
    flat = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.uint16 if top < 2**16 else np.int32,
                       count=sum(map(len, kept)))  # the batch's ids in one array, shared by its samples
    flat.flags.writeable = False
    ends = np.cumsum([len(ids) for ids in kept]).tolist()
    return [EncodedSample(input_ids=TokenIds(flat, end - len(ids), end), prompt_len=min(start, cutoff),
                          truncated=len(full) + len(eos) > cutoff)
            for ids, end, (full, start) in zip(kept, ends, heads)]


CHARS_PER_TOKEN = 8  # a first guess at the characters a token covers: texts are cut at this many per token kept
SEAM_TOKENS = 64  # tokens past those kept that the cut text must still give: a cut changes only the last few


def tokenise_heads(tokenise, texts: list[str], prompts: list[str], keep: int) -> tuple[list, list[int]]:
    """(``tokenise(texts, prompts)``'s result per text, the characters of each text it was given): the
    result, a text's (ids, index of the first token after its prompt), computed on no more of each text
    than its first ``keep`` tokens need, so that one huge row costs what a row of ``keep`` tokens does (a
    50 MB row took 243 s and 14.5 GB when tokenised whole, with offsets).

    A text is cut to ``(keep + SEAM_TOKENS) * CHARS_PER_TOKEN`` characters, and the cut is kept when the
    cut text still gives more than ``keep + SEAM_TOKENS`` tokens: it changes only the tokens of the last
    words before it, so the first ``keep`` ids, and the prompt's end when it lies among them, are those of
    the whole text. Otherwise (long tokens: runs of spaces or symbols) it is cut 4 times longer, up to the
    whole text. Callers use only the first ``keep`` ids and ``min(start, keep)``."""
    limit = (keep + SEAM_TOKENS) * CHARS_PER_TOKEN
    out = tokenise([t[:limit] for t in texts], [p[:limit] for p in prompts])
    cuts = [min(len(t), limit) for t in texts]
    for i, text in enumerate(texts):
        while cuts[i] < len(text) and len(out[i][0]) <= keep + SEAM_TOKENS:
            cuts[i] = min(len(text), cuts[i] * 4)
            out[i] = tokenise([text[:cuts[i]]], [prompts[i][:cuts[i]]])[0]
    return out, cuts


def text_heads(tokenizer, texts: list[str], keep: int | None) -> list[str]:
    """Each text cut where ``tokenise_heads`` cuts it for ``tokenizer`` (special tokens included), for
    callers that tokenise it themselves and use at most its first ``keep`` tokens (a sentence embedder's
    ``max_seq_length``; None: no limit, the texts as they are)."""
    limit = None if keep is None else (keep + SEAM_TOKENS) * CHARS_PER_TOKEN
    long = [i for i, t in enumerate(texts) if limit is not None and len(t) > limit]
    if not long:
        return list(texts)

    def tokenise(ts: list[str], _) -> list[tuple[list[int], int]]:  # quiet: the cut texts exceed the model's length
        return [(ids, 0) for ids in tokenizer(ts, add_special_tokens=True, verbose=False)["input_ids"]]

    _, cuts = tokenise_heads(tokenise, [texts[i] for i in long], [""] * len(long), keep)
    heads = list(texts)
    for i, cut in zip(long, cuts):
        heads[i] = texts[i][:cut]
    return heads


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
    for r in rows:  # row by row: one JSON text of a 2.58M-row pool would be gigabytes
        h.update(json.dumps([r["instruction"], r.get("input", ""), r["output"]]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- calibration and evaluation corpora

CALIBRATION_SOURCES = ("local", "hub")
CALIBRATION_SAMPLINGS = ("with_replacement", "without_replacement")
CALIBRATION_FALLBACKS = ("error", "concatenate")
C4_HUB_ID = "allenai/c4"  # the references' shard (Wanda lib/data.py, SparseGPT datautils.py get_c4)
C4_HUB_FILES = "en/c4-train.00000-of-01024.json.gz"


@dataclass(frozen=True)
class CalibrationRecipe:
    """What determines the calibration windows (``pruner.calibration``, validated; ``seqlen`` resolved).

    source    local: the JSONL file ``path``; hub: ``hub_id`` with ``data_files`` through ``datasets``
    sampling  with_replacement: the references' loop (a random document, drawn again until it is longer
              than ``seqlen``, then a random window of it; a document can be drawn twice);
              without_replacement: a seeded shuffle of the documents, each long one used at most once
    fallback  error | concatenate: what a local file with fewer documents longer than ``seqlen`` than
              windows asked for does (concatenate: windows cut from all its documents joined end to end)
    """

    source: str
    path: str | None
    hub_id: str
    data_files: str
    nsamples: int
    seqlen: int
    seed: int
    sampling: str
    fallback: str
    model_context: int | None = None

    @property
    def origin(self) -> str:
        return str(self.path) if self.source == "local" else f"{self.hub_id} {self.data_files}"


def _choice(c, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = c.get(key, default)
    if value not in allowed:
        raise ConfigError(f"pruner.calibration.{key}={value!r}; allowed: {', '.join(allowed)}")
    return value


def calibration_recipe(c, context_length: int | None = None) -> CalibrationRecipe:
    """``pruner.calibration`` (a mapping) checked and resolved. ``seqlen: model`` (or an interpolation of
    ``${model.context_length}``) means the model's context, ``context_length``; a window longer than the
    model's context is an error."""
    seqlen, nsamples = c.get("seqlen"), c.get("nsamples")
    if seqlen == "model":
        if not context_length:
            raise ConfigError("pruner.calibration.seqlen=model needs model.context_length; set it, or give "
                              "pruner.calibration.seqlen as a number of tokens")
        seqlen = int(context_length)
    for key, value, least in (("nsamples", nsamples, 1), ("seqlen", seqlen, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"pruner.calibration.{key}={value!r} must be a whole number >= {least}"
                              + (" (or 'model': the model's context)" if key == "seqlen" else ""))
    if context_length and seqlen > context_length:
        raise ConfigError(f"pruner.calibration.seqlen={seqlen} exceeds the model context "
                          f"(model.context_length={context_length}); lower it, or set it to 'model'")
    return CalibrationRecipe(
        source=_choice(c, "source", CALIBRATION_SOURCES, "local"), path=c.get("path"),
        hub_id=c.get("hub_id") or C4_HUB_ID, data_files=c.get("data_files") or C4_HUB_FILES,
        nsamples=nsamples, seqlen=seqlen, seed=int(c.get("seed", 0)),
        sampling=_choice(c, "sampling", CALIBRATION_SAMPLINGS, "without_replacement"),
        fallback=_choice(c, "fallback", CALIBRATION_FALLBACKS, "error"), model_context=context_length)


class _HubTexts:
    """The ``text`` column of a hub dataset, read one row at a time (the shard holds ~356K documents)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        return self.ds[i]["text"]


def _hub_documents(hub_id: str, data_files: str):
    ds = load_hub_dataset(hub_id, ConfigError, lambda reason: (
        f"pruner.calibration.source=hub: could not load {hub_id} (data_files {data_files}) "
        f"({reason}). This machine may be offline: set pruner.calibration.source=local "
        "to draw from the offline file pruner.calibration.path (the results record what was used)"),
        data_files={"train": data_files}, split="train")
    return _HubTexts(ds)


def _local_documents(path) -> list[str]:
    if not path or not Path(path).is_file():
        raise DataError(f"calibration text not found at {path}; set pruner.calibration.path to a JSONL "
                        "file with a 'text' field (e.g. a C4 shard)")
    return [r["text"] for r in read_jsonl(Path(path), required=("text",))]


def calibration_set(tokenizer, recipe: CalibrationRecipe) -> tuple[torch.Tensor, dict]:
    """(windows [nsamples, seqlen], report): ``recipe.nsamples`` random windows of ``recipe.seqlen``
    tokens (the Wanda/SparseGPT recipe, see CalibrationRecipe) and what was used, for results.json.

    A local file with fewer documents longer than the window than windows asked for raises a ConfigError
    (the references draw from a whole C4 shard, where that never happens), unless ``fallback`` is
    ``concatenate``: then windows are cut from the file's documents joined end to end, and the report and
    the log say so.
    """
    r = recipe
    docs = _local_documents(r.path) if r.source == "local" else _hub_documents(r.hub_id, r.data_files)
    memo: dict[int, torch.Tensor] = {}

    def encode(i: int) -> torch.Tensor:
        if i not in memo:
            memo[i] = tokenizer(docs[i], return_tensors="pt")["input_ids"][0]
        return memo[i]

    rng = random.Random(r.seed)
    long_docs, picked, windows = None, [], None
    if r.sampling == "without_replacement":
        picked = _draw_without_replacement(encode, len(docs), r.nsamples, r.seqlen, rng)
        long_docs = len(picked) if len(picked) < r.nsamples else None
    else:
        if r.source == "local":  # count first: the loop below would never end without enough long ones
            long_docs = sum(encode(i).numel() > r.seqlen for i in range(len(docs)))
            memo = {i: ids for i, ids in memo.items() if ids.numel() > r.seqlen}
        if long_docs is None or long_docs >= r.nsamples:
            picked = _draw_with_replacement(encode, len(docs), r.nsamples, r.seqlen, rng, r.origin)
    sampling, note = r.sampling, None
    if len(picked) < r.nsamples:
        too_few = (f"only {long_docs} of {len(docs)} documents in {r.origin} are longer than {r.seqlen} "
                   f"tokens, but {r.nsamples} windows were asked for")
        if r.fallback != "concatenate":
            raise ConfigError(
                f"pruner.calibration: {too_few}; drawing them {r.sampling.replace('_', ' ')} as the "
                f"references do needs at least {r.nsamples} such documents. Options: "
                "pruner.calibration.source=hub (the references' whole C4 shard; needs the network), a lower "
                "pruner.calibration.seqlen or nsamples, or pruner.calibration.fallback=concatenate (windows "
                "cut from the documents joined end to end; recorded in results.json prune.calibration)")
        rng = random.Random(r.seed)
        windows, used = _draw_concatenated(encode, len(docs), r.nsamples, r.seqlen, rng, r.origin)
        sampling = "concatenated"
        note = (f"{too_few}: windows cut from the {len(docs)} documents joined end to end "
                "(pruner.calibration.fallback=concatenate), not drawn from single documents as the "
                "references do")
        log.warning("calibration: %s", note)
    else:
        windows = torch.stack([encode(i)[s:s + r.seqlen] for i, s in picked])
        used = len({i for i, _ in picked})
    report = {"source": r.source, "from": r.origin, "nsamples": r.nsamples, "seqlen": r.seqlen,
              "seed": r.seed, "sampling": sampling, "fallback": r.fallback, "model_context": r.model_context,
              "documents": {"available": len(docs), "longer_than_seqlen": long_docs, "used": used},
              "document_indices": [i for i, _ in picked] if sampling != "concatenated" else None,
              "differs_from_reference": _deviations(r, sampling), "note": note}
    log.info("calibration: %d windows x %d tokens from %s (%s), %s, seed %d; %d distinct documents%s",
             r.nsamples, r.seqlen, r.origin, r.source, sampling.replace("_", " "), r.seed, used,
             "" if not report["differs_from_reference"] else
             "; differs from the references: " + "; ".join(report["differs_from_reference"]))
    return windows, report


def _deviations(r: CalibrationRecipe, sampling: str) -> list[str]:
    out = []
    if r.source == "local":
        out.append(f"documents from the local file {r.path}, not the Wanda/SparseGPT "
                   f"references' hub shard {C4_HUB_ID} {C4_HUB_FILES}")
    elif (r.hub_id, r.data_files) != (C4_HUB_ID, C4_HUB_FILES):
        out.append(f"hub documents from {r.hub_id} {r.data_files}, not {C4_HUB_ID} {C4_HUB_FILES}")
    if sampling == "without_replacement":
        out.append("documents drawn without replacement (Wanda/SparseGPT draw with replacement)")
    elif sampling == "concatenated":
        out.append("windows cut from concatenated documents (pruner.calibration.fallback=concatenate)")
    return out


def _draw_without_replacement(encode, n_docs: int, nsamples: int, seqlen: int, rng) -> list[tuple[int, int]]:
    """(document, start) pairs: the documents in a seeded random order, each longer than the window
    giving one random window, until ``nsamples`` (fewer if the documents run out)."""
    order = list(range(n_docs))
    rng.shuffle(order)
    picked = []
    for i in order:
        length = encode(i).numel()
        if length <= seqlen:
            continue
        picked.append((i, rng.randint(0, length - seqlen - 1)))
        if len(picked) == nsamples:
            break
    return picked


def _draw_with_replacement(encode, n_docs: int, nsamples: int, seqlen: int, rng, origin: str
                           ) -> list[tuple[int, int]]:
    """(document, start) pairs by the references' loop: per window a uniformly random document, drawn
    again until it is longer than the window, then a uniformly random start in it (``randint`` calls in
    that order, from one generator seeded once, as ``random.seed(seed)`` there). "Longer" is Wanda's
    ``>``; SparseGPT's ``>=`` differs only on a document of exactly ``seqlen`` tokens, where its
    ``randint(0, -1)`` fails."""
    picked = []
    for _ in range(nsamples):
        for _attempt in range(10 * n_docs + 100):  # the references loop forever; 10 N misses mean none is long enough
            i = rng.randint(0, n_docs - 1)
            length = encode(i).numel()
            if length > seqlen:
                break
        else:
            raise ConfigError(f"pruner.calibration: no document of {origin} longer than {seqlen} tokens was "
                              f"found in {10 * n_docs + 100} draws; lower pruner.calibration.seqlen")
        picked.append((i, rng.randint(0, length - seqlen - 1)))
    return picked


def _draw_concatenated(encode, n_docs: int, nsamples: int, seqlen: int, rng, origin: str
                       ) -> tuple[torch.Tensor, int]:
    """(windows, distinct documents they overlap): the documents tokenised one by one (with the
    tokenizer's special tokens) and joined in file order, windows at seeded random starts (as the
    references' WikiText-2 loader cuts one stream)."""
    stream = torch.cat([encode(i) for i in range(n_docs)])
    if stream.numel() <= seqlen:
        raise ConfigError(f"pruner.calibration: all {n_docs} documents of {origin} together hold "
                          f"{stream.numel()} tokens, not more than seqlen={seqlen}; lower the seqlen")
    ends = list(itertools.accumulate(encode(i).numel() for i in range(n_docs)))
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    used = set()
    for s in starts:
        used.update(range(bisect.bisect_right(ends, s), bisect.bisect_right(ends, s + seqlen - 1) + 1))
    return torch.stack([stream[s:s + seqlen] for s in starts]), len(used)


def calibration_windows(tokenizer, path: str, nsamples: int, seqlen: int, seed: int = 0, **options
                        ) -> torch.Tensor:
    """Random ``seqlen``-token windows from random C4 documents (the Wanda/SparseGPT recipe): the windows
    of ``calibration_set`` for a local file (``options``: the other ``pruner.calibration`` keys, e.g.
    ``sampling``, ``fallback``, ``source``)."""
    return calibration_set(tokenizer, calibration_recipe(
        {"path": path, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, **options}))[0]


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
