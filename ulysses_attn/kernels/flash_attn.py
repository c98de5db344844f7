"""FlashAttention: FA3 (``flash_attn_interface``), FA4 (``flash_attn.cute``, Hopper and newer; as the
registered op of :mod:`.flash4`) or FA2 (``flash_attn``), dense or varlen, with windows, softcap and
(FA2 only) dropout."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from ..layout import Layout
from ..state import warn_once
from . import device as _device
from . import flash4

__all__ = ["flash_attn", "flash_module", "flash_version"]

logger = logging.getLogger("ulysses_attn")

_LABELS = {"flash_attn_interface": "fa3", "flash_attn.cute": "fa4", "flash_attn": "fa2"}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.cache
def flash_module(capability: tuple[int, int]):
    """The FlashAttention module to use on a GPU of this compute capability: FA3, FA4, then FA2.

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


@functools.cache
def _module_on(device: torch.device):
    return flash_module(_device.capability(device)) if device.type == "cuda" else None


def flash_version(device: torch.device | str) -> str | None:
    """``"fa2"``, ``"fa3"``, ``"fa4"`` or ``None``: the FlashAttention the ``flash_attn`` kernel calls."""
    fa = _module_on(torch.device(device))
    return None if fa is None else _LABELS.get(fa.__name__, "fa2")


def _selective_checkpoint_keeping() -> bool:
    # selective_checkpoint's dispatch mode marks itself; kernels sit below it and do not import it
    return any(getattr(m, "keeps_attention_outputs", False) for m in _get_current_dispatch_mode_stack())


def _fa4_op_call(scale, causal, window_left_right, softcap, sinks=None):
    def call(q, k, v, cu_seqlens=None, max_seqlen=None):
        out, lse = flash4.flash_attn4(
            q, k, v, cu_seqlens, max_seqlen, scale, causal, *(window_left_right or (None, None)), float(softcap or 0.0)
        )
        if sinks is None:
            return out
        # a sink is one more logit s per head: softmax over [scores, s] = the output times Z / (Z + e^s)
        lse = lse.transpose(-1, -2) if cu_seqlens is None else lse.t()  # -> out's [..., S, H] / [tokens, H]
        return out * torch.sigmoid(lse - sinks.to(lse.dtype)).to(out.dtype)[..., None]

    return call


def _public_call(fa, scale, causal, window_left_right, softcap, dropout):
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
            out = fa.flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens_q=cu_seqlens,
                cu_seqlens_k=cu_seqlens,
                max_seqlen_q=max_seqlen,
                max_seqlen_k=max_seqlen,
                **kwargs,
            )
        return out[0] if isinstance(out, tuple) else out

    return call


def flash_attn(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap, sinks=None):
    fa = _module_on(q.device)  # dropout only reaches here with FA2, sinks with the FA4 op (Kernel.dropout / .sinks)
    window_left_right = (window - 1, 0 if causal else window - 1) if window else None
    if fa.__name__ == "flash_attn.cute" and flash4.supported():
        call = _fa4_op_call(scale, causal, window_left_right, softcap, sinks)  # selective checkpointing can keep it
    else:
        if fa.__name__ == "flash_attn.cute" and _selective_checkpoint_keeping():
            warn_once(
                "fa4_selective",
                "selective checkpointing cannot keep the outputs of this FlashAttention-4 "
                "version (its kernels run outside the PyTorch dispatcher): attention is recomputed as with "
                "full checkpointing. Use ULYSSES_ATTN_KERNEL=sdpa to keep them.",
            )
        call = _public_call(fa, scale, causal, window_left_right, softcap, dropout)
    if layout.dense:
        return call(q, k, v)
    out = call(*layout.flatten(q, k, v), layout.cu_seqlens, layout.max_seqlen)
    return layout.unflatten(out, q.shape[0], q.shape[1])
