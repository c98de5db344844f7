"""Selective activation checkpointing: keep the attention kernel's output, recompute the rest.

At long sequence lengths the attention kernel is most of a decoder layer's time (measured shares
in docs/benchmarks.md), and full checkpointing runs its forward twice. Its output is
small by comparison: ``tokens x heads x head_dim`` (the size of the layer's hidden states) plus
the softmax statistics. With this option each checkpointed layer keeps the kernel's outputs and
recomputes everything else, so the backward skips the second attention forward.

How: the layer's non-reentrant checkpoint gets a ``context_fn`` whose two dispatch modes see
only the forward attention kernels (SDPA's backends, ``torch.nn.attention.varlen``, FA2/FA3's
registered ops, FA4 through :mod:`ulysses_attn.flash4`): in the forward they keep the kernels'
outputs, in the recompute they hand them back in the same order instead of running the kernels;
every other op runs as usual. This is PyTorch's selective checkpointing
(``create_selective_checkpoint_contexts``) restricted to the attention ops. PyTorch's own (2.13)
also requires every other op of the recompute to match the forward's one for one, which fails
under DeepSpeed ZeRO-3: its parameter gathers inside the layer allocate differently in the
recompute ("aten.empty ... encountered during backward but not found in storage").

The kept outputs cost about ``layers x hidden x 2`` bytes per token; they stay on the device
unless the forward runs inside a :class:`~ulysses_attn.offload.CheckpointOffloader` with
``offload_kept=True`` (``MemoryOptions(offload_checkpoints=True)``, whose
``offload_attention_outputs`` is on by default), which moves them to pinned host memory with the
checkpointed inputs and brings each back, prefetched, for its replay.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_map, tree_map_only

from . import patches
from .models import decoder_layers
from .offload import _Offloaded, active_offloader
from .state import STATE

__all__ = ["is_attention_op", "keep_attention_outputs", "keeps_attention_outputs", "replayed_attention_outputs"]

# forward attention kernels as the dispatcher sees them (SDPA's flash/cuDNN/efficient/CPU-flash
# backends, torch.nn.attention.varlen, flash-attn's registered ops, ulysses_attn::flash_attn4)
_ATTENTION_OPS = (
    "scaled_dot_product",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "_cudnn_attention_forward",
    "varlen_attn",
    "flash_attn",
)
_PATCH = "transformers.GradientCheckpointingLayer._gradient_checkpointing_func"


@functools.cache  # asked for every op that runs inside a checkpointed layer
def is_attention_op(op) -> bool:
    """Whether a dispatcher op is a forward attention kernel whose outputs are kept."""
    name = str(op)
    return "backward" not in name and any(key in name for key in _ATTENTION_OPS)


def replayed_attention_outputs() -> int:
    """How many attention kernel calls the recomputes of this process skipped so far."""
    return STATE.replayed_attention_outputs


class _AttentionOutputs(TorchDispatchMode):
    """Keeps (``replay=False``) or hands back (``replay=True``) the outputs of the attention ops
    of one checkpointed call; the two modes of a call share ``kept``. ``keeps_attention_outputs``
    tells the kernels (which do not import this module) that a forward keeps them."""

    def __init__(self, kept: list, replay: bool):
        super().__init__()
        self.kept, self.replay, self.next = kept, replay, 0
        self.keeps_attention_outputs = not replay

    def __enter__(self):
        self.next = 0  # a second backward of the same region starts over (and fails as PyTorch's would)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_attention_op(func):
            return func(*args, **kwargs)
        if not self.replay:
            out = func(*args, **kwargs)
            offloader = active_offloader()
            offloader = offloader if offloader is not None and offloader.offload_kept else None
            keep = (lambda t: offloader.stash(t.detach())) if offloader else torch.Tensor.detach
            self.kept.append((offloader, tree_map_only(torch.Tensor, keep, out)))
            return out
        if self.next >= len(self.kept) or self.kept[self.next] is None:
            raise RuntimeError(
                f"selective checkpointing: the recompute ran attention kernel #{self.next + 1} ({func}) but the "
                f"forward kept {len(self.kept)}; the checkpointed layer must call the same attention kernels "
                "in its recompute (or it was run backward twice)."
            )
        (offloader, out), self.kept[self.next] = self.kept[self.next], None
        self.next += 1
        STATE.replayed_attention_outputs += 1
        if offloader is not None:
            out = tree_map(lambda t: offloader.restore(t) if isinstance(t, _Offloaded) else t, out)
        return out


def keeping() -> bool:
    """Whether this forward runs inside a checkpointed layer that keeps its attention outputs."""
    return any(getattr(m, "keeps_attention_outputs", False) for m in _get_current_dispatch_mode_stack())


def _context():
    kept: list = []
    return _AttentionOutputs(kept, replay=False), _AttentionOutputs(kept, replay=True)


def keep_attention_outputs(model: torch.nn.Module) -> int:
    """Make the checkpointed decoder layers of ``model`` keep their attention outputs. Call it
    after checkpointing is enabled (the Trainer enables it in ``train()``; :func:`configure_memory`
    does it at every training forward). Returns the number of layers changed."""
    return keep_attention_outputs_of(decoder_layers(model))


def keep_attention_outputs_of(layers) -> int:
    """:func:`keep_attention_outputs` for given decoder layers; layers already changed are skipped."""
    changed = 0
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is None or keeps_attention_outputs(layer):
            continue
        if getattr(func, "keywords", {}).get("use_reentrant", False):
            raise ValueError(
                "selective checkpointing needs non-reentrant checkpointing "
                "(activation_checkpointing_kwargs={'use_reentrant': False})."
            )
        patches.replace(_PATCH, layer, "_gradient_checkpointing_func", functools.partial(func, context_fn=_context))
        changed += 1
    return changed


def recompute_attention_outputs_of(layers) -> int:
    """Undo :func:`keep_attention_outputs_of`: the layers' checkpoints recompute everything again."""
    return sum(patches.restore(layer, "_gradient_checkpointing_func") for layer in layers)


def keeps_attention_outputs(layer: torch.nn.Module) -> bool:
    """Whether the checkpoint of a decoder ``layer`` keeps its attention outputs (changed by
    :func:`keep_attention_outputs`)."""
    return patches.is_replaced(layer, "_gradient_checkpointing_func")
