"""The inner attention that runs on the full (gathered) sequence for this rank's heads.

Everything here takes and returns the flash layout ``q [B, S, H, D]``, ``k/v [B, S_k, H_kv, D]``.
Which tokens may attend to which is described by a :class:`Layout`, built once per forward:

* dense: every row is one causal sequence (right padding needs no mask under causal attention:
  real tokens never look at the pad tokens after them);
* segmented: rows hold several documents (packed, ``position_ids`` restarting) and/or tokens that
  must be ignored (left padding), flattened to ``cu_seqlens`` for varlen kernels.

Kernels: ``flash_attn`` (FA3 ``flash_attn_interface``, FA4 ``flash_attn.cute`` on Hopper and
newer, or FA2 ``flash_attn``; see :func:`flash_version`), PyTorch ``sdpa`` (flash / cuDNN backends;
no window or softcap; a segmented layout runs one call per segment), ``torch_varlen``
(``torch.nn.attention.varlen``, segmented without softcap) and ``reference`` (exact eager math,
every feature, O(S^2) memory: the fallback). The automatic choice takes the fastest that can run
the call (:func:`choose_kernel`); force one with ``ULYSSES_ATTN_KERNEL=<name>`` or :func:`set_kernel`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import flash4

logger = logging.getLogger("ulysses_attn")

__all__ = ["Layout", "layout_from_positions", "attend", "set_kernel", "available_kernels", "KERNELS"]


@dataclass
class Layout:
    """Which tokens of a ``[B, S]`` sequence form causal segments.

    ``segment_ids`` is ``None`` for the dense case; otherwise ``[B, S]`` with one id per document
    (unique over the batch) and ``-1`` for ignored tokens. ``cu_seqlens``/``max_seqlen``/``indices``
    are the same information flattened for varlen kernels (``indices`` = kept flat token indices).
    """

    segment_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    indices: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None  # [B, S_k] padding of a KV cache (decoding, one process only)

    @property
    def dense(self) -> bool:
        return self.segment_ids is None

    @functools.cached_property
    def seqlens(self) -> list[int]:
        """The segments' lengths (on the host: one device sync, once per layout)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


