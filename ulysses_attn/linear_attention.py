"""Linear-attention layers made exact under sequence parallelism: gated delta-nets, short
convolutions and Mamba-2 mixers.

Qwen3-Next and Qwen3.5 (dense and MoE) mix full-attention layers with gated delta-net (GDN) layers.
A GDN layer mixes tokens twice, outside the attention function:

1. a short depthwise causal convolution (kernel ``k``, 4 in the released models) over q, k, v;
2. the gated delta rule: per value head a recurrence over the whole sequence.

Under SP each rank holds ``S/P`` tokens. The layer is made exact by replacing, on each layer
instance, the two kernel functions transformers routes through the layer (``use_kernelized_func``:
``layer._kernel_funcs["causal_conv1d_forward"]`` and ``["chunk_gated_delta_rule"]``):

- :func:`halo_from_previous`: the convolution gets the ``k - 1`` positions before its shard from the
  ranks before it (zeros on rank 0), convolves ``halo + shard`` and drops the halo's outputs;
- :func:`heads_to_sequence` / :func:`sequence_to_heads`: the delta rule runs Ulysses-style: q, k, v,
  g and beta go through an all-to-all to the full sequence for ``Hv/P`` value heads, the layer's own
  chunked kernel runs on them, and its output comes back to ``S/P`` tokens of every head.

LFM2's short-convolution layers (LFM2, LFM2-MoE, LFM3: ``y = C * conv(B * x)``) mix tokens only in
that causal convolution: the same halo exchange makes them exact. The Mamba-2 mixers of the hybrids
(Bamba, Granite-4 hybrid, Nemotron-H, Falcon-H1, Zamba2) have the GDN's shape: a causal conv (halo)
and the SSD scan, run like the delta rule (:func:`sp_mamba2_chunk_scan`); their fused conv + scan
training kernel is switched off under SP (:func:`unfused_under_sp`).

Everything else in these layers (projections, the padding mask, the gated norm) is per token. Outside
SP (one process, P = 1, :func:`ulysses_attn.transparent.unsharded`) the originals run unchanged,
cached generation included. Refused under SP, with an error: a cache (``use_cache=True``,
generation), packed rows (``cu_seq_lens`` or restarting ``position_ids``), value heads that P does
not divide.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import patches
from .comm import all_gather_seq, gather_heads_scatter_seq, gather_seq_scatter_heads
from .groups import SequenceParallel
from .layout import cached_layout, sequence_layout
from .models import decoder_layers
from .state import STATE, active_sp

__all__ = [
    "EXACT_LAYERS",
    "is_gated_delta_net",
    "is_linear_mixer",
    "defines_exact_layers",
    "is_exact",
    "make_exact",
    "halo_from_previous",
    "sp_causal_conv",
    "heads_to_sequence",
    "sequence_to_heads",
    "sp_gated_delta_rule",
    "sp_mamba2_chunk_scan",
    "unfused_under_sp",
]

CONV = "causal_conv1d_forward"
RULE = "chunk_gated_delta_rule"
SCAN = "mamba_chunk_scan_combined"
FUSED = "mamba_split_conv1d_scan_combined"
_GDN = (CONV, RULE)
_SHORT_CONV = (CONV,)
_MAMBA2 = (CONV, SCAN, FUSED)
# the layer classes whose forward was read and parity-tested (transformers 5.25), with the kernel
# functions every token mixing of theirs goes through: the gated delta-nets (a causal conv and the delta
# rule), LFM2's short convolutions (``y = C * conv(B * x)``, only the conv mixes tokens) and the
# Mamba-2 mixers of the hybrids (a causal conv and the SSD scan; their fused conv+scan training kernel
# is turned off under SP so that both go through the two seams)
EXACT_LAYERS: dict[str, tuple[str, ...]] = {
    "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet": _GDN,
    "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet": _GDN,
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet": _GDN,
    "transformers.models.lfm2.modeling_lfm2.Lfm2ShortConv": _SHORT_CONV,
    "transformers.models.lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv": _SHORT_CONV,
    "transformers.models.lfm3.modeling_lfm3.Lfm3ShortConv": _SHORT_CONV,
    "transformers.models.bamba.modeling_bamba.BambaMixer": _MAMBA2,
    "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer": _MAMBA2,
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer": _MAMBA2,
    "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer": _MAMBA2,
    "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer": _MAMBA2,
}
_RECORDS = {
    (_GDN, CONV): "transformers.GatedDeltaNet._kernel_funcs.causal_conv1d_forward",
    (_GDN, RULE): "transformers.GatedDeltaNet._kernel_funcs.chunk_gated_delta_rule",
    (_SHORT_CONV, CONV): "transformers.ShortConv._kernel_funcs.causal_conv1d_forward",
    (_MAMBA2, CONV): "transformers.Mamba2Mixer._kernel_funcs.causal_conv1d_forward",
    (_MAMBA2, SCAN): "transformers.Mamba2Mixer._kernel_funcs.mamba_chunk_scan_combined",
    (_MAMBA2, FUSED): "transformers.Mamba2Mixer._kernel_funcs.mamba_split_conv1d_scan_combined",
}
_CHECK = "torch.nn.Module.register_forward_pre_hook"
_CHECKED = "_ulysses_gdn_checked"
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "seq_idx")


def _kernels_of(module: torch.nn.Module) -> tuple[str, ...]:
    cls = type(module)
    return EXACT_LAYERS.get(f"{cls.__module__}.{cls.__qualname__}", ())


def defines_exact_layers(model_class: type) -> bool:
    """``model_class`` comes from a modeling file that defines a layer of :data:`EXACT_LAYERS` (the
    hybrid families: their attention goes through the AttentionInterface, though some leave
    ``_supports_attention_backend`` unset; the layer watch checks each decoder layer at the first
    SP forward)."""
    return any(path.rsplit(".", 1)[0] == model_class.__module__ for path in EXACT_LAYERS)


def is_gated_delta_net(module: torch.nn.Module) -> bool:
    """``module`` is one of the gated delta-net classes this module makes exact."""
    return _kernels_of(module) == _GDN


def is_linear_mixer(module: torch.nn.Module) -> bool:
    """``module`` is one of the layer classes this module makes exact (:data:`EXACT_LAYERS`): a gated
    delta-net or a short convolution."""
    return bool(_kernels_of(module))


def _kernel_funcs(module: torch.nn.Module) -> dict[str, torch.nn.Module] | None:
    """The layer's private kernel wrappers (set by ``kernels.use_kernelized_func``), if it has all it needs."""
    funcs = vars(module).get("_kernel_funcs")
    if not isinstance(funcs, dict) or not all(name in funcs for name in _kernels_of(module)):
        return None
    return funcs


