"""The four stages of one run (paser.pipeline.Run), each a small unit of (run, inputs) -> artifact through the
stage cache: ``prune`` (prune.py), ``select`` (select.py), ``recover`` (recover.py) and ``evaluate``
(evaluate.py). They share runner.py's protocol: a stage's value is looked up in the cache, or computed once
between the ranks of a torchrun job and between concurrent jobs, and stored, its time and peak memory
recorded."""
