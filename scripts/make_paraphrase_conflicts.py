"""Build the paraphrased-conflict pool for the CCG robustness test: a pool plus, for a seeded share of its
samples, a copy whose answer contradicts the original's and whose words are swapped for synonyms, so that
the concept graph has nothing to match it with.

    python scripts/make_paraphrase_conflicts.py --pool ../shared/data/alpaca/alpaca_data.jsonl \
        --subsample 5000 --fraction 0.02 --out conflicts/alpaca5000_conflicts.jsonl
    python run.py -m experiment=ablation_ntm_cpu data=jsonl data.path=conflicts/alpaca5000_conflicts.jsonl \
        data.subsample=null

How a conflict is made (deterministic rules, no model: none is available offline):
 1. Contradict the answer: every word of ``ANTONYMS`` in the output is swapped for its antonym ("increase"
    for "decrease", "always" for "never", ...); where the output has none, the first auxiliary verb of
    ``NEGATIONS`` is negated ("is" becomes "is not", "can" becomes "cannot"). A sample with neither is not
    used.
 2. Paraphrase the whole sample: every word of ``SYNONYMS`` in the instruction, the input and the
    contradicted output is replaced by its synonym (case kept: "Explain" becomes "Clarify").
 3. Check it: the copy must differ from the original in instruction and output, and its concepts must
    share none with the original's, under the concept settings of the run it is made for (``--concept-*``;
    the defaults are selector=paser's: the top 5 RAKE phrases of at most 3 words over instruction, input
    and output; selector=paser_paper: ``--concept-top-k 10 --concept-max-words 4 --concept-min-words 2``).
    The two are then unrelated vertices of the CCG: it cannot tie the conflict to its source, while a
    concept-similarity threshold (paser_paper) may. A copy that fails is dropped and counted.
A small table cannot paraphrase every concept: on the CPU edition's 5,000 Alpaca samples 3,567 admit rule 1
and 151 of them pass the check with the default settings, so ``--fraction`` (default 0.02) is a target
that the pool may not reach (the manifest says how many were made). The sources are drawn (seeded) among the
pool's samples until the target is met or the candidates run out. The output holds the pool's rows, then the conflicts; beside it,
``<out>.manifest.json`` lists each conflict's source row, its line in the output, the rule applied and the
words replaced, and the counts of each check.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from paser.data import FIELDS, pool_from_config
from paser.selectors.paser.concepts import sample_concepts

ANTONYMS = dict(p for a, b in [
    ("increase", "decrease"), ("increases", "decreases"), ("increased", "decreased"), ("more", "less"),
    ("higher", "lower"), ("high", "low"), ("true", "false"), ("always", "never"), ("positive", "negative"),
    ("good", "bad"), ("best", "worst"), ("better", "worse"), ("benefits", "harms"), ("safe", "dangerous"),
    ("healthy", "unhealthy"), ("easy", "difficult"), ("possible", "impossible"), ("strong", "weak"),
    ("hot", "cold"), ("large", "small"), ("fast", "slow"), ("early", "late"), ("first", "last"),
    ("correct", "incorrect"), ("effective", "ineffective"), ("important", "unimportant"), ("yes", "no"),
    ("advantages", "disadvantages"), ("success", "failure"), ("rise", "fall"), ("before", "after"),
    ("maximum", "minimum"), ("most", "least"), ("all", "none"), ("many", "few"), ("cheap", "expensive"),
] for p in ((a, b), (b, a)))
NEGATIONS = [(r"\bis\b", "is not"), (r"\bare\b", "are not"), (r"\bcan\b", "cannot"), (r"\bwill\b", "will not"),
             (r"\bshould\b", "should not"), (r"\bwas\b", "was not"), (r"\bwere\b", "were not"),
             (r"\bdoes\b", "does not"), (r"\bhas\b", "has not")]
SYNONYMS = {
    "explain": "clarify", "describe": "characterize", "give": "provide", "list": "enumerate",
    "write": "compose", "create": "produce", "generate": "produce", "make": "build", "find": "locate",
    "identify": "pinpoint", "suggest": "propose", "summarize": "condense", "compare": "contrast",
    "classify": "categorize", "rewrite": "rephrase", "edit": "revise", "translate": "render",
    "analyze": "examine", "evaluate": "assess", "calculate": "compute", "determine": "establish",
    "name": "mention", "outline": "sketch", "design": "devise", "develop": "build up", "choose": "pick",
    "following": "subsequent", "sentence": "statement", "text": "passage", "article": "piece",
    "paragraph": "passage", "story": "tale", "poem": "verse", "word": "term", "words": "terms",
    "example": "instance", "examples": "instances", "ways": "methods", "way": "method", "tips": "hints",
    "reasons": "grounds", "benefits": "advantages", "benefit": "advantage", "problem": "issue",
    "problems": "issues", "question": "query", "answer": "reply", "idea": "notion", "ideas": "notions",
    "people": "individuals", "person": "individual", "company": "firm", "business": "enterprise",
    "customer": "client", "customers": "clients", "product": "item", "products": "items",
    "information": "data", "data": "information", "system": "framework", "process": "procedure",
    "method": "technique", "methods": "techniques", "result": "outcome", "results": "outcomes",
    "effect": "impact", "effects": "impacts", "impact": "effect", "change": "shift", "changes": "shifts",
    "environment": "surroundings", "health": "wellbeing", "food": "nourishment", "water": "fluid",
    "energy": "power", "power": "energy", "money": "funds", "time": "duration", "world": "globe",
    "country": "nation", "city": "town", "home": "house", "house": "dwelling", "car": "automobile",
    "computer": "machine", "technology": "tech", "internet": "web", "website": "site", "online": "web-based",
    "school": "academy", "student": "pupil", "students": "pupils", "teacher": "instructor", "job": "occupation",
    "work": "labor", "children": "kids", "child": "kid", "family": "household", "friend": "companion",
    "friends": "companions", "life": "existence", "book": "volume", "movie": "film", "music": "melodies",
    "game": "match", "team": "squad", "plan": "scheme", "goal": "aim", "goals": "aims", "task": "assignment",
    "important": "crucial", "good": "favorable", "bad": "poor", "big": "sizable", "small": "little",
    "large": "big", "little": "slight", "fast": "rapid", "quick": "rapid", "slow": "unhurried",
    "new": "novel", "old": "aged", "different": "distinct", "similar": "alike", "common": "frequent",
    "simple": "plain", "difficult": "hard", "easy": "effortless", "happy": "cheerful", "sad": "unhappy",
    "beautiful": "lovely", "main": "principal", "key": "essential", "major": "significant",
    "popular": "well-liked", "natural": "organic", "human": "human-being", "social": "societal",
    "global": "worldwide", "local": "regional", "public": "communal", "modern": "contemporary",
    "help": "assist", "helps": "assists", "use": "employ", "uses": "employs", "used": "employed",
    "using": "employing", "improve": "enhance", "reduce": "lessen", "provide": "supply",
    "provides": "supplies", "include": "comprise", "includes": "comprises", "need": "require",
    "needs": "requires", "keep": "retain", "start": "begin", "stop": "halt", "show": "display",
    "shows": "displays", "get": "obtain", "buy": "purchase", "sell": "vend", "build": "construct",
    "learn": "study", "think": "believe", "know": "understand", "see": "observe", "look": "glance",
    "want": "wish", "try": "attempt", "allow": "permit", "allows": "permits", "support": "back",
    "protect": "safeguard", "prevent": "avert", "avoid": "evade", "eat": "consume", "drink": "sip",
    "exercise": "workout", "sleep": "rest", "stress": "strain", "disease": "illness", "body": "physique",
    "mind": "intellect", "brain": "cerebrum", "heart": "ticker", "plant": "flora", "plants": "flora",
    "animal": "creature", "animals": "creatures", "tree": "sapling", "trees": "saplings", "ocean": "sea",
    "sea": "ocean", "sun": "sol", "earth": "planet", "climate": "weather", "weather": "climate",
    "pollution": "contamination", "government": "administration", "law": "statute", "laws": "statutes",
    "war": "conflict", "history": "past", "science": "scholarship", "research": "study", "study": "research",
    "language": "tongue", "art": "artwork", "culture": "heritage", "society": "community", "market": "marketplace",
    "price": "cost", "cost": "price", "value": "worth", "quality": "caliber", "level": "degree",
    "type": "kind", "types": "kinds", "kind": "sort", "part": "portion", "parts": "portions",
    "number": "figure", "numbers": "figures", "three": "3", "five": "5", "two": "2",
}
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _cased(original: str, replacement: str) -> str:
    return replacement.capitalize() if original[:1].isupper() else replacement


def substitute(text: str, table: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every word found in ``table`` (lower-cased) replaced, and the words replaced."""
    hits: list[str] = []

    def one(m: re.Match) -> str:
        new = table.get(m.group(0).lower())
        if new is None:
            return m.group(0)
        hits.append(m.group(0).lower())
        return _cased(m.group(0), new)

    return WORD.sub(one, text), hits


