"""What the package needs to know of a transformers model: its decoder layers, and whether it (or a
submodule) uses the ``"ulysses_flash"`` backend."""

from __future__ import annotations

import torch

__all__ = ["ATTN_IMPLEMENTATION", "decoder_layers", "sequence_input", "ulysses_models", "uses_ulysses"]

ATTN_IMPLEMENTATION = "ulysses_flash"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``: transformers' ``GradientCheckpointingLayer`` modules, in
    registration order (what activation checkpointing wraps, and what the memory options act on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def ulysses_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformers models inside ``model`` (itself included) configured with ``ulysses_flash``."""
    return [
        m
        for m in model.modules()
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION
        and hasattr(type(m), "loss_function")
    ]


def uses_ulysses(model: torch.nn.Module | None) -> bool:
    return model is not None and bool(ulysses_models(model))


def sequence_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``[batch, seq, ...]`` input of a backbone call: ``input_ids``, else ``inputs_embeds``,
    else the first positional argument; ``None`` if none is a tensor of at least two dimensions."""
    x = kwargs.get("input_ids")
    x = x if x is not None else kwargs.get("inputs_embeds")
    x = x if x is not None or not args else args[0]
    return x if torch.is_tensor(x) and x.dim() >= 2 else None
