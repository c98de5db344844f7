"""Every causal LM of the installed transformers: exact under SP, or refused with our message.

tests/zoo.py builds a tiny config of each architecture in transformers' causal-LM auto mapping and
compares SP against one process on plain, padded and packed batches (logits, loss, every gradient;
the decoder layers must see S/P tokens). docs/models-and-limits.md shows the table; it must match.
"""

from __future__ import annotations

import os

import pytest
from zoo import counts, documented_table, run_zoo, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_causal_lm_is_exact_or_refused_and_the_table_is_current():
    results = run_zoo(2)
    bad = {mt: r for mt, r in results.items() if any(v.startswith(("wrong", "error")) for v in r.values())}
    assert not bad, bad
    n = counts(results)
    assert n["exact"] >= 80 and n["refused"] >= 40, n  # the zoo really ran models
    assert table(results) == documented_table(ROOT), (
        "docs/models-and-limits.md is stale: regenerate it with `python tests/zoo.py --write`"
    )


# one of each family the zoo finds exact: GQA, MoE, softcap + sliding window, partial RoPE,
# learned positions, biases, QK norm, attention sinks
AT_FOUR = ["llama", "qwen3_moe", "mixtral", "gemma2", "phi", "gpt2", "opt", "olmo2", "gpt_oss"]


@pytest.mark.parametrize("world", [4])
def test_representative_architectures_are_exact_at_sp4(world):
    results = run_zoo(world, AT_FOUR)
    assert all(v == "exact" for r in results.values() for v in r.values()), results
