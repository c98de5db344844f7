"""What an attention backend cannot see of a model, made exact or refused before it goes wrong.

Under sequence parallelism each rank runs its ``S/P`` tokens through the model and only the
attention function sees the whole sequence. Two kinds of model code see just the shard:

- **token mixing outside attention** — causal convolutions, state-space scans, linear attention
  (Mamba and its hybrids, gated delta-net, lightning attention, short convolutions). A layer like
  that would mix only its rank's shard: :func:`refuse_token_mixing` refuses, by two rules that name
  no model: a decoder layer holding a convolution over the sequence (``nn.Conv1d``, kernel > 1) or a
  state-space decay (``A_log``), found before the first forward; and a decoder layer that ran
  without calling the attention function, found in the first forward. The gated delta-net layers
  of Qwen3-Next / Qwen3.5 and LFM2's short convolutions are made exact first
  (:func:`ulysses_attn.linear_attention.make_exact`) and pass both rules; every other such layer is refused.
- **RoPE that depends on the sequence length** (``dynamic``, ``longrope``, PhiMoE's scaling):
  its frequencies follow ``max(position_ids)``, which differs between the shards.
  :func:`global_rope_lengths` makes such a module see the group's maximum position.

:func:`watch` installs both on a model (a forward pre-hook that acts on the first SP forward);
:mod:`ulysses_attn.registration` calls it for every model built with ``"ulysses_flash"``.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.distributed as dist

from . import linear_attention, patches
from .models import decoder_layers
from .state import STATE, active_sp

__all__ = [
    "TokenMixingOutsideAttention",
    "token_mixing_modules",
    "refuse_token_mixing",
    "refuse_positions_it_cannot_take",
    "refuse_masks_it_cannot_take",
    "refuse_media_inputs",
    "global_rope_lengths",
    "watch",
]

DECAY_PARAMETERS = ("A_log",)  # the per-head decay of SSM / delta-rule layers

_ROPE = "transformers.RotaryEmbedding.forward"
_WATCH = "transformers.PreTrainedModel.register_forward_pre_hook"
_LAYER_WATCH = "torch.nn.Module.register_forward_hook"


class TokenMixingOutsideAttention(NotImplementedError):
    """A layer mixes tokens outside the attention function, so sequence parallelism cannot shard it."""


def _advice(model: torch.nn.Module) -> str:
    return (
        "Under sequence parallelism each rank runs only its shard of the sequence and only the attention function "
        f"sees all of it, so {type(model).__name__} would compute a different function. Train it without sequence "
        "parallelism (sp_size=1); docs/models-and-limits.md lists the architectures that work."
    )


def token_mixing_modules(model: torch.nn.Module) -> list[str]:
    """The decoder-layer submodules of ``model`` that mix tokens outside attention, as
    ``"name (what)"``: convolutions over the sequence and state-space / delta-rule decays (those
    inside a layer made exact, :func:`ulysses_attn.linear_attention.is_exact`, excepted)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for layer in decoder_layers(model):
        exact = {id(s) for m in layer.modules() if linear_attention.is_exact(m) for s in m.modules()}
        for sub in layer.modules():
            if id(sub) in exact:
                continue
            if isinstance(sub, torch.nn.Conv1d) and sub.kernel_size[0] > 1:
                found.append(f"{names.get(id(sub), '?')} (Conv1d over the sequence, kernel {sub.kernel_size[0]})")
            elif any(n in DECAY_PARAMETERS for n, _ in sub.named_parameters(recurse=False)):
                found.append(f"{names.get(id(sub), '?')} ({type(sub).__name__}: a recurrence over the sequence)")
    return found


def refuse_token_mixing(model: torch.nn.Module) -> None:
    """Raise :class:`TokenMixingOutsideAttention` if a decoder layer of ``model`` holds a module that
    mixes tokens outside attention (the same on every rank: it depends on the model only)."""
    found = token_mixing_modules(model)
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise TokenMixingOutsideAttention(
            f"ulysses_flash: {found[0]}{more} mixes tokens outside the attention function. {_advice(model)}"
        )


def refuse_positions_it_cannot_take(model: torch.nn.Module) -> None:
    """Each shard must be told its global positions (``shard_batch`` passes ``position_ids``):
    refuse a model whose forward takes no ``position_ids`` (it would number every shard from 0), or
    whose position embedding counts from its padding index (RoBERTa-style: ``position_ids`` from
    ``shard_batch`` would be off by that offset)."""
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise NotImplementedError(
            f"ulysses_flash: {type(model).__name__}.forward takes no position_ids, so each sequence-parallel shard "
            f"would number its tokens from 0. {_advice(model)}"
        )
    for name, sub in model.named_modules():
        if isinstance(sub, torch.nn.Embedding) and "position" in name and sub.padding_idx is not None:
            raise NotImplementedError(
                f"ulysses_flash: {name} numbers positions from its padding index {sub.padding_idx} (RoBERTa-style), "
                f"not from the position_ids sequence parallelism passes. {_advice(model)}"
            )


