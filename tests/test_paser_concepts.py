"""NTM: RAKE key phrases and the Concept Consistency Graph rule, on crafted samples."""

from paser.selectors.paser.concepts import ConceptGraph, rake, sample_concepts


def test_rake_classic_example():
    # the example of Rose et al. (2010): scores are degree/frequency sums, e.g.
    # "linear diophantine equations" = 2.5 + 3 + 3 = 8.5 > "linear constraints" = 2.5 + 2 = 4.5
    text = ("Compatibility of systems of linear constraints over the set of natural numbers. Criteria of "
            "compatibility of a system of linear Diophantine equations, strict inequations, and nonstrict "
            "inequations are considered.")
    assert rake(text, top_k=5) == ["linear diophantine equations", "linear constraints", "natural numbers",
                                  "strict inequations", "nonstrict inequations"]


def test_concepts_are_normalised_and_limited():
    row = {"instruction": "Name the CAPITAL of France!", "input": "", "output": "Paris, 2024; the capital city."}
    concepts = sample_concepts(row, top_k=None, max_words=3)
    assert "capital city" in concepts and "paris" in concepts and "france" in concepts
    assert "2024" not in concepts  # numbers are not concepts
    assert all(c == c.lower() for c in concepts)
    long = sample_concepts({"instruction": "quantum chromodynamics lattice gauge simulation", "input": "",
                            "output": "ok"}, max_words=3)
    assert long == ["ok"]  # the 5-word phrase is dropped


def test_ccg_accepts_and_rejects_in_order():
    g = ConceptGraph()
    assert g.try_add(["apple", "banana"]) is None             # empty graph: accepted, edge apple–banana
    assert g.try_add(["cherry", "date"]) is None              # new concepts: accepted
    assert g.try_add(["apple", "banana", "kiwi"]) is None     # apple–banana linked, kiwi new: accepted
    assert g.try_add(["apple", "cherry"]) == ("apple", "cherry")  # both known, never linked: rejected
    assert g.try_add(["apple"]) is None                       # a single concept never conflicts
    assert g.try_add(["kiwi", "banana", "fig"]) is None       # kiwi–banana linked by sample 3
    assert g.try_add(["fig", "date"]) == ("fig", "date")      # fig (sample 6) and date (sample 2) unlinked
    assert g.try_add([]) is None
    # the rejected samples added nothing
    assert g.n_concepts == 6 and g.n_edges == 1 + 1 + 2 + 2
    assert "cherry" not in g.adjacency["apple"]
