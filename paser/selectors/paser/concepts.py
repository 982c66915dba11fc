"""NTM: concepts by RAKE key-phrase extraction, and the Concept Consistency Graph (CCG).

RAKE (Rose et al., 2010), implemented here with a vendored stop-word list (``stopwords.txt``; it also lists
instruction boilerplate such as "write", "describe", "given", which would otherwise become hub concepts
shared by thousands of unrelated samples): the lower-cased text is cut into candidate phrases at
punctuation and stop words; word score = degree / frequency over the candidates; phrase score = sum of its
word scores. A sample's concepts are its ``top_k`` best distinct phrases (None = all), normalised to
lower-case alphanumeric words joined by single spaces; purely numeric phrases and phrases longer than
``max_words`` words are dropped.

CCG rule (METHOD.md §2): a sample is rejected if two of its concepts are both already vertices of the graph
but not linked by an edge; otherwise it is accepted, its concepts become vertices and every pair of them is
linked.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files
from itertools import combinations

import numpy as np

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
DELIMITERS = re.compile(r"[.,;:!?()\[\]{}\"“”‘’\n\t|/\\<>=*#…–—-]+")


STOPWORDS_FILE = files("paser.selectors.paser").joinpath("stopwords.txt")


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    text = STOPWORDS_FILE.read_text(encoding="utf-8")
    return frozenset(w for w in text.split() if not w.startswith("#") and w)


def rake(text: str, top_k: int | None = None, max_words: int | None = None) -> list[str]:
    """Key phrases of ``text``, best first (ties: first occurrence first)."""
    stop = stopwords()
    phrases: list[tuple[str, ...]] = []
    for fragment in DELIMITERS.split(text.lower()):
        current: list[str] = []
        for word in WORD.findall(fragment):
            if word in stop:
                if current:
                    phrases.append(tuple(current))
                current = []
            else:
                current.append(word)
        if current:
            phrases.append(tuple(current))
    phrases = [p for p in phrases if (max_words is None or len(p) <= max_words) and not all(w.isdigit() for w in p)]
    freq: dict[str, int] = {}
    degree: dict[str, int] = {}
    for p in phrases:
        for w in p:
            freq[w] = freq.get(w, 0) + 1
            degree[w] = degree.get(w, 0) + len(p)
    scored: dict[str, tuple[float, int]] = {}
    for pos, p in enumerate(phrases):
        key = " ".join(p)
        if key not in scored:
            scored[key] = (sum(degree[w] / freq[w] for w in p), pos)
    ranked = sorted(scored, key=lambda k: (-scored[k][0], scored[k][1]))
    return ranked if top_k is None else ranked[:top_k]


def sample_concepts(row: dict, fields=("instruction", "input", "output"), top_k: int | None = 5,
                    max_words: int | None = 3) -> list[str]:
    """The concepts of one sample: RAKE over its chosen fields joined (as separate sentences)."""
    return rake("\n".join(row.get(f) or "" for f in fields), top_k, max_words)


def cluster_top_concepts(rows: list[dict], labels, top: int = 3, per_cluster: int = 200, seed: int = 0,
                         fields=("instruction", "input")) -> list[list[str]]:
    """Per cluster, the ``top`` concepts found in most of its samples (RAKE over the fields S²RIC embeds),
    read on up to ``per_cluster`` seeded members: what a person needs to see what a cluster is about."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == k)
        members = rng.choice(members, min(len(members), per_cluster), replace=False) if len(members) else members
        counts: dict[str, int] = {}
        for i in sorted(members.tolist()):
            for c in set(sample_concepts(rows[i], fields, top_k=None)):
                counts[c] = counts.get(c, 0) + 1
        out.append(sorted(counts, key=lambda c: (-counts[c], c))[:top])
    return out


class ConceptGraph:
    """The Concept Consistency Graph: concepts as vertices, co-occurrence in accepted samples as edges."""

    def __init__(self):
        self.adjacency: dict[str, set[str]] = {}
        self.n_edges = 0

    def conflict(self, concepts) -> tuple[str, str] | None:
        """The first pair of concepts that are both in the graph but not linked, else None."""
        known = [c for c in dict.fromkeys(concepts) if c in self.adjacency]
        for a, b in combinations(known, 2):
            if b not in self.adjacency[a]:
                return a, b
        return None

    def add(self, concepts) -> None:
        unique = list(dict.fromkeys(concepts))
        for c in unique:
            self.adjacency.setdefault(c, set())
        for a, b in combinations(unique, 2):
            if b not in self.adjacency[a]:
                self.adjacency[a].add(b)
                self.adjacency[b].add(a)
                self.n_edges += 1

    def try_add(self, concepts) -> tuple[str, str] | None:
        """Accept (add, return None) or reject (return the conflicting pair) a sample's concepts."""
        pair = self.conflict(concepts)
        if pair is None:
            self.add(concepts)
        return pair

    @property
    def n_concepts(self) -> int:
        return len(self.adjacency)