def _length_dependent(rotary: torch.nn.Module) -> bool:
    """The RoPE types whose frequencies transformers recomputes from ``max(position_ids)``
    (``dynamic_rope_update``: any ``*dynamic*`` type and ``longrope``, which PhiMoE's own scaling
    also follows); ``default``, ``linear``, ``llama3``, ``yarn`` are fixed at init."""
    rope_type = getattr(rotary, "rope_type", None)
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in types)


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if hasattr(m, "rope_type") and any(n.endswith("inv_freq") for n, _ in m.named_buffers())
    ]


def global_rope_lengths(model: torch.nn.Module, group: Any) -> int:
    """Make every RoPE module of ``model`` whose type follows the sequence length compute its frequencies
    from the maximum position over the SP ``group`` (what the model sees without SP), not its
    shard's: one more position, the group maximum, is appended to ``position_ids`` and its row cut
    from the output. Costs one scalar all-reduce per forward. Returns how many modules it changed."""
    changed = 0
    for rotary in _rotary_modules(model):
        if not _length_dependent(rotary) or patches.is_replaced(rotary, "forward"):
            continue
        original = rotary.forward

        def forward(x, position_ids=None, *args, _original=original, **kwargs):
            sp = active_sp()
            if position_ids is None or sp is None or sp.size == 1:
                return _original(x, position_ids, *args, **kwargs)
            top = position_ids.max().reshape(1).to(torch.int64)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            extra = top.to(position_ids.dtype).expand(*position_ids.shape[:-1], 1)
            out = _original(x, torch.cat([position_ids, extra], dim=-1), *args, **kwargs)
            return tuple(o[..., :-1, :] for o in out) if isinstance(out, tuple) else out[..., :-1, :]

        patches.replace(_ROPE, rotary, "forward", forward)
        changed += 1
    return changed


def _watch_layers(model: torch.nn.Module) -> list:
    """Hooks that raise when a decoder layer finishes its forward without an attention call."""
    handles = []
    for layer in decoder_layers(model):
        start: list[int] = []

        def before(m, args, _start=start):
            _start[:] = [STATE.attention_calls]

        def after(m, args, out, _start=start):
            if active_sp() is None:  # an unsharded forward (generation) inside the first SP step: not checked
                return
            if _start and STATE.attention_calls == _start[0]:
                raise TokenMixingOutsideAttention(
                    f"ulysses_flash: decoder layer {type(m).__name__} ran without calling the attention function, "
                    f"so it mixes tokens some other way (linear attention, a state-space scan, a convolution) or "
                    f"not at all. {_advice(model)}"
                )

        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles


MEDIA_INPUTS = ("pixel_values", "image_", "video_", "input_features", "audio_")  # name prefixes of non-text inputs


