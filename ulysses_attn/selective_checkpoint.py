"""Selective activation checkpointing: keep the attention kernel's output, recompute the rest.

At long sequence lengths the attention kernel is most of a decoder layer's time (60-75% of a
Llama-1B step at 64K-128K tokens), and full checkpointing runs its forward twice. Its output is
small by comparison: ``tokens x heads x head_dim`` (the size of the layer's hidden states) plus
the softmax statistics. With this option each checkpointed layer keeps the kernel's outputs
(PyTorch's selective checkpointing, ``create_selective_checkpoint_contexts``) and recomputes
everything else, so the backward skips the second attention forward.

It needs non-reentrant checkpointing (the transformers default). The kept outputs stay on the
device (they are not offloaded): about ``layers x hidden x 2`` bytes per token more.

Not under DeepSpeed ZeRO-3: its parameter gathers run inside the checkpointed layers and the
recompute's gathers differ from the forward's (a parameter may already be there), which PyTorch's
selective checkpointing rejects ("... encountered during backward but not found in storage").
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .compat import decoder_layers

__all__ = ["save_attention_policy", "keep_attention_outputs", "keeps_attention_outputs"]

# forward attention kernels as the dispatcher sees them (SDPA's flash/cuDNN/efficient/CPU-flash
# backends, torch.nn.attention.varlen, flash-attn's registered ops)
_ATTENTION_OPS = ("scaled_dot_product", "_flash_attention_forward", "_efficient_attention_forward",
                  "_cudnn_attention_forward", "varlen_attn", "flash_attn")


def save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: save the outputs of forward attention kernels."""
    name = str(op)
    if "backward" not in name and any(key in name for key in _ATTENTION_OPS):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _context():
    return create_selective_checkpoint_contexts(save_attention_policy)


def keep_attention_outputs(model: torch.nn.Module) -> int:
    """Make the checkpointed decoder layers of ``model`` keep their attention outputs. Call it
    after checkpointing is enabled (the Trainer enables it in ``train()``; :func:`configure_memory`
    does it at every training forward). Returns the number of layers changed."""
    return keep_attention_outputs_of(decoder_layers(model))


def keep_attention_outputs_of(layers) -> int:
    """:func:`keep_attention_outputs` for given decoder layers; layers already changed are skipped."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "selective checkpointing does not work under DeepSpeed ZeRO-3: ZeRO-3 gathers parameters "
            "inside the checkpointed layers, differently in the recompute than in the forward, and PyTorch's "
            "selective checkpointing requires the same operations. Use full checkpointing (long_sequence "
            "without selective_checkpointing / --selective-checkpointing) under ZeRO-3, or ZeRO-2.")
    changed = 0
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is None or keeps_attention_outputs(layer):
            continue
        if getattr(func, "keywords", {}).get("use_reentrant", False):
            raise ValueError("selective checkpointing needs non-reentrant checkpointing "
                             "(activation_checkpointing_kwargs={'use_reentrant': False}).")
        keep = functools.partial(func, context_fn=_context)
        keep._ulysses_keep = True
        layer._gradient_checkpointing_func = keep
        changed += 1
    return changed


def keeps_attention_outputs(layer: torch.nn.Module) -> bool:
    """Whether the checkpoint of a decoder ``layer`` keeps its attention outputs (changed by
    :func:`keep_attention_outputs`)."""
    return getattr(getattr(layer, "_gradient_checkpointing_func", None), "_ulysses_keep", False)
