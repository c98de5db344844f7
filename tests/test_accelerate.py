"""accelerate beside SP (``ulysses_attn.integrations.accelerate``): the evaluation gather re-assembles
sequences over the SP group and gathers them over the DP group as a run without SP would (4 real
processes, gloo)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

import ulysses_attn


def _eval_gather_worker(rank, world):
    from accelerate import Accelerator

    from ulysses_attn.integrations.accelerate import install_metrics_gather

    sp = ulysses_attn.init_sequence_parallel(2)  # SP groups (0, 1), (2, 3); DP groups (0, 2), (1, 3)
    accelerator = Accelerator(cpu=True)
    install_metrics_gather(accelerator, sp, sharded_inputs=True)
    full = [torch.arange(4), torch.arange(100, 108)][sp.dp_rank]  # DP groups hold different lengths
    shard = full.view(1, -1).chunk(2, dim=1)[sp.rank]
    # what Trainer.evaluation_loop does with per-token tensors: pad over the world, then gather
    labels = accelerator.gather_for_metrics(accelerator.pad_across_processes(shard, dim=1, pad_index=-100))
    losses = accelerator.gather_for_metrics(torch.tensor([10.0 * sp.dp_rank + sp.rank]))
    return labels, losses


@pytest.mark.timeout(300)
def test_eval_gather_pads_whole_sequences_when_dp_groups_differ_in_length():
    want = torch.tensor([[0, 1, 2, 3, -100, -100, -100, -100], list(range(100, 108))])
    for labels, losses in run_distributed(_eval_gather_worker, 4):
        assert torch.equal(labels, want)  # padding after each sequence, never between its shards
        assert torch.equal(losses, torch.tensor([0.5, 10.5]))  # per-sample values: mean over the SP group