def is_exact(module: torch.nn.Module) -> bool:
    """``module`` is a layer of :data:`EXACT_LAYERS` whose kernel functions are the sequence-parallel ones now."""
    names = _kernels_of(module)
    funcs = _kernel_funcs(module) if names else None
    return funcs is not None and all(patches.is_replaced(funcs[name], "forward") for name in names)


def make_exact(model: torch.nn.Module) -> int:
    """Put the sequence-parallel kernels into every layer of :data:`EXACT_LAYERS` in ``model`` (GDN:
    convolution and delta rule; short conv: convolution) and a per-forward check on the decoder layers
    holding them (idempotent; :func:`ulysses_attn.disable` undoes it). Returns the number of layers
    that are exact."""
    count = 0
    for layer in decoder_layers(model):
        mixers = [m for m in layer.modules() if is_linear_mixer(m) and _kernel_funcs(m) is not None]
        for mixer in mixers:
            _install_kernels(mixer)
        if mixers and not vars(layer).get(_CHECKED, False):
            _install_check(layer, mixers)
        count += len(mixers)
    return count


def _install_kernels(mixer: torch.nn.Module) -> None:
    names = _kernels_of(mixer)
    funcs = _kernel_funcs(mixer)
    assert funcs is not None
    makers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        CONV: functools.partial(sp_causal_conv, mixes_layer=names == _SHORT_CONV),
        RULE: sp_gated_delta_rule,
        SCAN: sp_mamba2_chunk_scan,
        FUSED: unfused_under_sp,
    }
    for name in names:
        wrapper = funcs[name]
        if not patches.is_replaced(wrapper, "forward"):
            # a bound method, as kernels expects of a kernel function's forward (it reads ``forward.__func__``)
            forward = _ignore_self(makers[name](wrapper.forward))
            patches.replace(_RECORDS[names, name], wrapper, "forward", types.MethodType(forward, wrapper))


