"""PyTorch SDPA (its flash / cuDNN / efficient / CPU backends): dense rows in one call, a segmented
layout one call per segment (no window or softcap)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout
from . import device as _device

__all__ = ["sdpa", "sdpa_length"]


def sdpa(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap):
    if not layout.dense:  # one dense call per segment of the flattened kept tokens
        segments = zip(*(t.split(layout.seqlens) for t in layout.flatten(q, k, v)))
        out = torch.cat(
            [
                sdpa(
                    seg[0][None],
                    seg[1][None],
                    seg[2][None],
                    Layout(),
                    causal=causal,
                    scale=scale,
                    dropout=dropout,
                    window=None,
                    softcap=None,
                )[0]
                for seg in segments
            ]
        )
        return layout.unflatten(out, q.shape[0], q.shape[1])
    S = q.shape[1]
    padded = sdpa_length(q.device, S) if causal else S
    if padded != S:  # tokens appended at the end cannot change earlier ones under causal attention
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - S)) for t in (q, k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2)[:, :S]


def sdpa_length(device: torch.device, S: int) -> int:
    """The length ``sdpa`` runs a causal sequence of ``S`` tokens at. cuDNN (what SDPA runs on Hopper
    and newer) builds a graph for every new length (docs/benchmarks.md); rounded up to 16 steps per
    doubling of the length (at most 1/16 more tokens), varying lengths share graphs."""
    if not isinstance(S, int) or not _device.sdpa_runs_cudnn(device):  # a SymInt under dynamic shapes
        return S
    step = max(64, 1 << max(S.bit_length() - 5, 0))
    return -(-S // step) * step
