"""NTM: concepts by RAKE key-phrase extraction, and the Concept Consistency Graph (CCG).

RAKE (Rose et al., 2010), implemented here with a vendored stop-word list (``stopwords.txt``; it also lists
instruction boilerplate such as "write", "describe", "given", which would otherwise become hub concepts
shared by thousands of unrelated samples): the lower-cased text is cut into candidate phrases at
punctuation and stop words; word score = degree / frequency over the candidates; phrase score = sum of its
word scores. A sample's concepts are its ``top_k`` best distinct phrases (None = all), normalised to
lower-case alphanumeric words joined by single spaces; purely numeric phrases and phrases longer than
``max_words`` (or shorter than ``min_words``) words are dropped.

CCG rule (METHOD.md §2): a sample is rejected if two of its concepts are both already vertices of the graph
but not linked by an edge; otherwise it is accepted, its concepts become vertices and every pair of them is
linked. With a concept-similarity threshold (``ConceptSimilarity``; ``selector=paser_paper``: 0.75, the
authors' stated setting, which they do not define further) a concept that is not itself a vertex counts as
the existing vertex whose embedding is most similar to its own, when that cosine similarity is at least the
threshold: "lattice gauge theory" is then the vertex "lattice gauge simulation" when their embeddings are
that close. That is our reading: the match is made against the graph's vertices (a new concept of an
accepted sample becomes a vertex of its own), so paraphrased concepts meet in the graph.

The official code's variant (``selector=paser_official``): concepts from ``rake_nltk.Rake()`` with its
defaults (NLTK's English stop words, punkt sentences, word-punctuation tokens, every phrase) over
instruction + ' ' + input + ' ' + output, and a graph whose vertices come only with edges (networkx
``add_edge``: an accepted sample with a single concept adds nothing).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache
from importlib.resources import files
from itertools import combinations
from pathlib import Path

import numpy as np

from paser.errors import ConfigError

log = logging.getLogger(__name__)

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
DELIMITERS = re.compile(r"[.,;:!?()\[\]{}\"“”‘’\n\t|/\\<>=*#…–—-]+")


STOPWORDS_FILE = files("paser.selectors.paser").joinpath("stopwords.txt")
CONCEPT_METHODS = ("rake", "rake_nltk")
NLTK_DATA = {"corpora/stopwords/english": "stopwords", "tokenizers/punkt_tab/english": "punkt_tab"}


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    text = STOPWORDS_FILE.read_text(encoding="utf-8")
    return frozenset(w for w in text.split() if not w.startswith("#") and w)


def rake(text: str, top_k: int | None = None, max_words: int | None = None,
         min_words: int | None = None) -> list[str]:
    """Key phrases of ``text``, best first (ties: first occurrence first), of ``min_words`` to
    ``max_words`` words (None: no bound); the bounds apply to the candidates, before scoring."""
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
    phrases = [p for p in phrases if (max_words is None or len(p) <= max_words)
               and (min_words is None or len(p) >= min_words) and not all(w.isdigit() for w in p)]
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
                    max_words: int | None = 3, min_words: int | None = None) -> list[str]:
    """The concepts of one sample: RAKE over its chosen fields joined (as separate sentences)."""
    return rake("\n".join(row.get(f) or "" for f in fields), top_k, max_words, min_words)


SHIPPED_NLTK_DATA = Path(str(files("paser.selectors.paser").joinpath("nltk_data")))  # see its README.md


def nltk_data_files() -> list[Path]:
    """The NLTK data ``rake_nltk.Rake()`` reads (English stop words, the punkt sentence model), to key caches
    by content. Installed NLTK data is used where it is found; otherwise the substitute shipped in
    ``nltk_data/`` (NLTK's English stop words and an untrained punkt model: its README says why the phrases
    are the same), with a log line saying so."""
    import nltk

    def found() -> tuple[list[Path], list[str]]:
        out, missing = [], []
        for resource, package in NLTK_DATA.items():
            try:
                pointer = nltk.data.find(resource)
            except LookupError:
                missing.append(package)
                continue
            path = Path(getattr(pointer, "path", None) or pointer.zipfile.filename)
            out += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return out, missing

    out, missing = found()
    if missing and str(SHIPPED_NLTK_DATA) not in nltk.data.path:
        log.info("NLTK's %s data not installed: selector.concepts=rake_nltk uses the substitute shipped in %s "
                 "(`python -m nltk.downloader %s` installs NLTK's own)", " and ".join(missing),
                 SHIPPED_NLTK_DATA, " ".join(missing))
        nltk.data.path.append(str(SHIPPED_NLTK_DATA))
        out, missing = found()
    if missing:  # a partial installation that shadows the shipped files
        raise ConfigError(f"selector.concepts=rake_nltk: NLTK's {' and '.join(missing)} data not found in "
                          f"{nltk.data.path}")
    return out


def concept_extractor(method: str = "rake", fields=("instruction", "input", "output"), top_k: int | None = 5,
                      max_words: int | None = 3, min_words: int | None = None) -> Callable[[dict], list[str]]:
    """row -> its concepts, best first: our ``rake`` over the fields joined by newlines, or ``rake_nltk``
    (``rake_nltk.Rake()`` defaults over the fields joined by single spaces, as the official code); both cut
    to ``top_k`` phrases of ``min_words`` to ``max_words`` words (None: no limit)."""
    if method == "rake":
        return lambda row: sample_concepts(row, fields, top_k, max_words, min_words)
    if method != "rake_nltk":
        raise ConfigError(f"selector.concepts={method!r} is unknown; allowed: {list(CONCEPT_METHODS)}")
    try:
        from rake_nltk import Rake
    except ImportError:
        raise ConfigError("selector.concepts=rake_nltk needs the package rake-nltk (pip install rake-nltk)") from None
    nltk_data_files()
    extractor = Rake()

    def concepts(row: dict) -> list[str]:
        extractor.extract_keywords_from_text(" ".join(row.get(f) or "" for f in fields))
        phrases = [p for p in dict.fromkeys(extractor.get_ranked_phrases())
                   if (max_words is None or len(p.split()) <= max_words)
                   and (min_words is None or len(p.split()) >= min_words)]
        return phrases if top_k is None else phrases[:top_k]

    return concepts


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


class ConceptSimilarity:
    """Which vertex a concept that is not itself a vertex counts as: the vertex whose embedding has the
    largest cosine similarity with its own, when that is at least ``threshold`` (see the module docstring).
    ``phrases`` and their L2-normalised ``embeddings`` [P, D] cover every concept that will be asked about;
    the vertices are searched exactly (FAISS inner product)."""

    def __init__(self, phrases: list[str], embeddings: np.ndarray, threshold: float):
        import faiss

        self.row = {p: i for i, p in enumerate(phrases)}
        self.x = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.threshold = threshold
        self.index = faiss.IndexFlatIP(self.x.shape[1])
        self.vertices: list[str] = []

    def nearest(self, concept: str) -> str | None:
        if not self.vertices or concept not in self.row:
            return None
        sims, ids = self.index.search(self.x[[self.row[concept]]], 1)
        return self.vertices[ids[0, 0]] if sims[0, 0] >= self.threshold else None

    def add(self, vertex: str) -> None:
        if vertex in self.row:
            self.index.add(self.x[[self.row[vertex]]])
            self.vertices.append(vertex)


class ConceptGraph:
    """The Concept Consistency Graph: concepts as vertices, co-occurrence in accepted samples as edges.
    ``edges_only``: concepts become vertices only through an edge (the official code), so an accepted
    sample with a single concept leaves the graph unchanged. ``similarity``: a ``ConceptSimilarity`` that
    matches a concept to an existing vertex (none: a concept is a vertex only under its own name)."""

    def __init__(self, edges_only: bool = False, similarity: ConceptSimilarity | None = None):
        self.adjacency: dict[str, set[str]] = {}
        self.n_edges = 0
        self.edges_only = edges_only
        self.similarity = similarity

    def vertices_of(self, concepts) -> list[str]:
        """The distinct vertices a sample's concepts are (or would become, if it is accepted)."""
        if self.similarity is None:
            return list(dict.fromkeys(concepts))
        return list(dict.fromkeys(c if c in self.adjacency else self.similarity.nearest(c) or c
                                  for c in concepts))

    def conflict(self, concepts) -> tuple[str, str] | None:
        """The first pair of (the vertices of) concepts that are both in the graph but not linked, else None."""
        known = [c for c in self.vertices_of(concepts) if c in self.adjacency]
        for a, b in combinations(known, 2):
            if b not in self.adjacency[a]:
                return a, b
        return None

    def add(self, concepts) -> None:
        unique = self.vertices_of(concepts)
        if self.edges_only and len(unique) < 2:
            return
        for c in unique:
            if c not in self.adjacency and self.similarity is not None:
                self.similarity.add(c)
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
