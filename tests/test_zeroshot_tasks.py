"""The local (offline) lm-eval tasks build exactly the requests of lm-eval's built-in tasks.

Each built-in task is constructed from lm-eval's own YAML with its dataset swapped for rows in the hub's
schema, written out here for the first documents of each offline file (real hub rows for HellaSwag; for the
other tasks the hub fields that differ from the offline copy are spelled out: BoolQ's question without
"?", integer labels, ARC's question without "Question: " and lettered choices). No download is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import lm_eval
import pytest
from conftest import DATA_DIR, requires_shared_data
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from paser.evaluation.offline_tasks import split_hellaswag_ctx, wikitext_pages
from paser.evaluation.zeroshot import TASKS_DIR

pytestmark = requires_shared_data()

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}


def offline(path: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / path).read_text().splitlines()[:3]]


# the first three HellaSwag validation rows as the hub (rowanz/hellaswag) has them
HELLASWAG_HUB = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "label": "3",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "label": "3",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                 "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
              "water, with other individuals visible in the background.",
     "ctx_b": "the child and a different man",
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
            "water, with other individuals visible in the background. the child and a different man",
     "label": "2",
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.",
                 ("walking go down the rapids, while the man in his helicopter almost falls and goes out of "
                 "canoehood.")]},
]


def hub_rows(task: str) -> tuple[str, list[dict]]:
    """(split, rows in the hub schema) for the first documents of the offline copy of ``task``."""
    if task == "boolq":
        boolq = offline("boolq/validation.jsonl")
        questions = ["does ethanol take more energy make that produces", "is house tax and property tax are same",
                     boolq[2]["question"].removesuffix("?")]
        return "validation", [{"question": q, "passage": r["passage"], "idx": i, "label": int(r["label"])}
                              for i, (q, r) in enumerate(zip(questions, boolq))]
    if task == "piqa":
        labels = [int(x) for x in (DATA_DIR / "piqa/valid-labels.lst").read_text().split()[:3]]
        return "validation", [{**r, "label": y} for r, y in zip(offline("piqa/valid.jsonl"), labels)]
    if task == "hellaswag":
        return "validation", HELLASWAG_HUB
    if task == "winogrande":
        return "validation", offline("winogrande/dev.jsonl")
    if task in ("arc_easy", "arc_challenge"):
        rows = offline(f"arc/{task}_test.jsonl")
        return "test", [{"id": str(i), "question": r["query"][len("Question: "):],
                         "choices": {"text": r["choices"], "label": list("ABCD")},
                         "answerKey": "ABCD"[r["gold"]]} for i, r in enumerate(rows)]
    if task == "openbookqa":
        return "test", offline("openbookqa/test.jsonl")
    raise KeyError(task)


def builtin_task(task: str, split: str, rows: list[dict]) -> ConfigurableTask:
    """lm-eval's own task, unchanged but for the dataset: ``rows`` under the evaluated split (and, as
    stand-ins, under the other splits its YAML names, which zero-shot evaluation never reads)."""
    cfg = load_yaml(BUILTIN / BUILTIN_YAML[task], resolve_func=True)
    cfg.pop("tag", None)
    assert cfg.get("test_split") or cfg["validation_split"] == split
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows) for s in splits})
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module")
def local_tasks():
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"paser_data_dir": str(DATA_DIR)})
    return tm.load(list(BUILTIN_YAML))["tasks"]


def requests(task, limit: int) -> list[tuple]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.request_type, inst.args) for inst in task.instances]


@pytest.mark.parametrize("name", [t for t in BUILTIN_YAML if t != "wikitext"])
def test_local_requests_equal_builtin(name, local_tasks):
    split, rows = hub_rows(name)
    builtin = builtin_task(name, split, rows)
    local = local_tasks[name]
    assert requests(local, len(rows)) == requests(builtin, len(rows))
    assert len(requests(local, len(rows))) >= 2 * len(rows)  # every choice of every document
    for doc_local, doc_builtin in zip(list(local.eval_docs)[:len(rows)], builtin.eval_docs):
        assert local.doc_to_target(doc_local) == builtin.doc_to_target(doc_builtin)


def test_wikitext_pages_and_requests(local_tasks):
    raw = (DATA_DIR / "wikitext2/wiki.test.raw").read_text()
    pages = wikitext_pages(raw)
    assert len(pages) == 62  # lm-eval's wikitext test split has 62 documents
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert all(p.startswith(" = ") and not p.startswith(" = = ") for p in pages)
    builtin = builtin_task("wikitext", "test", [{"page": p} for p in pages[:2]])
    assert requests(local_tasks["wikitext"], 2) == requests(builtin, 2)


# (ctx, ctx_a, ctx_b) of HellaSwag validation rows as the hub has them (rowanz/hellaswag hellaswag_val)
HELLASWAG_SPLITS = [
    ("A boy is running down a track. the boy", "A boy is running down a track.", "the boy"),
    ("The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat. the boy",
     "The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.",
     "the boy"),
    ("A man is standing in front of a camera. He starts playing a harmonica for the camera. he",
     "A man is standing in front of a camera. He starts playing a harmonica for the camera.", "he"),
    ("A cartoon animation video is shown with people wandering around and rockets being shot. two men",
     "A cartoon animation video is shown with people wandering around and rockets being shot.", "two men"),
    ("A man is holding a pocket knife while sitting on some rocks in the wilderness. then he",
     "A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
]


@pytest.mark.parametrize("ctx,ctx_a,ctx_b", HELLASWAG_SPLITS)
def test_hellaswag_context_split(ctx, ctx_a, ctx_b):
    assert split_hellaswag_ctx(ctx) == (ctx_a, ctx_b)


def test_hellaswag_wikihow_context_is_not_split():
    # WikiHow contexts end with a full sentence; the hub's ctx_b is empty for them
    ctx = "Remove from the freezer and note what has occurred."
    assert split_hellaswag_ctx(ctx) == (ctx, "")
