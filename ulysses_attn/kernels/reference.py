"""Exact eager attention with an explicit mask (fp32 softmax): every feature, O(S^2) memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout

__all__ = ["reference"]


def reference(q, k, v, layout: Layout, *, causal, scale, dropout, window, softcap, sinks=None):
    """``sinks`` ``[H]``: one more logit per head in every row's softmax, without a value."""
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
        assert seg is not None  # a segmented layout has them
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] >= 0)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).reshape(1, H, 1, 1).expand(B, H, Sq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    probs = probs * allowed.any(-1, keepdim=True)  # rows with no allowed key (ignored tokens) -> 0
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
