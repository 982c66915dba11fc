"""The offline copies of the zero-shot benchmarks (``paths.data_dir``) in the schema of their hub datasets.

The task YAMLs in ``paser/evaluation/tasks/`` are lm-eval's built-in ones with the dataset swapped for
``custom_dataset: !function paser.evaluation.offline_tasks.load_<task>``; lm-eval calls these loaders with
the task metadata as keyword arguments, where ``ZeroShotEvaluator`` puts ``paser_data_dir``. Because every
row is converted into exactly the fields the hub rows have, the YAMLs can keep the built-in templates, and
lm-eval's own process_docs / doc_to_* functions apply unchanged: the prompts and continuations are the
built-in tasks' (tests/test_zeroshot_tasks.py checks this request by request).
"""

from __future__ import annotations

import re
from pathlib import Path

from paser.data import read_jsonl
from paser.errors import ConfigError, DataError

# the files each local task reads, relative to paths.data_dir
FILES = {
    "boolq": ["boolq/validation.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "hellaswag": ["hellaswag/validation.jsonl"],
    "winogrande": ["winogrande/dev.jsonl"],
    "arc_easy": ["arc/arc_easy_test.jsonl"],
    "arc_challenge": ["arc/arc_challenge_test.jsonl"],
    "openbookqa": ["openbookqa/test.jsonl"],
    "wikitext": ["wikitext2/wiki.test.raw"],
}


def data_files(task: str, data_dir: str | Path) -> list[Path]:
    """The offline files of ``task``; a missing one is a DataError naming where it was looked for."""
    paths = [Path(data_dir) / f for f in FILES[task]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{task}: expected {p.resolve()}; set paths.data_dir to the folder holding the "
                            "offline datasets, or use evaluator.zeroshot.source=hub on a machine with hub access")
    return paths


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _root(paser_data_dir: str | None) -> str:
    if not paser_data_dir:
        raise ConfigError("local lm-eval tasks need the data folder in the task metadata 'paser_data_dir' "
                          "(ZeroShotEvaluator sets it from paths.data_dir)")
    return paser_data_dir


def load_boolq(paser_data_dir: str | None = None, **_):
    (path,) = data_files("boolq", _root(paser_data_dir))
    # super_glue's questions carry no "?" (the template adds it); this copy ends every question with one
    rows = [{"question": r["question"].rstrip().removesuffix("?").rstrip(), "passage": r["passage"],
             "idx": i, "label": int(r["label"])}
            for i, r in enumerate(read_jsonl(path, required=("question", "passage")))]
    return _dataset("validation", rows)


def load_piqa(paser_data_dir: str | None = None, **_):
    path, labels_path = data_files("piqa", _root(paser_data_dir))
    rows = read_jsonl(path, required=("goal", "sol1", "sol2"))
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise DataError(f"{labels_path} has {len(labels)} labels but {path} has {len(rows)} rows")
    return _dataset("validation", [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y}
                                   for r, y in zip(rows, labels)])


# the incomplete noun phrase that ends an ActivityNet context ("... on a roof. he"): the hub's ctx_b
_CTX_B = re.compile(r'(?<=[.!?])"?\s+([^.!?]+)$')


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from the joined ``ctx`` of the offline copy.

    The hub rows keep them apart and lm-eval capitalises ctx_b. In the validation set every ActivityNet
    context ends in such a fragment after a sentence end and every WikiHow context ends with a full stop
    (ctx_b empty), so the split is exact except where the fragment itself starts with a digit or a quote
    (a handful of rows, where capitalising it is a no-op either way unless the true ctx_b starts later).
    """
    m = _CTX_B.search(ctx)
    if m is None:
        return ctx, ""
    return ctx[:m.start(1)].rstrip(), m.group(1)


def hellaswag_hub_rows(path: Path) -> list[dict]:
    rows = []
    for i, r in enumerate(read_jsonl(path, required=("activity_label", "ctx"))):
        ctx_a, ctx_b = split_hellaswag_ctx(r["ctx"])
        rows.append({"ind": i, "activity_label": r["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": r["ctx"], "endings": list(r["endings"]), "label": str(r["label"])})
    return rows


def load_hellaswag(paser_data_dir: str | None = None, **_):
    """Hub-schema rows put through lm-eval's own hellaswag process_docs here, once: as a YAML
    process_docs lm-eval would redo that map (seconds for 10k rows) on every access to the docs."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    (path,) = data_files("hellaswag", _root(paser_data_dir))
    ds = _dataset("validation", hellaswag_hub_rows(path))
    ds["validation"] = process_docs(ds["validation"])
    return ds


def load_winogrande(paser_data_dir: str | None = None, **_):
    (path,) = data_files("winogrande", _root(paser_data_dir))
    rows = read_jsonl(path, required=("sentence", "option1", "option2", "answer"))
    return _dataset("validation", [{k: r[k] for k in ("sentence", "option1", "option2", "answer")}
                                   for r in rows])


def _arc(task: str, paser_data_dir: str | None):
    (path,) = data_files(task, _root(paser_data_dir))
    rows = []
    for i, r in enumerate(read_jsonl(path, required=("query",))):
        labels = [chr(ord("A") + j) for j in range(len(r["choices"]))]
        rows.append({"id": f"{task}-{i}", "question": r["query"].removeprefix("Question: "),
                     "choices": {"text": list(r["choices"]), "label": labels},
                     "answerKey": labels[int(r["gold"])]})
    return _dataset("test", rows)


def load_arc_easy(paser_data_dir: str | None = None, **_):
    return _arc("arc_easy", paser_data_dir)


def load_arc_challenge(paser_data_dir: str | None = None, **_):
    return _arc("arc_challenge", paser_data_dir)


def load_openbookqa(paser_data_dir: str | None = None, **_):
    (path,) = data_files("openbookqa", _root(paser_data_dir))
    rows = read_jsonl(path, required=("id", "question_stem", "answerKey"))
    return _dataset("test", [{"id": r["id"], "question_stem": r["question_stem"],
                              "choices": {"text": list(r["choices"]["text"]),
                                          "label": list(r["choices"]["label"])},
                              "answerKey": r["answerKey"]} for r in rows])


def wikitext_pages(raw: str) -> list[str]:
    """The articles of a raw WikiText file, as EleutherAI/wikitext_document_level cuts them (the layout
    lm-eval's ``wikitext`` task reads): a new page starts at each top-level heading line `` = Title = ``,
    and a page keeps its lines joined with newlines."""
    pages, lines = [], []
    for line in raw.split("\n"):
        # second- and third-level headings (" = = x = = ") must not count as titles
        level = line.replace("= = =", "===").replace("= =", "==").strip()
        if level.startswith("= ") and level.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def load_wikitext(paser_data_dir: str | None = None, **_):
    (path,) = data_files("wikitext", _root(paser_data_dir))
    return _dataset("test", [{"page": p} for p in wikitext_pages(path.read_text(encoding="utf-8"))])
