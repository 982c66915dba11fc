"""Bad input, named: every case a user or a run folder can supply that once ran silently, wrongly or into a
traceback ends in a ConfigError or DataError that names the key, file or line (most before any model
loads), or is handled as stated (duplicate rows dropped and counted, one huge row tokenised in bounded time).

Cases are checked in-process through ``pipeline.build_components`` / ``pipeline.run`` where that is the code
path, and through ``python run.py`` for what only the command line does (exit status 2, the message on
stderr). Not repeated here: unknown options and keys and an out-of-range sparsity through run.py
(tests/test_cli.py), impossible budgets and malformed pool lines (tests/test_pipeline.py), cutoffs beyond
the context, fp16 recovery and a missing pool (tests/test_reliability.py, which also kills runs with
SIGKILL and reruns them), non-boolean trust_remote_code (tests/test_trust.py), claims and
PASER_CLAIM_STALE_S (tests/test_claims.py), damaged cache entries and gc (tests/test_cache.py), a run
folder that already holds results (tests/test_newcomer.py) and crafted results.json configs
(tests/test_capability_recovery.py).
"""

from __future__ import annotations

import json
import logging

import pytest

from paser import pipeline
from paser.data import pool_from_config
from paser.errors import ConfigError
from tests.conftest import TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()


def write_pool(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def distinct_rows(n: int) -> list[dict]:
    return [{"instruction": f"Name the number {i}.", "input": "" if i % 2 else f"context {i}",
             "output": f"It is {i}."} for i in range(n)]


# ------------------------------------------------------------------------------------------ duplicates


def test_every_row_twice_gives_each_row_once_and_says_so(tmp_path, caplog):
    rows = distinct_rows(24)
    copies = [{k: f"  {v}\n" for k, v in r.items()} for r in rows]  # the same up to surrounding whitespace
    path = write_pool(tmp_path / "pool.jsonl", rows + copies)
    with caplog.at_level(logging.WARNING, logger="paser.data"):
        pool = pool_from_config(path=str(path))
    assert pool.rows == rows
    assert pool.lines == tuple(range(1, 25))
    assert "(24 duplicate rows dropped)" in pool.source
    assert "24 of its 48 rows repeat an earlier one" in caplog.text and "25: 1, 26: 2" in caplog.text

    kept = pool_from_config(path=str(path), drop_duplicates=False)
    assert len(kept) == 48 and "(24 duplicate rows kept)" in kept.source


def test_a_row_differing_inside_a_field_is_no_duplicate(tmp_path):
    rows = distinct_rows(3)
    rows.append({**rows[0], "output": rows[0]["output"].replace(" ", "  ")})
    assert len(pool_from_config(path=str(write_pool(tmp_path / "pool.jsonl", rows)))) == 4


def test_no_validation_row_is_a_copy_of_a_candidate(compose_cfg, tmp_path):
    """Duplicates are dropped before the validation rows are drawn: with every row twice, 12 of 20 validation
    rows were copies of training rows (issue #30), so keep=best chose on leaked data."""
    rows = distinct_rows(40)
    path = write_pool(tmp_path / "pool.jsonl", rows + rows)
    parts = pipeline.build_components(compose_cfg(TINY_RUN + [
        "data=jsonl", f"data.path={path}", "data.subsample=null", "recovery.val_size=20", "recovery.keep=best", "budget=10"]))
    validation = {json.dumps(parts.pool.rows[i]) for i in parts.validation}
    assert len(parts.pool) == 40 and len(validation) == 20
    assert not validation & {json.dumps(r) for r in parts.candidates.rows}


def test_drop_duplicates_must_be_a_boolean(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", distinct_rows(2))
    with pytest.raises(ConfigError, match="data.drop_duplicates='no' is not a boolean"):
        pool_from_config(path=str(path), drop_duplicates="no")
