"""``torch.nn.attention.varlen.varlen_attn``: dense and segmented layouts in one call (no softcap)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..layout import Layout

__all__ = ["torch_varlen"]


def torch_varlen(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    from torch.nn.attention.varlen import varlen_attn

    B, S = q.shape[:2]
    if layout.dense:  # one segment per row
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        layout = Layout(cu_seqlens=cu, max_seqlen=S)
    qf, kf, vf = layout.flatten(q, k, v)
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
    cu_seqlens: Any = layout.cu_seqlens
    m = layout.max_seqlen
    out: Any = varlen_attn(qf, kf, vf, cu_seqlens, cu_seqlens, m, m, **kwargs)
    return layout.unflatten(out, B, S)