def contradict(output: str) -> tuple[str, str, list[str]] | None:
    """(contradicted output, rule, words changed), or None when neither rule applies."""
    swapped, hits = substitute(output, ANTONYMS)
    if hits:
        return swapped, "antonyms", hits
    for pattern, negated in NEGATIONS:
        m = re.search(pattern, output)
        if m:
            return output[:m.start()] + negated + output[m.end():], "negation", [m.group(0)]
    return None




def conflict_of(row: dict) -> tuple[dict, dict] | None:
    """(the conflicting paraphrase, its record), or None when the answer admits no contradiction rule."""
    contradiction = contradict(row["output"])
    if contradiction is None:
        return None
    output, rule, changed = contradiction
    out, replaced = {}, []
    for field, text in (("instruction", row["instruction"]), ("input", row.get("input") or ""), ("output", output)):
        out[field], hits = substitute(text, SYNONYMS)
        replaced += hits
    return out, {"rule": rule, "contradicted": changed, "synonyms": replaced}


def build(rows: list[dict], fraction: float, seed: int, top_k: int | None = 5, max_words: int | None = 3,
          min_words: int | None = None) -> tuple[list[dict], dict]:
    """(the conflicts, the manifest) for a pool's rows, concepts as ``sample_concepts(row, FIELDS, top_k,
    max_words, min_words)``; see the module docstring."""
    target = round(fraction * len(rows))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    conflicts, pairs = [], []
    counts = {"no_contradiction_rule": 0, "unchanged": 0, "shares_a_concept": 0}
    for i in order:
        if len(conflicts) == target:
            break
        made = conflict_of(rows[i])
        if made is None:
            counts["no_contradiction_rule"] += 1
            continue
        row, record = made
        if row["instruction"] == rows[i]["instruction"] or row["output"] == rows[i]["output"]:
            counts["unchanged"] += 1
            continue
        if set(sample_concepts(row, FIELDS, top_k, max_words, min_words)) & \
                set(sample_concepts(rows[i], FIELDS, top_k, max_words, min_words)):
            counts["shares_a_concept"] += 1
            continue
        pairs.append({"source_index": i, "conflict_index": len(rows) + len(conflicts), **record})
        conflicts.append(row)
    manifest = {"pool_size": len(rows), "fraction": fraction, "seed": seed, "concepts": {
                    "top_k": top_k, "max_words": max_words, "min_words": min_words}, "conflicts": len(conflicts),
                "target": target, "dropped": counts, "pairs": pairs}
    return conflicts, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", required=True, help="JSONL of {instruction, input, output} rows")
    parser.add_argument("--out", required=True, type=Path, help="the pool with its conflicts appended (JSONL)")
    parser.add_argument("--subsample", type=int, default=None, help="as data.subsample (e.g. the CPU edition's 5000)")
    parser.add_argument("--subsample-seed", type=int, default=0, help="as data.subsample_seed")
    parser.add_argument("--fraction", type=float, default=0.02, help="conflicts per pool sample (default 0.02)")
    parser.add_argument("--concept-top-k", type=int, default=5, help="as selector.concept_top_k (default 5)")
    parser.add_argument("--concept-max-words", type=int, default=3, help="as selector.concept_max_words (3)")
    parser.add_argument("--concept-min-words", type=int, default=None, help="as selector.concept_min_words")
    parser.add_argument("--seed", type=int, default=0, help="draws the sources")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction={args.fraction} must be in (0, 1]")
    pool = pool_from_config(path=args.pool, subsample=args.subsample, subsample_seed=args.subsample_seed)
    conflicts, manifest = build(pool.rows, args.fraction, args.seed, args.concept_top_k, args.concept_max_words,
                                args.concept_min_words)
    manifest["source"] = pool.source
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in [*pool.rows, *conflicts]:
            f.write(json.dumps({k: row.get(k) or "" for k in FIELDS}) + "\n")
    for pair in manifest["pairs"]:
        pair["conflict_line"] = pair["conflict_index"] + 1
    manifest_path = args.out.with_name(args.out.name + ".manifest.json")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"{len(conflicts)} conflicts (target {manifest['target']}) for {len(pool.rows)} samples -> {args.out}; "
          f"dropped: {manifest['dropped']}; manifest {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
