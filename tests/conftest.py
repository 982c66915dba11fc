"""Shared fixtures: composing the Hydra config the way run.py does, shrunk for tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from paser.compose import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = ROOT.parent / "shared" / "data"

# A run of the whole pipeline on the tiny random model that takes seconds.
TINY_RUN = [
    "model=tiny-llama", "logger=none", "pruner=magnitude", "selector=random", "data.subsample=24", "budget=6",
    "recovery.batch_size=2", "recovery.micro_batch_size=2", "recovery.epochs=1", "recovery.cutoff=128",
    "recovery.warmup_steps=0", "recovery.val_size=0", "recovery.keep=last", "evaluator.ppl.max_windows=2",
    "scoring.cutoff=128", "recovery.dtype=bfloat16",  # the dtype of the tests' numbers (lora's default is auto)
]


def compose_config(overrides: list[str], tmp_path: Path | None = None):
    extra = [f"paths.data_dir={DATA_DIR}"]
    if tmp_path is not None:
        extra += [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}"]
    return compose(extra + list(overrides))


@pytest.fixture
def compose_cfg(tmp_path):
    return lambda overrides=(): compose_config(list(overrides), tmp_path)


def requires_shared_data():
    return pytest.mark.skipif(not DATA_DIR.is_dir(), reason="../shared/data is not beside the repository")


NLTK_STOPWORDS = ["a", "an", "the", "of", "to", "and", "in", "for", "on", "with", "is", "are", "be", "this", "that",
                  "it", "how", "what", "your", "its", "by", "from", "as"]


def make_nltk_data(root: Path) -> Path:
    """A stand-in NLTK data folder for rake_nltk (selector=paser_official), which needs NLTK's stopwords and
    punkt_tab data that cannot be downloaded here: a small English stop-word list and an empty (untrained)
    punkt model, read through NLTK as the real ones are."""
    (root / "corpora" / "stopwords").mkdir(parents=True)
    (root / "corpora" / "stopwords" / "english").write_text("\n".join(NLTK_STOPWORDS) + "\n")
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    return root


@pytest.fixture(scope="module")
def models():
    """(original, pruned, tokenizer): the tiny Llama and a copy with the smaller half of each weight
    matrix zeroed, for selectors that compare the two."""
    from paser.models import tiny_llama

    model, tok = tiny_llama()
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p[p.abs() < p.abs().median()] = 0
    return model.eval(), pruned.eval(), tok


@pytest.fixture
def live_calls():
    """What the pipeline logs live (``paser.tracking.live``) while the test runs: a list of dicts."""
    from paser import tracking

    class Recorder(tracking.NullLogger):
        def __init__(self):
            self.calls = []

        def log(self, metrics):
            self.calls.append(dict(metrics))

    recorder = Recorder()
    tracking.set_active(recorder)
    yield recorder.calls
    tracking.set_active(tracking.NullLogger())