def _ignore_self(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a method: kernels calls a kernel function's ``forward.__func__`` with the model's
    shared wrapper as ``self`` under torch.compile, so the replacement must not depend on it."""

    @functools.wraps(fn)
    def forward(_self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return forward


def _install_check(layer: torch.nn.Module, mixers: list[torch.nn.Module]) -> None:
    handle = layer.register_forward_pre_hook(functools.partial(_check_forward, mixers), with_kwargs=True)
    vars(layer)[_CHECKED] = True

    def undo() -> None:
        handle.remove()
        vars(layer).pop(_CHECKED, None)

    patches.track(_CHECK, layer, undo)


def _check_forward(mixers: list[torch.nn.Module], layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Before each SP forward of a decoder layer holding layers of :data:`EXACT_LAYERS`: their
    sequence-parallel kernels are still in place (``kernels.kernelize`` replaces the same functions),
    and the rows are not packed."""
    sp = active_sp()
    if sp is None or sp.size == 1:
        return
    for mixer in mixers:
        if not is_exact(mixer):
            raise NotImplementedError(
                f"ulysses_flash: the kernel functions of {type(mixer).__name__} were replaced after the package made "
                "them sequence-parallel (kernels.kernelize?), so the layer would mix only its rank's shard. Kernelize "
                "before the first sequence-parallel forward, or train without sequence parallelism (sp_size=1)."
            )
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    positions = kwargs.get("position_ids")
    if isinstance(hidden, torch.Tensor) and isinstance(positions, torch.Tensor):
        _refuse_restarting_positions(positions, hidden.shape[0], hidden.shape[1], sp, type(mixers[0]).__name__)


def _refuse_restarting_positions(positions: torch.Tensor, batch: int, seq_local: int, sp, layer: str) -> None:
    """Packed documents (``position_ids`` restarting inside a row) are refused: the convolution and
    delta-rule kernels here run each row as one sequence. The full sequence's layout is built once
    per forward (cached)."""
    rows = positions.expand(batch, -1)
    layout = cached_layout(
        (positions, None, None),
        ("gated_delta_net", batch, seq_local, sp.size),
        lambda: sequence_layout(sp, rows, None, None, None, batch, seq_local, (0, 0), True, positions.device),
    )
    if not layout.dense:
        raise _packed(layer)


def _packed(layer: str) -> NotImplementedError:
    return NotImplementedError(
        f"ulysses_flash: packed rows (position_ids restarting, or cu_seq_lens) in a model with {layer} layers are "
        "not supported under sequence parallelism yet: their convolution (and delta rule) would run across the "
        "document boundaries. Pad the documents into rows of their own, or train without sequence parallelism "
        "(sp_size=1)."
    )


def _refuse_cache(cache: Any, layer: str) -> None:
    if cache is not None:
        raise NotImplementedError(
            f"ulysses_flash: a forward with a cache (use_cache=True, generation) through {layer} under sequence "
            "parallelism is not supported: the cache would hold one shard's states. Pass use_cache=False, or "
            "generate under ulysses_attn.unsharded() / in one process."
        )


def _refuse_packed_kwargs(kwargs: dict[str, Any], layer: str) -> None:
    if any(kwargs.get(k) is not None for k in _PACKED_KWARGS):
        raise _packed(layer)


def _sp(sp: SequenceParallel | None) -> SequenceParallel | None:
    return None if sp is None or sp.size == 1 else sp


def halo_from_previous(x: torch.Tensor, width: int, group: Any) -> torch.Tensor:
    """The ``width`` positions of the full sequence just before this rank's shard of ``x [B, C, L]``,
    as ``[B, C, width]``: zeros before the first token (rank 0). Every rank's last ``min(L, width)``
    positions are all-gathered (``P * width * C`` elements per row, whatever S), so a shard shorter
    than the halo takes positions from several ranks back. Differentiable: the halo's gradient goes
    back to the ranks it came from."""
    if width == 0:
        return x[..., :0]
    rank = dist.get_rank(group)
    tail = x[..., -min(x.shape[-1], width) :]
    tails = all_gather_seq(tail.unsqueeze(0), group, dim=0)  # [P, B, C, t], rank order
    before = tails[:rank].permute(1, 2, 0, 3).flatten(2)  # [B, C, rank * t]: the positions before this shard
    before = before[..., -width:] if before.shape[-1] >= width else before
    return F.pad(before, (width - before.shape[-1], 0))


def sp_causal_conv(original: Callable[..., torch.Tensor], mixes_layer: bool = False) -> Callable[..., torch.Tensor]:
    """``causal_conv1d_forward(conv1d, hidden_states [B, C, L], cache, layer_idx, ...)`` that, under
    SP, convolves the shard with the ``k - 1`` positions before it (:func:`halo_from_previous`):
    the output equals the full sequence's convolution at this shard's positions. ``mixes_layer``:
    the conv is its layer's only token mixing (a short-conv layer), counted as the layer's mixing
    call for the guards' layer watch."""

    def causal_conv1d_forward(conv1d, hidden_states, cache=None, layer_idx=0, *args, **kwargs):
        sp = _sp(active_sp())
        if sp is None:
            return original(conv1d, hidden_states, cache, layer_idx, *args, **kwargs)
        _refuse_cache(cache, "a causal convolution layer")
        _refuse_packed_kwargs(kwargs, "causal convolution")
        if mixes_layer:
            STATE.attention_calls += 1
        width = conv1d.kernel_size[0] - 1
        halo = halo_from_previous(hidden_states, width, sp.group)
        out = original(
            conv1d, torch.cat([halo.to(hidden_states.dtype), hidden_states], dim=-1), None, layer_idx, *args, **kwargs
        )
        return out[..., width:]

    return causal_conv1d_forward


def heads_to_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[B, S/P, H, ...] -> [B, S, H/P, ...]`` (one all-to-all; its backward is the inverse)."""
    return gather_seq_scatter_heads(x.transpose(1, 2), group).transpose(1, 2)


def sequence_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[B, S, H/P, ...] -> [B, S/P, H, ...]``, the inverse of :func:`heads_to_sequence`."""
    return gather_heads_scatter_seq(x.transpose(1, 2), group).transpose(1, 2).contiguous()


def key_replication(value_heads: int, key_heads: int, sp_size: int, layer: str = "a gated delta-net layer") -> int:
    """How many times each q/k head is repeated so that the q/k heads split over ``sp_size`` ranks
    with every rank's value heads finding theirs locally (k head i serves the consecutive value heads
    ``[i * Hv/Hk, (i + 1) * Hv/Hk)``); raises when P does not divide the value heads. A Mamba-2
    mixer's B/C groups are its key heads, its heads the value heads."""
    if value_heads % sp_size or value_heads % key_heads:
        raise NotImplementedError(
            f"ulysses_flash: {layer} with {value_heads} value heads ({key_heads} key heads) cannot "
            f"split its heads over sequence-parallel size {sp_size}. Use an SP size that divides {value_heads}: "
            f"{[p for p in range(1, value_heads + 1) if value_heads % p == 0]}."
        )
    return math.lcm(key_heads, sp_size) // key_heads


def sp_gated_delta_rule(original: Callable[..., Any]) -> Callable[..., Any]:
    """``chunk_gated_delta_rule(q, k, v, g, beta, ...)`` on ``[B, S/P, heads, ...]`` that, under SP,
    runs ``original`` on the full sequence for ``Hv/P`` value heads (Ulysses) and returns this
    shard's output of every head; no final state (that needs a cache, refused)."""

    def chunk_gated_delta_rule(query, key, value, g, beta, *args, **kwargs):
        sp = _sp(active_sp())
        if sp is None:
            return original(query, key, value, g, beta, *args, **kwargs)
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            _refuse_cache(True, "a gated delta-net")
        _refuse_packed_kwargs(kwargs, "gated delta-net")
        if args:
            raise TypeError("chunk_gated_delta_rule under sequence parallelism takes its options as keywords")
        rep = key_replication(value.shape[2], key.shape[2], sp.size)
        if rep > 1:
            query, key = (t.repeat_interleave(rep, dim=2) for t in (query, key))
        q, k, v, gate, b = (heads_to_sequence(t, sp.group) for t in (query, key, value, g, beta))
        STATE.attention_calls += 1  # the layer mixed its tokens through the package (guards' layer watch)
        out, _ = original(q, k, v, g=gate, beta=b, **kwargs)
        return sequence_to_heads(out, sp.group), None

    return chunk_gated_delta_rule


def sp_mamba2_chunk_scan(original: Callable[..., Any]) -> Callable[..., Any]:
    """``mamba_chunk_scan_combined(x [B, S/P, H, D], dt [B, S/P, H], A [H], B, C [B, S/P, G, N],
    chunk_size, D=, dt_bias=, ...)`` that, under SP, runs ``original`` on the full sequence for this
    rank's ``H/P`` heads (Ulysses: x, dt, B, C through an all-to-all, the per-head ``A``, ``D`` and
    ``dt_bias`` sliced to those heads) and returns this shard's output of every head; no final state
    (that needs a cache, refused)."""

    def mamba_chunk_scan_combined(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs):
        sp = _sp(active_sp())
        if sp is None:
            return original(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs)
        if kwargs.get("initial_states") is not None or kwargs.get("return_final_states"):
            _refuse_cache(True, "a Mamba-2 mixer")
        _refuse_packed_kwargs(kwargs, "Mamba-2")
        if args:
            raise TypeError("mamba_chunk_scan_combined under sequence parallelism takes its options as keywords")
        heads = hidden_states.shape[2]
        rep = key_replication(heads, B.shape[2], sp.size, "a Mamba-2 mixer")
        if rep > 1:
            B, C = (t.repeat_interleave(rep, dim=2) for t in (B, C))
        x, step, b, c = (heads_to_sequence(t, sp.group) for t in (hidden_states, dt, B, C))
        local = heads // sp.size
        mine = slice(dist.get_rank(sp.group) * local, (dist.get_rank(sp.group) + 1) * local)
        per_head = {k: kwargs[k][mine] for k in ("D", "dt_bias") if kwargs.get(k) is not None}
        STATE.attention_calls += 1  # the layer mixed its tokens through the package (guards' layer watch)
        out = original(x, step, A[mine], b, c, chunk_size, **{**kwargs, **per_head})
        return sequence_to_heads(out, sp.group)

    return mamba_chunk_scan_combined


def unfused_under_sp(original: Callable[..., Any]) -> Callable[..., Any]:
    """``mamba_split_conv1d_scan_combined`` (the fused conv + scan training kernel, when one is
    installed) that returns ``None`` under SP: the mixer then takes its unfused path, whose conv and
    scan are the sequence-parallel ones (transformers' torch fallback always returns ``None``)."""

    def mamba_split_conv1d_scan_combined(*args, **kwargs):
        return None if _sp(active_sp()) is not None else original(*args, **kwargs)

    return mamba_split_conv1d_scan_combined
