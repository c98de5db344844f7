"""accelerate beside SP: dataloaders sharded over DP groups, evaluation gathered once per SP group.

Patch records: ``accelerate.Accelerator.prepare_data_loader``, ``accelerate.data_loader.
BatchSamplerShard.num_processes`` (and ``process_index``), ``accelerate.Accelerator.
pad_across_processes`` and ``accelerate.Accelerator.gather_for_metrics`` (docs/compatibility.md).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .. import patches
from ..comm import all_gather_seq
from ..groups import SequenceParallel

__all__ = ["shard_dataloaders_over_dp_groups", "shard_over_dp_groups", "install_metrics_gather"]

_SHARD = "accelerate.data_loader.BatchSamplerShard.num_processes"


def shard_dataloaders_over_dp_groups(accelerator, sp: SequenceParallel) -> None:
    """Make every dataloader ``accelerator`` prepares from now on sharded over DP groups."""
    prepare_data_loader = accelerator.prepare_data_loader

    @functools.wraps(prepare_data_loader)
    def _prepare_data_loader(*args, **kwargs):
        loader = prepare_data_loader(*args, **kwargs)
        shard_over_dp_groups(loader, sp)
        return loader

    patches.replace(
        "accelerate.Accelerator.prepare_data_loader", accelerator, "prepare_data_loader", _prepare_data_loader
    )


def shard_over_dp_groups(loader, sp: SequenceParallel) -> None:
    """Re-point accelerate's sharding of a prepared dataloader from ranks to DP groups."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise NotImplementedError(
            "dispatch_batches=True is not supported with sequence parallelism; "
            "set accelerator_config={'dispatch_batches': False}."
        )
    for obj in (
        getattr(loader, "batch_sampler", None),
        getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
    ):
        if isinstance(obj, (BatchSamplerShard, IterableDatasetShard)):
            patches.replace(_SHARD, obj, "num_processes", sp.dp_size)
            patches.replace(_SHARD, obj, "process_index", sp.dp_rank)


def install_metrics_gather(accelerator, sp: SequenceParallel, sharded_inputs: bool) -> None:
    """Route the evaluation loop's ``pad_across_processes`` + ``gather_for_metrics`` through SP.

    The loop pads per-token tensors to the longest over the world, then gathers. With sharded
    inputs that padding would land on each shard, i.e. inside the re-assembled sequence when DP
    groups hold different lengths; so sequence-dim padding is deferred to the gather, which pads
    whole sequences at their end."""
    if sharded_inputs:
        pad_across_processes = accelerator.pad_across_processes

        @functools.wraps(pad_across_processes)
        def _pad_across_processes(tensor, dim=0, pad_index=0, pad_first=False):
            if dim == 1 and not pad_first:
                return tensor
            return pad_across_processes(tensor, dim=dim, pad_index=pad_index, pad_first=pad_first)

        patches.replace(
            "accelerate.Accelerator.pad_across_processes", accelerator, "pad_across_processes", _pad_across_processes
        )
    patches.replace(
        "accelerate.Accelerator.gather_for_metrics",
        accelerator,
        "gather_for_metrics",
        functools.partial(_gather_for_metrics, accelerator, sp, sharded_inputs),
    )


def _gather_for_metrics(
    accelerator, sp: SequenceParallel, sharded_inputs: bool, input_data, use_gather_object: bool = False
):
    """``Accelerator.gather_for_metrics`` for SP.

    Inside the SP group, per-token tensors (``dim >= 2``: logits, labels) of sharded inputs are
    re-assembled along the sequence (TRL's fused trainers already hold whole sequences) and
    per-sample values (``dim <= 1``: losses) are averaged. That average is the token-weighted loss:
    each rank's loss is either already the full value (transparent mode, TRL, a loss without
    ``num_items_in_batch``) or its shard's token sum over the world's token count times the world
    size (the Trainer's ``num_items_in_batch`` convention with ``average_tokens_across_devices``,
    which the package forces on), so the group's mean is the group's token sum over the token count
    of the DP ranks -- what a run without SP on ``dp_size`` processes reports. The result is then
    gathered over the DP group exactly as a run without SP on ``dp_size`` processes gathers it
    (re-assembled sequences padded at their end with -100 to the longest over the DP group, as the
    evaluation loop pads them without SP), dropping the duplicated tail of the last batch likewise.
    """
    from accelerate.utils import pad_across_processes, recursively_apply

    if use_gather_object:
        raise NotImplementedError("gather_for_metrics(use_gather_object=True) is not supported with SP.")

    def gather(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2:
            if sharded_inputs:
                t = all_gather_seq(t, sp.group, dim=1)
                if sp.dp_size > 1:  # whole sequences now: pad them at their end, as the loop does without SP
                    t = pad_across_processes(t, dim=1, pad_index=-100)
        else:
            t = t.reshape(-1).clone()
            dist.all_reduce(t, group=sp.group)
            t = t / sp.size
        return all_gather_seq(t, sp.dp_group, dim=0) if sp.dp_size > 1 else t

    data = recursively_apply(gather, input_data, error_on_other_type=True)
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        data = recursively_apply(lambda t: t[: state.remainder], data)
    return data
