"""PASER: S²RIC clustering, CDAIS degradation-aware allocation, NTM concept-consistency filtering.

Modules: ``clustering`` (kNN graph, diffusion map / other reducers, NMF clustering), ``allocation``
(budget per cluster), ``divergence`` (per-sample JSD/KL/Wasserstein between two models), ``concepts``
(RAKE and the Concept Consistency Graph), ``selector`` (the ``PaserSelector`` that composes them).
"""
