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

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .comm import all_reduce_sum, chunk_count, split_chunks
from .fused_cross_entropy import frozen_linear_log_probs, linear_cross_entropy_sum
from .groups import SequenceParallel, get_sequence_parallel
from .labels import IGNORE_INDEX
from .labels import shift_labels as _shift

__all__ = [
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "sp_sum",
    "default_loss_chunk_tokens",
    "LossPath",
    "loss_path",
    "fused_head_applies",
]


class LossPath(str, Enum):
    """How the loss of a training step is computed (:func:`loss_path` decides)."""

    TRANSPARENT = "transparent"  # whole batch; the backbone shards inside and returns whole outputs: any loss
    TRL_FUSED_HEAD = "trl_fused_head"  # TRL's fused LM head: whole batch, sharded inside the forward
    CHUNKED = "chunked"  # backbone hidden states -> chunked_causal_lm_loss, no full logits
    SP_LOGITS = "sp_logits"  # the model's forward; loss_function = causal_lm_loss, reduced over the SP group
    PLAIN = "plain"  # the model's own forward and loss


def loss_path(
    model: Any,
    *,
    chunked_loss: bool,
    trl_fused_head: bool = False,
    sp_size: int | None = None,
    call: tuple[tuple, dict[str, Any]] | None = None,
    training: bool = True,
    full_logits_needed: str | None = None,
    transparent: bool | None = None,
) -> LossPath:
    """The one decision of the loss path, for a trainer (``call=None``: a labelled training step)
    or for one forward ``call=(args, kwargs)`` of a model with the memory options.

    Under SP, ``transparent=True`` forces the transparent path; with ``transparent=None`` it is
    taken when ``full_logits_needed`` names why the step's loss is not one the package makes
    SP-aware (``compute_loss_func``, label smoothing, a trainer's own ``compute_loss``...), and with
    ``transparent=False`` such a step raises: it would see only a shard of the logits.

    The chunked loss needs a causal LM with an output embedding, keyword inputs with labels, a
    training forward with gradients, and no MoE router loss (whose auxiliary terms need the model's
    own forward); TRL's fused head (``fused_lm_head`` in the call) is chunked already."""
    if sp_size is None:
        sp = get_sequence_parallel()
        sp_size = 1 if sp is None else sp.size
    if sp_size > 1 and (transparent or (transparent is None and full_logits_needed)):
        return LossPath.TRANSPARENT
    if sp_size > 1 and full_logits_needed:
        raise NotImplementedError(
            f"ulysses_attn: {full_logits_needed} needs the full-sequence logits, and transparent mode (which gives "
            "them) is turned off (enable(transparent=False) / --transparent off). Under sequence parallelism this loss "
            "would see only this rank's shard. Turn transparent mode back on (the default) or drop the option."
        )
    if trl_fused_head:
        return LossPath.TRL_FUSED_HEAD
    args, kwargs = call if call is not None else ((), {"labels": True})
    chunked = (
        chunked_loss
        and training
        and not args
        and "fused_lm_head" not in kwargs
        and (kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None)
        and getattr(model, "get_output_embeddings", lambda: None)() is not None
        and not getattr(model.config.get_text_config(), "output_router_logits", False)
    )
    if chunked:
        return LossPath.CHUNKED
    return LossPath.SP_LOGITS if sp_size > 1 else LossPath.PLAIN


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
    shift_labels = _full_sequence_shift_labels(labels, shift_labels, ignore_index, sp)
    logits = logits.float()
    vocab = logits.shape[-1]
    shift_labels = shift_labels.to(logits.device)
    local_sum = F.cross_entropy(
        logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return _mean_over_group(local_sum, shift_labels, num_items_in_batch, ignore_index, sp)


def _full_sequence_shift_labels(labels, shift_labels, ignore_index, sp):
    if shift_labels is not None:
        return shift_labels
    if sp is not None and sp.size > 1:
        raise ValueError(
            "Under sequence parallelism the loss needs `shift_labels` computed on the full sequence "
            "before sharding (shifting a shard loses the target at each shard boundary). Use "
            "ulysses_attn.UlyssesCollator / shard_batch, which add them."
        )
    if labels is None:
        raise ValueError("causal_lm_loss needs labels or shift_labels.")
    return _shift(labels, ignore_index)


def _mean_over_group(local_sum, shift_labels, num_items_in_batch, ignore_index, sp):
    """``local_sum / num_items_in_batch`` (Trainer convention), else the token mean over the SP group."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(local_sum.device)
        return local_sum / num_items_in_batch
    count = (shift_labels != ignore_index).sum().to(local_sum.dtype)
    if sp is not None and sp.size > 1:
        dist.all_reduce(count, group=sp.group)
        local_sum = all_reduce_sum(local_sum, sp.group)
    return local_sum / count


def fused_head_applies(
    lm_head: torch.nn.Module, logit_scale: float = 1.0, final_logit_softcapping: float | None = None
) -> bool:
    """Whether :func:`chunked_causal_lm_loss` fuses ``lm_head`` with the cross-entropy
    (:mod:`~ulysses_attn.fused_cross_entropy`): a bias-free ``nn.Linear`` that nothing hooks (no
    accelerate device hooks, no forward hooks) and that ZeRO-3 does not partition, so that its
    weight can be used without calling it; and logits that are neither scaled nor soft-capped."""
    if logit_scale != 1.0 or final_logit_softcapping is not None:
        return False
    module_globals = torch.nn.modules.module
    hooked = (
        lm_head._forward_hooks
        or lm_head._forward_pre_hooks
        or hasattr(lm_head, "_hf_hook")
        or getattr(module_globals, "_global_forward_hooks", None)
        or getattr(module_globals, "_global_forward_pre_hooks", None)
    )
    return (
        type(lm_head) is torch.nn.Linear
        and lm_head.bias is None
        and not hasattr(lm_head.weight, "ds_id")
        and not hooked
    )


def _frozen_plain_head(lm_head: torch.nn.Module) -> bool:
    """A bias-free-or-frozen ``nn.Linear`` head that does not train (LoRA), hooked by nothing but
    ZeRO-3 (whose hooks only gather its weight, which :func:`_head_weights` does instead)."""
    module_globals = torch.nn.modules.module
    params = [p for p in (lm_head.weight, getattr(lm_head, "bias", None)) if p is not None]
    partitioned = hasattr(lm_head.weight, "ds_id")
    hooked = (
        ((lm_head._forward_hooks or lm_head._forward_pre_hooks) and not partitioned)
        or hasattr(lm_head, "_hf_hook")
        or getattr(module_globals, "_global_forward_hooks", None)
        or getattr(module_globals, "_global_forward_pre_hooks", None)
    )
    return type(lm_head) is torch.nn.Linear and not any(p.requires_grad for p in params) and not hooked


def _with_head_weights(lm_head: torch.nn.Module, fn: Callable[[torch.Tensor, torch.Tensor | None], Any]) -> Any:
    """``fn(weight, bias)`` where the head's weight is whole: directly, or -- when ZeRO-3 partitions
    it -- inside a call of the head (a pre-forward hook registered after ZeRO-3's, which has
    gathered the weight; ZeRO-3 releases it after the call as usual). ``fn`` must not keep the
    weight for its backward."""
    weight: Any = lm_head.weight
    if not hasattr(weight, "ds_id"):
        return fn(weight, getattr(lm_head, "bias", None))
    result = []
    handle = lm_head.register_forward_pre_hook(lambda m, args: result.append(fn(m.weight, m.bias)))
    try:
        lm_head(torch.empty(0, weight.ds_shape[1], dtype=weight.dtype, device=weight.device))
    finally:
        handle.remove()
    return result[0]


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


LogitTransform = Callable[[torch.Tensor], torch.Tensor]  # what the model does after its head (head.py)


@torch.no_grad()
def chunked_logit_sums(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_tokens: int | None = None,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """``transform(lm_head(hidden)).sum(-1)`` (in fp32 at least) for ``hidden`` ``[tokens, H]``, without a
    gradient and without the ``[tokens, vocab]`` logits (``chunk_tokens`` at a time): for metrics such
    as a mean logit."""
    weight: Any = lm_head.weight
    chunk_tokens = chunk_tokens or default_loss_chunk_tokens(getattr(weight, "ds_shape", weight.shape)[0])
    count = chunk_count(len(hidden), chunk_tokens, hidden.device)
    transform = transform or (lambda logits: logits)
    if _frozen_plain_head(lm_head):
        chunks = split_chunks(hidden, count)
        sums = _with_head_weights(
            lm_head, lambda w, b: [transform(_at_least_fp32(F.linear(h, w, b))).sum(-1) for h in chunks]
        )
    else:
        sums = [transform(_at_least_fp32(lm_head(h))).sum(-1) for h in split_chunks(hidden, count)]
    return torch.cat(sums)


def default_loss_chunk_tokens(vocab_size: int, budget_bytes: int = 1 << 30) -> int:
    """Tokens per loss chunk so that one chunk's fp32 logits take about ``budget_bytes`` (1 GiB:
    2048 tokens for a 128K vocabulary)."""
    return max(64, budget_bytes // (4 * vocab_size))


def _scored_tokens(hidden_states, shift_labels, lm_head, chunk_tokens, ignore_index):
    """The hidden states and targets of the tokens that have a target (flattened), their flat
    indices, and the chunk size (default: :func:`default_loss_chunk_tokens` of the vocabulary)."""
    targets = shift_labels.reshape(-1)
    scored = (targets != ignore_index).nonzero().squeeze(1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, scored)
    if chunk_tokens is None:  # a ZeRO-3 partition keeps its full shape in ds_shape
        weight: Any = lm_head.weight
        chunk_tokens = default_loss_chunk_tokens(getattr(weight, "ds_shape", weight.shape)[0])
    return hidden, targets.index_select(0, scored), scored, chunk_tokens


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    sp: SequenceParallel | None = None,
) -> torch.Tensor:
    """:func:`causal_lm_loss` of ``lm_head(hidden_states)`` without materialising the logits.

    Only tokens with a label are projected, ``chunk_tokens`` at a time. A plain bias-free
    ``nn.Linear`` head goes through :mod:`~ulysses_attn.fused_cross_entropy` (gradients computed
    with each chunk's logits in the forward, nothing recomputed), as does a frozen one (LoRA) whose
    weight ZeRO-3 partitions (gathered once per loss). Otherwise -- under ZeRO-3, with a
    hooked or wrapped head (PEFT, accelerate offload), logit scaling or soft-capping -- each chunk
    runs under non-reentrant activation checkpointing and calls the head as a module (so ZeRO-3
    gathers its weight): the chunk's logits are freed after the forward and recomputed in the
    backward. Tied embeddings work either way. Same reduction as :func:`causal_lm_loss` (exact up
    to float summation order).

    >>> hidden = model.model(input_ids=shard["input_ids"], position_ids=shard["position_ids"])[0]
    >>> loss = chunked_causal_lm_loss(hidden, model.lm_head, shift_labels=shard["shift_labels"])
    """
    sp = sp if sp is not None else get_sequence_parallel()
    shift_labels = _full_sequence_shift_labels(labels, shift_labels, ignore_index, sp).to(hidden_states.device)
    hidden, targets, _, chunk_tokens = _scored_tokens(hidden_states, shift_labels, lm_head, chunk_tokens, ignore_index)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        if logit_scale != 1.0:
            logits = logits * logit_scale
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        return F.cross_entropy(logits, y, reduction="sum")

    # An empty shard (all labels ignored) still runs the head, so every rank's graph reaches it.
    count = chunk_count(len(targets), chunk_tokens, hidden.device)
    if fused_head_applies(lm_head, logit_scale, final_logit_softcapping):
        head_weight: Any = lm_head.weight
        local_sum = linear_cross_entropy_sum(hidden, head_weight, targets, count)
        return _mean_over_group(local_sum, shift_labels, num_items_in_batch, ignore_index, sp)
    frozen = logit_scale == 1.0 and final_logit_softcapping is None and getattr(lm_head, "bias", None) is None
    if frozen and _frozen_plain_head(lm_head):  # LoRA: the whole weight once, nothing recomputed
        local_sum = _with_head_weights(lm_head, lambda w, b: linear_cross_entropy_sum(hidden, w, targets, count))
        return _mean_over_group(local_sum, shift_labels, num_items_in_batch, ignore_index, sp)
    local_sum = sum(
        checkpoint(chunk_loss, h, y, use_reentrant=False)
        for h, y in zip(split_chunks(hidden, count), targets.tensor_split(count))
    )
    return _mean_over_group(local_sum, shift_labels, num_items_in_batch, ignore_index, sp)


def chunked_row_log_probs(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Module,
    shift_labels: torch.Tensor,
    chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """Per row, the sum of ``log_softmax(transform(lm_head(h)))[target]`` over the tokens with a target,
    without materialising the logits: the scored tokens go through the head ``chunk_tokens`` at a time.
    ``transform`` is what the model's forward does to the head's output (logit scale, soft-cap:
    :func:`~ulysses_attn.head.checked_logit_transform`). Without one, a frozen plain head (LoRA) is
    used through its whole weight (gathered once under ZeRO-3) with the hidden gradient computed in
    the forward (:func:`~ulysses_attn.fused_cross_entropy.frozen_linear_log_probs`); otherwise
    each chunk runs under non-reentrant activation checkpointing (its fp32 logits freed after the
    forward and recomputed in the backward; the head called as a module).
    ``hidden_states`` is ``[B, T, H]`` (a sequence shard), ``shift_labels`` ``[B, T]``; returns ``[B]``
    fp32 sums for these tokens -- add them over the SP group with :func:`sp_sum`.

    >>> logps = sp_sum(chunked_row_log_probs(shard_hidden, model.lm_head, shard["shift_labels"]))
    """
    rows, tokens = shift_labels.shape
    shift_labels = shift_labels.to(hidden_states.device)
    hidden, targets, scored, chunk_tokens = _scored_tokens(
        hidden_states, shift_labels, lm_head, chunk_tokens, ignore_index
    )

    def chunk_log_probs(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _at_least_fp32(lm_head(h))
        logits = logits if transform is None else transform(logits)
        return logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    # an empty shard still runs the head, so every rank calls it (and ZeRO-3 gathers) alike
    count = chunk_count(len(targets), chunk_tokens, hidden.device)
    row_of = torch.div(scored, tokens, rounding_mode="floor")
    if transform is None and _frozen_plain_head(lm_head):  # LoRA: the whole weight once, nothing recomputed
        per_token = _with_head_weights(lm_head, lambda w, b: frozen_linear_log_probs(hidden, w, b, targets, count))
        return per_token.new_zeros(rows).index_add(0, row_of, per_token)
    per_token = torch.cat(
        [
            checkpoint(chunk_log_probs, h, y, use_reentrant=False)
            for h, y in zip(split_chunks(hidden, count), targets.tensor_split(count))
        ]
    )
    return per_token.new_zeros(rows).index_add(0, row_of, per_token)
