"""Tiled MLP: run each decoder layer's MLP over sequence chunks, recomputed in the backward.

An MLP acts on each token independently, so running it on ``chunk_tokens`` tokens at a time is
exact. Each chunk runs under non-reentrant activation checkpointing, so at most one chunk's
intermediate activations (``3 x intermediate_size`` values per token for a gated MLP) exist at a
time, forward or backward, instead of the whole sequence's. The submodules are called as modules,
so DeepSpeed ZeRO-3 gathers their weights as usual (every rank makes the same number of calls:
:func:`~ulysses_attn.comm.chunk_count`, agreed once per forward), and the gradient of each weight
is accumulated once per
step (the chunks share one autograd graph). Under ZeRO-3 a tiled MLP is marked a DeepSpeed "leaf"
module (:func:`_gather_whole_under_zero3`).

Works for any transformers decoder whose layers hold their feed-forward block as ``layer.mlp``
(Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3, ...). Mixture-of-experts blocks are refused: their
router outputs are recorded per call and would be split.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch.utils.checkpoint import checkpoint

from . import patches
from .comm import chunk_count, split_chunks
from .models import decoder_layers, sequence_input

__all__ = ["tile_mlp", "default_mlp_chunk_tokens"]

_MOE_ATTRIBUTES = ("experts", "router")


def default_mlp_chunk_tokens(config) -> int:
    """About ``hidden_size`` tokens per chunk: each chunk's intermediate activations then take
    ``3 * intermediate_size * hidden_size * 2`` bytes in bf16, and the
    chunk's matmuls stay large enough to run at full speed."""
    return max(1024, int(getattr(config.get_text_config(), "hidden_size", 4096)))


def _decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    mlps = (getattr(layer, "mlp", None) for layer in decoder_layers(model))
    return [mlp for mlp in mlps if isinstance(mlp, torch.nn.Module)]


class _Tiling:
    """Shared by a model's tiled MLPs: the chunk size, and the chunk count agreed once per forward
    for the sequence length the backbone received (one collective per forward under ZeRO-3, not
    one per layer and per recompute)."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens
        self.seq: int | None = None
        self.count: int | None = None
        self.enabled = True  # configure_memory(tiled_mlp=False) switches it off

    def agree(self, backbone: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = sequence_input(args, kwargs)
        self.seq = self.count = None
        if x is not None:
            self.seq, self.count = x.shape[1], chunk_count(x.shape[1], self.chunk_tokens, x.device)

    def count_for(self, hidden_states: torch.Tensor) -> int:
        seq = hidden_states.shape[-2]
        if seq == self.seq and self.count is not None:
            return self.count
        return chunk_count(seq, self.chunk_tokens, hidden_states.device)


def tile_mlp(model: torch.nn.Module, chunk_tokens: int | None = None) -> int:
    """Make every decoder-layer MLP of ``model`` run over sequence chunks of ``chunk_tokens``
    tokens (default: :func:`default_mlp_chunk_tokens`). Returns the number of MLPs tiled;
    calling it again only updates the chunk size.

    >>> ulysses_attn.tile_mlp(model)          # or enable(..., long_sequence=True)
    """
    mlps = _decoder_mlps(model)
    if not mlps:
        raise NotImplementedError(f"tile_mlp found no decoder layer with an `mlp` submodule in {type(model).__name__}.")
    for mlp in mlps:
        if any(hasattr(mlp, name) for name in _MOE_ATTRIBUTES):
            raise NotImplementedError(f"tile_mlp does not support mixture-of-experts blocks ({type(mlp).__name__}).")
    if chunk_tokens is None:  # 0 is refused by chunk_count
        chunk_tokens = default_mlp_chunk_tokens(model.config)
    tiling = getattr(model, "_ulysses_tiling", None)
    if tiling is None:
        tiling = _Tiling(chunk_tokens)
        setattr(model, "_ulysses_tiling", tiling)  # noqa: B010 (typed: nn.Module attributes are Tensor | Module)
        patches.track("ulysses_attn.model_attributes", model, lambda: model.__dict__.pop("_ulysses_tiling", None))
        backbone = getattr(model, "base_model", model)
        handle = backbone.register_forward_pre_hook(tiling.agree, with_kwargs=True)
        patches.track("torch.nn.Module.register_forward_hook", backbone, handle.remove)
        for mlp in mlps:
            patches.replace(
                "transformers.decoder_layer.mlp.forward",
                mlp,
                "forward",
                functools.partial(_tiled_forward, tiling, mlp.forward),
            )
    _gather_whole_under_zero3(mlps)  # again on a later call: ZeRO-3 may have been configured since
    tiling.chunk_tokens, tiling.enabled = chunk_tokens, True
    return len(mlps)


def _gather_whole_under_zero3(mlps: list[torch.nn.Module]) -> None:
    """Mark the tiled MLPs as DeepSpeed ZeRO-3 leaf modules: their weights are gathered once per
    MLP call instead of once per chunk and Linear. Otherwise every chunk's Linear calls enter
    ZeRO-3's module trace, and in the second step DeepSpeed computes, for each trace position, which
    parameters to release by walking the trace ahead (``PartitionedParameterCoordinator.
    __params_to_release``, cached per position), a one-off walk that made the second step much
    slower (docs/benchmarks.md, "Measurements the code refers to"). Must run before
    ``deepspeed.initialize`` registers its hooks; done when transformers says ZeRO-3 is on or
    DeepSpeed is already imported."""
    if "deepspeed" not in sys.modules:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            return
    try:
        from deepspeed.utils import set_z3_leaf_module, z3_leaf_module
    except ImportError:
        return
    for mlp in mlps:
        if not z3_leaf_module(mlp):
            set_z3_leaf_module(mlp, True)
            patches.track("deepspeed.utils.set_z3_leaf_module", mlp, functools.partial(set_z3_leaf_module, mlp, False))


def _tiled_forward(tiling: _Tiling, forward, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or hidden_states.dim() < 2 or not tiling.enabled:
        return forward(hidden_states, *args, **kwargs)
    count = tiling.count_for(hidden_states)
    if count == 1:
        return forward(hidden_states)
    chunks = split_chunks(hidden_states, count, dim=-2)
    if torch.is_grad_enabled():
        outputs = [checkpoint(forward, c, use_reentrant=False) for c in chunks]
    else:
        outputs = [forward(c) for c in chunks]
    return torch.cat(outputs, dim=-2)
