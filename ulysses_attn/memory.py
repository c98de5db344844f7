"""Memory options for long sequences, applied to a causal LM in place.

* ``chunked_loss`` (on by default under SP): in training, the loss is computed from the
  backbone's hidden states chunk by chunk (:func:`~ulysses_attn.loss.chunked_causal_lm_loss`),
  so the ``[tokens, vocab]`` logits never exist; ``outputs.logits`` is ``None`` then.
  Evaluation keeps the model's own forward (metrics may need the logits).
* ``tiled_mlp``: decoder MLPs run over sequence chunks (:mod:`ulysses_attn.tiled_mlp`).
* ``offload_checkpoints``: with activation checkpointing on, the layers' checkpointed inputs go
  to pinned host memory, overlapped with compute (:mod:`ulysses_attn.offload`).
* ``selective_checkpointing`` (off; costs memory, saves time): checkpointed layers keep their
  attention kernel's output instead of recomputing it (:mod:`ulysses_attn.selective_checkpoint`);
  with ``offload_checkpoints`` those outputs go to the host too (``offload_attention_outputs``, on;
  its cost and saving are measured in docs/benchmarks.md).

``enable(sp_size, long_sequence=True)`` (launcher: ``--long-sequence``) turns the first three on,
and activation checkpointing with them, for every Trainer; :func:`configure_memory` does it for one
model. ``long_sequence="auto"`` (``--long-sequence auto``, :meth:`MemoryOptions.automatic`) picks
them at every training forward: the set with the least recompute that fits the device's free memory
for that forward's tokens (:mod:`ulysses_attn.memory_plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

from . import patches
from .head import LogitTransform, checked_logit_transform
from .loss import LossPath, chunked_causal_lm_loss, loss_path
from .memory_plan import Choice, MemoryPlan, PlanChecker, agreed_plan
from .models import decoder_layers, sequence_input
from .offload import CheckpointOffloader
from .selective_checkpoint import keep_attention_outputs_of, keeps_attention_outputs, recompute_attention_outputs_of
from .state import announce_once, warn_once
from .tiled_mlp import tile_mlp

__all__ = ["MemoryOptions", "apply_choice", "configure_memory"]


@dataclasses.dataclass
class MemoryOptions:
    """What :func:`configure_memory` turns on. ``None`` chunk sizes pick the defaults
    (:func:`~ulysses_attn.loss.default_loss_chunk_tokens`,
    :func:`~ulysses_attn.tiled_mlp.default_mlp_chunk_tokens`)."""

    chunked_loss: bool = True
    loss_chunk_tokens: int | None = None
    tiled_mlp: bool = False
    mlp_chunk_tokens: int | None = None
    offload_checkpoints: bool = False
    offload_min_bytes: int = 1 << 20  # smaller saved tensors stay on the device
    activation_checkpointing: bool = False  # turned on for the Trainer when set (long_sequence)
    selective_checkpointing: bool = False
    offload_attention_outputs: bool = True  # applies with selective_checkpointing and offload_checkpoints
    auto: bool = False  # the memory plan picks the four above at every training forward (memory_plan.py)
    memory_budget_bytes: int | None = None  # auto: what a step may allocate (None: the device's free memory)

    def __post_init__(self):
        for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MemoryOptions.{name} must be a positive number of tokens or None; got {value!r}.")
        if not isinstance(self.offload_min_bytes, int) or self.offload_min_bytes < 0:
            raise ValueError(f"MemoryOptions.offload_min_bytes must be >= 0; got {self.offload_min_bytes!r}.")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ValueError(
                f"MemoryOptions.memory_budget_bytes must be positive or None; got {self.memory_budget_bytes!r}."
            )

    @classmethod
    def long_sequence(cls, **overrides) -> MemoryOptions:
        """Every memory saving on: chunked loss, tiled MLP, checkpointing with offload."""
        return cls(**{"tiled_mlp": True, "offload_checkpoints": True, "activation_checkpointing": True, **overrides})

    @classmethod
    def automatic(cls, **overrides) -> MemoryOptions:
        """The memory plan (:mod:`ulysses_attn.memory_plan`): at every training forward, the
        checkpointed layers, selective checkpointing, offload and MLP tiling with the least recompute
        that fit ``memory_budget_bytes`` (default: the device's free memory, less 10%)."""
        return cls(**{"auto": True, "activation_checkpointing": True, **overrides})

    def with_env_overrides(self) -> MemoryOptions:
        """Sizes from ``ULYSSES_LOSS_CHUNK_TOKENS``, ``ULYSSES_MLP_CHUNK_TOKENS`` and
        ``ULYSSES_OFFLOAD_MIN_BYTES`` where set (for launched scripts)."""
        changes: dict[str, Any] = {
            field: int(os.environ[var]) for var, field in _ENV_SIZES.items() if os.environ.get(var)
        }
        if os.environ.get("ULYSSES_MEMORY_BUDGET_GIB"):
            changes["memory_budget_bytes"] = int(float(os.environ["ULYSSES_MEMORY_BUDGET_GIB"]) * 2**30)
        return dataclasses.replace(self, **changes)


_ENV_SIZES = {
    "ULYSSES_LOSS_CHUNK_TOKENS": "loss_chunk_tokens",
    "ULYSSES_MLP_CHUNK_TOKENS": "mlp_chunk_tokens",
    "ULYSSES_OFFLOAD_MIN_BYTES": "offload_min_bytes",
}


def configure_memory(model: torch.nn.Module, options: MemoryOptions | None = None, **kwargs) -> MemoryOptions:
    """Apply ``options`` (or ``MemoryOptions(**kwargs)``) to a ``*ForCausalLM`` in place; calling
    it again replaces the options (an option switched off is off from the next forward). Returns
    the options in force.

    >>> configure_memory(model, MemoryOptions.long_sequence())
    >>> model.gradient_checkpointing_enable()   # offload_checkpoints needs checkpointed layers
    """
    options = options or MemoryOptions(**kwargs)
    hf: Any = model  # a transformers model: its attributes are looked up at run time
    if getattr(hf, "get_output_embeddings", lambda: None)() is None or not hasattr(hf, "base_model"):
        raise NotImplementedError(f"configure_memory needs a causal LM with an LM head; got {type(hf).__name__}.")
    previous = getattr(hf, "_ulysses_memory", None)
    if options.auto:
        hf._ulysses_plan_tiling = _try_tiling(hf, options.mlp_chunk_tokens)
    elif options.tiled_mlp:
        tile_mlp(hf, options.mlp_chunk_tokens)
    elif getattr(hf, "_ulysses_tiling", None) is not None:  # switched off by this call
        hf._ulysses_tiling.enabled = False
    layers = decoder_layers(hf.base_model)
    was_auto = previous is not None and previous.auto
    if previous is not None and (previous.selective_checkpointing or was_auto) and not options.selective_checkpointing:
        recompute_attention_outputs_of(layers)
    if was_auto and not options.auto:
        _give_layers_back(hf)
    if previous is None:
        patches.replace("transformers.PreTrainedModel.forward", hf, "forward", _chunked_loss_forward(hf, hf.forward))
        backbone = hf.base_model
        patches.replace(
            "transformers.PreTrainedModel.base_model.forward",
            backbone,
            "forward",
            _backbone_forward(hf, backbone.forward),
        )
        patches.track("ulysses_attn.model_attributes", hf, functools.partial(_forget_memory, hf))
    hf._ulysses_memory = options
    hf._ulysses_offloader.min_bytes = options.offload_min_bytes
    hf._ulysses_offloader.offload_kept = options.offload_attention_outputs and options.selective_checkpointing
    return options


def _is_checkpointing(model: Any) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x; older: the deprecated name
    return bool(flag if flag is not None else model.is_gradient_checkpointing)


def _forget_memory(model: torch.nn.Module) -> None:
    for name in (
        "_ulysses_memory",
        "_ulysses_offloader",
        "_ulysses_plan_tiling",
        "_ulysses_plan_checker",
    ):
        model.__dict__.pop(name, None)


def _try_tiling(model: Any, chunk_tokens: int | None) -> bool:
    """Tile the MLPs for the plan to switch on and off (off until a plan asks); False where they
    cannot be tiled (mixture-of-experts blocks, no ``mlp``)."""
    try:
        tile_mlp(model, chunk_tokens)
    except NotImplementedError:
        return False
    model._ulysses_tiling.enabled = False
    return True


def _checkpointing_enabled(model: Any) -> bool:
    """Whether activation checkpointing was enabled on ``model`` (by the Trainer or the script)
    before the plan took the layers' switches over; the first time, the switches are recorded so
    that ``disable()`` turns every layer back on."""
    if model.__dict__.get("_ulysses_plan_checkpointing"):
        return True
    if not _is_checkpointing(model):
        return False
    model.__dict__["_ulysses_plan_checkpointing"] = True
    record = "transformers.GradientCheckpointingLayer.gradient_checkpointing"
    patches.track(record, model, functools.partial(_give_layers_back, model))
    return True


def _give_layers_back(model: Any) -> None:
    """Every decoder layer checkpointed again, as transformers' checkpointing left them."""
    if model.__dict__.pop("_ulysses_plan_checkpointing", False):
        layers = decoder_layers(model.base_model)
        _checkpoint_layers(layers, len(layers))


def _checkpoint_layers(layers: list, count: int) -> None:
    """Checkpoint the first ``count`` decoder layers (transformers reads the switch at each call)."""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count


def apply_choice(model: Any, choice: Choice) -> MemoryOptions:
    """Switch ``model`` (configured with ``MemoryOptions(auto=True)``) to one candidate of the plan;
    returns the options in force for this forward. Checkpointing must be enabled on the model
    (``gradient_checkpointing_enable()``, done by the Trainer) for ``choice.checkpointed > 0``."""
    options: MemoryOptions = model._ulysses_memory
    layers = decoder_layers(model.base_model)
    if _checkpointing_enabled(model):
        _checkpoint_layers(layers, choice.checkpointed)
    elif choice.checkpointed:
        raise ValueError("apply_choice: checkpointed layers need activation checkpointing enabled on the model.")
    if getattr(model, "_ulysses_tiling", None) is not None:
        model._ulysses_tiling.enabled = choice.tiled_mlp
    if choice.selective and choice.checkpointed:
        keep_attention_outputs_of(layers)
    elif any(keeps_attention_outputs(layer) for layer in layers):
        recompute_attention_outputs_of(layers)
    model._ulysses_offloader.offload_kept = choice.selective and options.offload_attention_outputs
    return dataclasses.replace(
        options,
        auto=False,
        tiled_mlp=choice.tiled_mlp,
        offload_checkpoints=choice.offload,
        selective_checkpointing=choice.selective and choice.checkpointed > 0,
        activation_checkpointing=choice.checkpointed > 0,
    )


def _plan(model: Any, options: MemoryOptions, layers: list, args: tuple, kwargs: dict) -> MemoryOptions:
    """Plan this training forward's memory options and switch the model to them."""
    x = sequence_input(args, kwargs)
    if x is None:
        return options
    checker = model.__dict__.setdefault("_ulysses_plan_checker", PlanChecker())
    checkpointing = bool(layers) and _checkpointing_enabled(model)
    if not checkpointing:
        warn_once(
            ("plan_without_checkpointing", id(model)),
            "ulysses_attn: the memory plan can only tile MLPs: activation checkpointing is not enabled on the model "
            "(the Trainer enables it with long_sequence='auto'; otherwise call model.gradient_checkpointing_enable()).",
        )
    plan: MemoryPlan = agreed_plan(
        model,
        x,
        budget_bytes=options.memory_budget_bytes,
        checker=checker,
        tiling=bool(getattr(model, "_ulysses_plan_tiling", False)),
        checkpointing=checkpointing,
        loss_chunk_tokens=options.loss_chunk_tokens,
    )
    layer_count = len(layers)
    # once per choice, not per length: variable-length batches would print a line at every step
    announce_once(("memory plan", plan.choice), "ulysses_attn: memory plan: " + plan.describe(layer_count))
    if not plan.fits:
        warn_once(
            ("plan does not fit", plan.choice),
            "ulysses_attn: no memory plan fits: %s. Train shorter sequences, a larger SP size, or ZeRO-3 with "
            "parameter offload.",
            plan.describe(layer_count),
        )
    return apply_choice(model, plan.choice)


def _backbone_forward(model: Any, original: Any) -> Any:
    """The backbone's forward with the activation options: selective checkpointing and offload."""
    model._ulysses_offloader = offloader = CheckpointOffloader()
    layers = decoder_layers(model.base_model)
    if layers:  # what the forward saves after the last decoder layer is the first the backward needs
        handle = layers[-1].register_forward_hook(lambda *_: offloader.keep_rest())
        patches.track("torch.nn.Module.register_forward_hook", layers[-1], handle.remove)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        options: MemoryOptions = model._ulysses_memory
        training = model.training and torch.is_grad_enabled()
        if options.auto and training:
            options = _plan(model, options, layers, args, kwargs)
        checkpointing = training and _is_checkpointing(model)
        if checkpointing and options.selective_checkpointing:
            keep_attention_outputs_of(layers)  # the Trainer (re-)enables checkpointing in train()
        if options.offload_checkpoints and checkpointing:
            with offloader:
                return original(*args, **kwargs)
        if options.offload_checkpoints and training:
            warn_once(
                "offload_without_checkpointing",
                "ulysses_attn: offload_checkpoints has no effect without "
                "activation checkpointing (model.gradient_checkpointing_enable() / "
                "TrainingArguments(activation_checkpointing=True)).",
            )
        return original(*args, **kwargs)

    return forward


def _chunked_loss_forward(model: Any, original: Any) -> Any:
    @functools.wraps(original)
    def forward(*args, **kwargs):
        options: MemoryOptions = model._ulysses_memory
        training = model.training and torch.is_grad_enabled()
        path = loss_path(model, chunked_loss=options.chunked_loss, call=(args, kwargs), training=training)
        transform = checked_logit_transform(model, original) if path is LossPath.CHUNKED else None
        if transform is None:  # not chunked, or logits the chunked loss cannot reproduce (warned)
            return original(*args, **kwargs)
        return _loss_from_hidden_states(model, options, transform, **kwargs)

    return forward


def _loss_from_hidden_states(
    model,
    options: MemoryOptions,
    transform: LogitTransform,
    *,
    labels=None,
    shift_labels=None,
    num_items_in_batch=None,
    logits_to_keep=None,
    return_dict=None,
    **kwargs,
):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs["use_cache"] = False
    out = model.base_model(**kwargs)
    loss = chunked_causal_lm_loss(
        out.last_hidden_state,
        model.get_output_embeddings(),
        labels=labels,
        shift_labels=shift_labels,
        num_items_in_batch=num_items_in_batch,
        chunk_tokens=options.loss_chunk_tokens,
        logit_scale=transform.scale,
        final_logit_softcapping=transform.softcap,
    )
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)