def refuse_media_inputs(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Under SP a vision-language (or audio) model's image features are merged into the token
    sequence inside its forward, after the collator sharded the sequence: a shard's image tokens do
    not match the images, and M-RoPE positions would be computed per shard. Refuse any forward with
    such inputs (by name: ``pixel_values*``, ``image_*``, ``video_*``, ``input_features``, ``audio_*``)."""
    media = sorted(k for k, v in kwargs.items() if v is not None and k.startswith(MEDIA_INPUTS))
    if media:
        raise NotImplementedError(
            f"ulysses_flash: {type(model).__name__} got {', '.join(media)} under sequence parallelism. Image, video "
            "and audio features are merged into the token sequence inside the model, after the sequence was sharded, "
            "so a shard's placeholder tokens would not match them; multimodal inputs are not supported under SP yet. "
            "Train text-only batches with SP, or multimodal ones without it (sp_size=1)."
        )


def _first_sp_forward(model: torch.nn.Module, args, kwargs) -> None:
    sp = active_sp()
    if sp is None or sp.size == 1:
        return
    refuse_media_inputs(model, kwargs)  # every forward: a later batch may hold images
    if model in STATE.checked_models or model in STATE.checking_models:
        return
    if not decoder_layers(model):
        raise TokenMixingOutsideAttention(
            f"ulysses_flash: {type(model).__name__} has no transformers decoder layers (GradientCheckpointingLayer), "
            f"so the package cannot check that it mixes tokens only in attention. {_advice(model)}"
        )
    refuse_unprepared_selected_model(model)
    exact_linear_layers = linear_attention.make_exact(model)
    refuse_token_mixing(model)
    # the hybrid families made exact (Qwen3-Next, Qwen3.5) call the attention interface without setting the
    # flag; that each of their decoder layers calls it (or the package's delta rule) is checked by the layer
    # watch below, in this forward
    if not exact_linear_layers and not getattr(model, "_supports_attention_backend", False):
        raise NotImplementedError(
            f"ulysses_flash: {type(model).__name__} does not route its attention through transformers' "
            f"AttentionInterface (_supports_attention_backend is not set), so the sequence-parallel attention "
            f"would never run. {_advice(model)}"
        )
    refuse_positions_it_cannot_take(model)
    global_rope_lengths(model, sp.group)
    from transformers import PreTrainedModel

    members = [m for m in model.modules() if isinstance(m, PreTrainedModel)]  # the inner models share the check
    handles = _watch_layers(model)

    def done(m, args, kwargs, out):
        if active_sp() is None:  # an unsharded forward checks nothing: the next SP forward is watched
            return
        remove_watchers()
        for member in members:
            STATE.checking_models.discard(member)
            STATE.checked_models.add(member)

    # until a forward completes, the layer watchers stay (a forward that raised is checked again);
    # disable() removes them too
    handles.append(model.register_forward_hook(done, with_kwargs=True))

    def remove_watchers() -> None:
        for h in handles:
            h.remove()

    patches.track(_LAYER_WATCH, model, remove_watchers)
    STATE.checking_models.update(members)


def refuse_unprepared_selected_model(model: torch.nn.Module) -> None:
    """A model that got ``"ulysses_flash"`` from ``select_backend`` (the launcher), not from the
    script, runs correctly only where the package shards its inputs: a Trainer, TRL's fused head,
    :func:`ulysses_attn.make_transparent`. Called directly (a training loop of the script's own) it
    would get the whole sequence on every rank as if each held a shard: refuse."""
    members = list(model.modules())
    selected = any(m in STATE.selected_models for m in members)
    if selected and not any(m in STATE.prepared_models for m in members):
        raise RuntimeError(
            f"ulysses_flash: {type(model).__name__} was given attn_implementation='ulysses_flash' by the launcher "
            "(select_backend), but it runs outside a Trainer, so nothing shards its inputs along the sequence: every "
            "rank would feed the whole sequence as if it were its shard. Call ulysses_attn.make_transparent(model, "
            "ulysses_attn.get_sequence_parallel()) for whole batches, or build the model with "
            "attn_implementation='ulysses_flash' yourself and shard its inputs with ulysses_attn.shard_batch, or "
            "launch with --keep-attn-implementation."
        )


def refuse_masks_it_cannot_take(model: torch.nn.Module) -> None:
    """``ulysses_flash`` gets what a flash backend gets: a 2D padding mask and positions. A model
    that does not support transformers' flash path (``_supports_flash_attn`` unset) needs masks it
    cannot express -- chunked (Llama 4), bidirectional image spans (Gemma 3, mllama), dynamic 4D
    masks (Doge), sparse indexers (DeepSeek-V3.2) -- and would silently attend to the wrong tokens."""
    if not getattr(type(model), "_supports_flash_attn", False):
        raise NotImplementedError(
            f"ulysses_flash: {type(model).__name__} does not support transformers' flash-attention path "
            "(_supports_flash_attn is not set): its attention needs masks (chunked, bidirectional, dynamic 4D or "
            "sparse) that a flash-style backend such as ulysses_flash never receives, so it would attend to the "
            "wrong tokens. Use attn_implementation='sdpa' or 'eager' without sequence parallelism."
        )


def watch(model: torch.nn.Module) -> None:
    """Refuse a model whose masks the backend cannot take, and check ``model`` on its first
    sequence-parallel forward (a forward pre-hook; idempotent)."""
    if getattr(model, "_ulysses_attn_watched", False):
        return
    refuse_masks_it_cannot_take(model)
    handle = model.register_forward_pre_hook(_first_sp_forward, with_kwargs=True)
    vars(model)["_ulysses_attn_watched"] = True

    ref = weakref.ref(model)

    def undo() -> None:
        handle.remove()
        m = ref()
        if m is not None:
            m.__dict__.pop("_ulysses_attn_watched", None)

    patches.track(_WATCH, model, undo)
