"""Collective counts: one training step of a tiny model under SP makes exactly the expected
communication, so a change that adds a collective (or drops one) fails here.

Per decoder layer, the attention sends q, k, v and the output through one all-to-all each in the
forward and the same four in the backward. Per forward, the layout costs two all-gathers (the
cross-rank agreement check and the global position_ids), whatever the number of layers; the
loss costs two all-reduces (token count, loss sum) and its backward one.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from tiny_models import VOCAB, build

_COUNTED = (
    "all_to_all_single",
    "all_to_all",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
)


def _count_collectives() -> collections.Counter:
    """Wrap torch.distributed's collectives so that each real call is counted (and still runs)."""
    counts: collections.Counter = collections.Counter()
    for name in _COUNTED:
        real = getattr(dist, name)

        @functools.wraps(real)
        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _step_counts(rank, world, layers, packed):
    import ulysses_attn

    sp = ulysses_attn.init_sequence_parallel(world)
    model = build("llama", "ulysses_flash", num_hidden_layers=layers)
    model.loss_function = ulysses_attn.causal_lm_loss
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 16), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(6), torch.arange(10)])[None]
    shard = ulysses_attn.shard_batch(batch, sp)
    counts = _count_collectives()
    out = model(**shard, use_cache=False)
    forward = dict(counts)
    out.loss.backward()
    backward = {k: v - forward.get(k, 0) for k, v in counts.items() if v - forward.get(k, 0)}
    seen = shard["input_ids"].shape[1]
    return forward, backward, seen


@pytest.mark.parametrize("world,layers,packed", [(2, 2, False), (2, 3, True), (4, 2, False)])
def test_one_step_makes_exactly_the_expected_collectives(world, layers, packed):
    for forward, backward, seen in run_distributed(_step_counts, world, layers, packed):
        assert seen == 16 // world  # the layers saw S/P tokens
        assert forward == {"all_to_all_single": 4 * layers, "all_gather": 2, "all_reduce": 2}
        assert backward == {"all_to_all_single": 4 * layers, "all_reduce": 1}
