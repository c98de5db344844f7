"""Sequence-parallel-correct losses.

Under SP each rank holds the logits of S/P tokens. The loss of the sample is the token-weighted
mean over the whole group, and the gradient the optimizer sees must equal the non-SP gradient:

* :func:`causal_lm_loss` returns, on every rank of the group, the full-sequence mean loss,
  reduced with a differentiable all-reduce so that a data-parallel mean over all ranks (DDP,
  ZeRO) yields exactly the non-SP gradient;
* with ``num_items_in_batch`` (HF Trainer with gradient accumulation) it returns the local sum
  over the global token count, the convention of transformers' ``ForCausalLMLoss`` that the
  Trainer then scales by the number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import all_reduce_sum
from .groups import SequenceParallel, get_sequence_parallel

__all__ = ["causal_lm_loss", "sp_sum"]

IGNORE_INDEX = -100


def sp_sum(x: torch.Tensor, sp: SequenceParallel | None = None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the SP group (identity without SP). Use it for any
    per-sequence quantity that is a sum over tokens (log-probs, token counts)."""
    sp = sp if sp is not None else get_sequence_parallel()
    if sp is None or sp.size == 1:
        return x
    return all_reduce_sum(x, sp.group)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    sp: SequenceParallel | None = None,
    **kwargs,
) -> torch.Tensor:
    """Causal-LM cross-entropy for a sequence shard; drop-in for transformers' ``ForCausalLMLoss``
    (``model.loss_function = ulysses_attn.causal_lm_loss``).

    ``shift_labels`` must be shifted on the full sequence before sharding (``UlyssesCollator``
    does it); without SP, plain ``labels`` are shifted here as transformers does.
    """
    sp = sp if sp is not None else get_sequence_parallel()
    parallel = sp is not None and sp.size > 1
    if shift_labels is None:
        if parallel:
            raise ValueError(
                "Under sequence parallelism the loss needs `shift_labels` computed on the full sequence "
                "before sharding (shifting a shard loses the target at each shard boundary). Use "
                "ulysses_attn.UlyssesCollator / shard_batch, which add them."
            )
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels.")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.float()
    vocab = logits.shape[-1]
    shift_labels = shift_labels.to(logits.device)
    local_sum = F.cross_entropy(
        logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(local_sum.device)
        return local_sum / num_items_in_batch
    count = (shift_labels != ignore_index).sum().to(local_sum.dtype)
    if parallel:
        dist.all_reduce(count, group=sp.group)
        local_sum = all_reduce_sum(local_sum, sp.group)
    return local_sum / count