def layout_from_positions(
    position_ids: torch.Tensor | None, valid: torch.Tensor | None, causal: bool = True
) -> Layout:
    """Build the layout of a full sequence from its ``position_ids [B, S]`` (documents start where
    positions do not continue by +1) and an optional padding mask ``valid [B, S]``."""
    if valid is not None:
        valid = valid.bool()
        right_padded = not bool((valid[:, 1:] & ~valid[:, :-1]).any())
        if causal and right_padded:
            valid = None  # trailing pads cannot influence earlier tokens under causal attention
        elif bool(valid.all()):
            valid = None
    if position_ids is None:
        starts = None
    else:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if not bool(starts[:, 1:].any()):
            starts = None
    if starts is None and valid is None:
        return Layout()
    B, S = (valid if valid is not None else starts).shape
    device = (valid if valid is not None else starts).device
    if starts is None:
        starts = torch.zeros(B, S, dtype=torch.bool, device=device)
        starts[:, 0] = True
    seg = torch.cumsum(starts.flatten().long(), 0).view(B, S) - 1
    if valid is not None:
        seg = seg.masked_fill(~valid, -1)
    flat = seg.flatten()
    indices = torch.nonzero(flat >= 0).flatten()
    kept = flat[indices]
    bounds = torch.nonzero(kept[1:] != kept[:-1]).flatten() + 1
    n = kept.new_tensor([kept.numel()])
    cu = torch.cat([kept.new_zeros(1), bounds, n]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return Layout(seg, cu, max_seqlen, None if valid is None else indices)


# --------------------------------------------------------------------------------------------
# kernels: fn(q, k, v, layout, *, causal, scale, dropout, window, softcap) -> [B, S, H, D]
# --------------------------------------------------------------------------------------------


def _reference(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    """Exact eager attention with an explicit mask (fp32 softmax)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    qi = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)  # bottom-right aligned (KV cache)
    ki = torch.arange(Sk, device=q.device)[None, :]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = ki <= qi
    if window:
        allowed = allowed & (qi - ki < window)
    allowed = allowed[None, None].expand(B, 1, Sq, Sk)
    if layout.key_valid is not None:
        allowed = allowed & layout.key_valid[:, None, None, :].bool()
    if not layout.dense:
        seg = layout.segment_ids
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] >= 0)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * allowed.any(-1, keepdim=True)  # rows with no allowed key (ignored tokens) -> 0
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)


def _sdpa(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    if not layout.dense:  # one dense call per segment of the flattened kept tokens
        segments = zip(*(t.split(layout.seqlens) for t in _varlen_inputs(q, k, v, layout)))
        out = torch.cat([_sdpa(*(t[None] for t in seg), Layout(), causal=causal, scale=scale, dropout=dropout,
                               window=None, softcap=None)[0] for seg in segments])
        return _varlen_output(out, q.shape, layout)
    S = q.shape[1]
    padded = _sdpa_length(q.device, S) if causal else S
    if padded != S:  # tokens appended at the end cannot change earlier ones under causal attention
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - S)) for t in (q, k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)[:, :S]


def _sdpa_length(device: torch.device, S: int) -> int:
    """The length ``sdpa`` runs a causal sequence of ``S`` tokens at. cuDNN (what SDPA runs on Hopper
    and newer) builds a graph for every new length, ~0.1 s each (docs/benchmarks.md); rounded up to
    16 steps per doubling of the length (at most 1/16 more tokens), varying lengths share graphs."""
    if not isinstance(S, int) or not _sdpa_runs_cudnn(device):  # a SymInt under torch.compile's dynamic shapes
        return S
    step = max(64, 1 << max(S.bit_length() - 5, 0))
    return -(-S // step) * step


def _varlen_inputs(q, k, v, layout: Layout):
    B, S, H, D = q.shape
    q, k, v = (t.reshape(B * S, *t.shape[2:]) for t in (q, k, v))
    if layout.indices is not None:
        q, k, v = (t.index_select(0, layout.indices) for t in (q, k, v))
    return q, k, v


def _varlen_output(out, q_shape, layout: Layout):
    B, S, H, D = q_shape
    if layout.indices is not None:
        full = out.new_zeros(B * S, H, out.shape[-1])
        out = full.index_copy(0, layout.indices, out)
    return out.view(B, S, H, -1)


def _torch_varlen(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    from torch.nn.attention.varlen import varlen_attn

    if layout.dense:  # one segment per row
        B, S = q.shape[:2]
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        layout = Layout(cu_seqlens=cu, max_seqlen=S)
    qf, kf, vf = _varlen_inputs(q, k, v, layout)
    kwargs = {"scale": scale}
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (window - 1 if window else -1, 0 if causal else -1)
    elif window:
        raise NotImplementedError("this torch's varlen_attn has no window_size: sliding windows need torch >= 2.11")
    else:
        kwargs["is_causal"] = causal
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = kf.shape[1] != qf.shape[1]
    elif kf.shape[1] != qf.shape[1]:
        kf = kf.repeat_interleave(qf.shape[1] // kf.shape[1], dim=1)
        vf = vf.repeat_interleave(qf.shape[1] // vf.shape[1], dim=1)
    cu, m = layout.cu_seqlens, layout.max_seqlen
    out = varlen_attn(qf, kf, vf, cu, cu, m, m, **kwargs)
    return _varlen_output(out, q.shape, layout)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.lru_cache(maxsize=None)
def _flash_module(capability: tuple[int, int]):
    """The FlashAttention module to use on a GPU of this compute capability: FA3
    (``flash_attn_interface``), FA4 (``flash_attn.cute``, Hopper and newer), then FA2 (``flash_attn``).

    The packages are told apart by their distributions: ``flash-attn-4`` installs ``flash_attn/cute``
    without ``flash_attn/__init__.py``, so ``import flash_attn`` alone succeeds without FA2."""
    candidates = (
        ("flash_attn_interface", importlib.util.find_spec("flash_attn_interface") is not None),
        ("flash_attn.cute", capability[0] >= 9 and _installed("flash-attn-4")),
        ("flash_attn", _installed("flash-attn")),
    )
    for name, present in candidates:
        if present:
            try:
                return importlib.import_module(name)
            except ImportError as e:  # installed but broken (e.g. a missing CUDA library): say so, go on
                logger.warning("ulysses_flash: %s is installed but does not import (%s); not using it.", name, e)
    return None


@functools.lru_cache(maxsize=None)
def _flash_module_on(device: torch.device):
    return _flash_module(_capability(device)) if device.type == "cuda" else None


def flash_version(device: torch.device) -> str | None:
    """``"fa2"``, ``"fa3"``, ``"fa4"`` or ``None``: the FlashAttention the ``flash_attn`` kernel calls."""
    fa = _flash_module_on(torch.device(device))
    return None if fa is None else {"flash_attn_interface": "fa3", "flash_attn.cute": "fa4"}.get(fa.__name__, "fa2")


def _keeping_attention_outputs() -> bool:
    from .selective_checkpoint import keeping  # selective_checkpoint imports compat, which imports this module

    return keeping()


def _flash_attn(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    fa = _flash_module_on(q.device)  # dropout only reaches here with FA2 (Kernel.dropout)
    window_left_right = (window - 1, 0 if causal else window - 1) if window else None
    if fa.__name__ == "flash_attn.cute" and flash4.supported():
        # FA4 as a registered op, so that selective checkpointing can keep its output
        def call(q, k, v, cu_seqlens=None, max_seqlen=None):
            return flash4.flash_attn4(q, k, v, cu_seqlens, max_seqlen, scale, causal,
                                      *(window_left_right or (None, None)), float(softcap or 0.0))[0]
    else:
        if fa.__name__ == "flash_attn.cute" and "fa4_selective" not in _warned and _keeping_attention_outputs():
            _warned.add("fa4_selective")
            logger.warning("selective checkpointing cannot keep the outputs of this FlashAttention-4 version (its "
                           "kernels run outside the PyTorch dispatcher): attention is recomputed as with full "
                           "checkpointing. Use ULYSSES_ATTN_KERNEL=sdpa to keep them.")
        kwargs = {"softmax_scale": scale, "causal": causal}
        if window_left_right:
            kwargs["window_size"] = window_left_right
        if softcap:
            kwargs["softcap"] = softcap
        if dropout:
            kwargs["dropout_p"] = dropout

        def call(q, k, v, cu_seqlens=None, max_seqlen=None):
            if cu_seqlens is None:
                out = fa.flash_attn_func(q, k, v, **kwargs)
            else:  # by keyword: FA4 takes ``qv`` where FA2/FA3 take ``cu_seqlens_q``
                out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, **kwargs)
            return out[0] if isinstance(out, tuple) else out

    if layout.dense:
        return call(q, k, v)
    out = call(*_varlen_inputs(q, k, v, layout), layout.cu_seqlens, layout.max_seqlen)
    return _varlen_output(out, q.shape, layout)


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    available: Callable[[torch.device], bool]
    window: bool = True
    softcap: bool = True
    dropout: Callable[[torch.device], bool] = lambda device: True  # attention dropout on this device


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _sdpa_runs_cudnn(device: torch.device) -> bool:
    """Whether SDPA runs cuDNN's attention here: what it picks on Hopper and newer, unless disabled."""
    return device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled() and _capability(device)[0] >= 9


def _has_torch_varlen(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen") is not None


KERNELS: dict[str, Kernel] = {
    "flash_attn": Kernel(_flash_attn, lambda d: flash_version(d) is not None, dropout=lambda d: flash_version(d) == "fa2"),
    "sdpa": Kernel(_sdpa, lambda d: True, window=False, softcap=False),
    "torch_varlen": Kernel(_torch_varlen, _has_torch_varlen, softcap=False, dropout=lambda d: False),
    "reference": Kernel(_reference, lambda d: True),
}

_forced: str | None = None
_logged: set[tuple[str, str]] = set()
_warned: set[str] = set()


def set_kernel(name: str | None) -> None:
    """Force the inner kernel (one of :data:`KERNELS`), or ``None`` to choose automatically."""
    global _forced
    if name is not None and name not in KERNELS:
        raise ValueError(f"Unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}.")
    _forced = name


def available_kernels(device: torch.device | str = "cuda") -> list[str]:
    device = torch.device(device)
    return [name for name, k in KERNELS.items() if k.available(device)]


def _supports(k: Kernel, window, softcap, dropout, device: torch.device | None = None) -> bool:
    return (
        (not window or k.window)
        and (not softcap or k.softcap)
        and (not dropout or k.dropout(device))
    )


def choose_kernel(device: torch.device, layout: Layout, window=None, softcap=None, dropout=0.0) -> str:
    """The forced kernel (checked: it must be available and able to run the call), else the first of
    :func:`_auto_order` that is available here and supports the window, softcap and dropout."""
    forced = _forced or os.environ.get("ULYSSES_ATTN_KERNEL") or None
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"ULYSSES_ATTN_KERNEL={forced!r} is not one of {sorted(KERNELS)}.")
        k = KERNELS[forced]
        if not k.available(device):
            raise RuntimeError(f"Attention kernel {forced!r} is not available on {device}.")
        if not _supports(k, window, softcap, dropout, device):
            raise ValueError(
                f"Attention kernel {forced!r} cannot run this call ("
                f"sliding_window={window}, softcap={softcap}, dropout={dropout}); unset the forced kernel."
            )
        return forced
    for name in _auto_order(device, layout):
        k = KERNELS[name]
        if k.available(device) and _supports(k, window, softcap, dropout, device):
            return name
    return "reference"


def _auto_order(device: torch.device, layout: Layout) -> list[str]:
    """The fastest kernels first (H200 measurements in docs/benchmarks.md, "Kernel choice")."""
    if device.type != "cuda":
        return ["sdpa", "reference"]  # packed: sdpa per document, O(S) memory where the reference needs O(S^2)
    if not layout.dense:  # sdpa per document is the last resort: cuDNN builds a graph (~0.1 s) per new length
        return ["flash_attn", "torch_varlen", "sdpa", "reference"]
    if flash_version(device) == "fa2" and _sdpa_runs_cudnn(device):
        return ["sdpa", "flash_attn", "torch_varlen", "reference"]  # cuDNN ~1.7x the FA2 kernel on Hopper
    return ["flash_attn", "sdpa", "torch_varlen", "reference"]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout: float = 0.0,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over ``q [B, S, H, D]``, ``k/v [B, S_k, H_kv, D]`` with the chosen kernel."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    window = window if window and window < k.shape[1] else None  # a window as long as the sequence is no window
    if q.shape[1] != k.shape[1]:  # decoding with a KV cache: bottom-right causal alignment
        name = "reference"
    else:
        name = choose_kernel(q.device, layout, window, softcap, dropout)
    label = f"flash_attn/{flash_version(q.device)}" if name == "flash_attn" else name
    key = (label, f"{q.device.type} dense={layout.dense} window={bool(window)} softcap={bool(softcap)}")
    if key not in _logged:
        _logged.add(key)
        logger.info("ulysses_flash inner attention: %s (%s)", *key)
    fn = KERNELS[name].fn
    return fn(q, k, v, layout, causal=causal, scale=scale, dropout=dropout, window=window, softcap=softcap)
