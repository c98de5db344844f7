"""The ``"ulysses_flash"`` attention function and its mask function.

Per layer, with an SP group of size P (shapes in the HF layout ``[B, heads, seq, D]``)::

    q [B, H, S/P, D]  --all-to-all-->  [B, H/P, S, D]  \\
    k [B, Hkv, S/P, D] (repeat if Hkv % P) --> [B, Hkv'/P, S, D]  >-- attention over the full S
    v  "                                                   "    /
    out [B, H/P, S, D] --all-to-all--> [B, H, S/P, D] -> returned as [B, S/P, H, D]

When P does not divide H, zero query heads pad each KV head's group (or, where that costs more,
all heads after expanding k/v to one head per query head) to a multiple of P and are cut off the
output (:func:`padded_heads`).

Which tokens attend to which (documents of a packed row, padding) is computed once per forward
from the *global* ``position_ids`` (gathered over the group) or from ``cu_seq_lens_q`` when the
caller gives them, and cached for the remaining layers. Without an SP group (or P = 1) the same
code runs without communication, as a plain attention backend.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .comm import gather_heads_scatter_seq, gather_seq_scatter_heads
from .kernels import attend
from .layout import cached_layout, local_layout, sequence_layout
from .state import STATE, active_sp, warn_once

__all__ = ["ulysses_flash_attention", "ulysses_flash_mask", "kv_replication", "check_heads", "padded_heads"]


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    """Raise a helpful error for head counts no SP size can work with (GQA needs ``num_heads`` to
    be a multiple of ``num_kv_heads``). ``num_heads`` not divisible by the SP size is handled by
    :func:`padded_heads`."""
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads}).")


def padded_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> tuple[int, bool]:
    """Query heads after zero padding so that ``sp_size`` divides them, and whether the padding
    goes into each KV head's group (``True``) or after all heads (``False``).

    Group padding (e.g. Qwen2.5-7B, 28 heads / 4 KV at P = 8: 7 -> 8 query heads per KV head, 32 in
    all) keeps GQA: the KV heads are replicated as for any P (:func:`kv_replication`). When that
    would need more heads than padding all of them to a multiple of P, the KV heads are instead
    expanded to one per query head and all three are padded at the end. Either way the padded query
    heads attend to zeros or to real keys, their outputs are dropped and they get no gradient: the
    result is exact; the cost is ``padded / H`` of the attention compute and larger KV all-to-alls.
    """
    if num_heads % sp_size == 0:
        return num_heads, True
    group = num_heads // num_kv_heads
    step = sp_size // math.gcd(num_kv_heads, sp_size)  # group sizes that make Hkv * group divisible by P
    grouped = num_kv_heads * -(-group // step) * step
    uniform = -(-num_heads // sp_size) * sp_size
    return (grouped, True) if grouped <= uniform else (uniform, False)


def _warn_head_padding(num_heads: int, num_kv_heads: int, sp_size: int, padded: int, grouped: bool) -> None:
    kv_sent = num_kv_heads * kv_replication(padded, num_kv_heads, sp_size) if grouped else padded
    even = [p for p in range(1, num_heads + 1) if num_heads % p == 0]
    warn_once(
        ("head_padding", num_heads, num_kv_heads, sp_size),
        "ulysses_flash: %d query heads do not split over SP size %d; padding to %d heads (%.0f%% more "
        "attention compute) and sending %d KV heads through the all-to-all. SP sizes that need no "
        "padding: %s.",
        num_heads,
        sp_size,
        padded,
        100 * (padded - num_heads) / num_heads,
        kv_sent,
        even,
    )


def _pad_heads(query, key, value, padded: int, grouped: bool):
    """Zero query heads up to ``padded`` (see :func:`padded_heads`): at the end of each KV head's
    group, or -- after expanding k/v to one head per query head -- at the end of all three."""
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    if grouped:
        query = query.reshape(batch, kv_heads, heads // kv_heads, seq, dim)
        query = F.pad(query, (0, 0, 0, 0, 0, padded // kv_heads - heads // kv_heads))
        return query.reshape(batch, padded, seq, dim), key, value
    group = heads // kv_heads
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return tuple(F.pad(t, (0, 0, 0, 0, 0, padded - heads)) for t in (query, key, value))


def _unpad_heads(out: torch.Tensor, heads: int, kv_heads: int, grouped: bool) -> torch.Tensor:
    """Inverse of :func:`_pad_heads` on the attention output ``[B, padded, S, D]``."""
    if not grouped:
        return out[:, :heads]
    batch, padded, seq, dim = out.shape
    out = out.reshape(batch, kv_heads, padded // kv_heads, seq, dim)[:, :, : heads // kv_heads]
    return out.reshape(batch, heads, seq, dim)


def kv_replication(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times each KV head is repeated so that KV heads split evenly over ``sp_size`` ranks
    while every rank's query heads still find their KV heads locally (GQA/MQA with Hkv < P)."""
    return math.lcm(num_kv_heads, sp_size) // num_kv_heads


def _rows(x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    return None if x is None else x.expand(batch, -1)


def ulysses_flash_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: q ``[B, H, S_local, D]``, k/v ``[B, Hkv, S_local, D]``
    -> ``([B, S_local, H, D], None)``."""
    STATE.attention_calls += 1
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"ulysses_flash expects a 2D padding mask (or None), got a {attention_mask.dim()}D mask: custom 4D "
            "masks are not supported; pass packed documents as position_ids or cu_seq_lens_q/k instead."
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if cu_seq_lens_k is not None and cu_seq_lens_q is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise NotImplementedError("ulysses_flash supports self-attention only (cu_seq_lens_k != cu_seq_lens_q).")
    batch, heads, seq_local, _ = query.shape
    kv_heads = key.shape[1]
    sp = active_sp()
    opts: dict[str, Any] = dict(causal=causal, scale=scaling, dropout=dropout, window=sliding_window, softcap=softcap)
    if s_aux is not None:  # attention sinks: one more logit per query head (gpt-oss); this rank's heads below
        opts["sinks"] = s_aux
    tensors = (position_ids, attention_mask, cu_seq_lens_q)  # the objects every layer receives: cache key
    position_ids = _rows(position_ids, batch)
    meta = (batch, seq_local, key.shape[2], causal, None if sp is None else sp.size)

    if sp is None or sp.size == 1:
        layout = cached_layout(
            tensors,
            meta,
            lambda: local_layout(
                position_ids, attention_mask, cu_seq_lens_q, max_length_q, seq_local, key.shape[2], causal
            ),
        )
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, **opts)
        return out, None

    if key.shape[2] != seq_local:
        raise NotImplementedError(
            "ulysses_flash with a sequence-parallel group cannot decode with a KV cache (key length "
            f"{key.shape[2]} != query length {seq_local}). Generate with one process / P = 1, or pass use_cache=False."
        )
    check_heads(heads, kv_heads)
    if not causal:
        raise NotImplementedError(
            f"ulysses_flash with a sequence-parallel group supports causal (decoder) attention; "
            f"{type(module).__name__} attends bidirectionally (is_causal=False). For a BERT-style model used as a "
            "causal LM set config.is_decoder=True, or train without sequence parallelism (sp_size=1)."
        )
    layout = cached_layout(
        tensors,
        meta,
        lambda: sequence_layout(
            sp,
            position_ids,
            attention_mask,
            cu_seq_lens_q,
            max_length_q,
            batch,
            seq_local,
            (heads, kv_heads),
            causal,
            query.device,
        ),
    )
    padded, grouped = padded_heads(heads, kv_heads, sp.size)
    if s_aux is not None:
        if padded != heads:
            raise NotImplementedError(
                f"ulysses_flash: attention sinks with {heads} query heads, which sequence parallelism of size "
                f"{sp.size} does not divide, are not supported (the heads would be padded). Use an SP size that "
                f"divides {heads}."
            )
        opts["sinks"] = s_aux.reshape(sp.size, -1)[sp.rank]  # the heads this rank attends for (all-to-all order)
    if padded != heads:
        _warn_head_padding(heads, kv_heads, sp.size, padded, grouped)
        query, key, value = _pad_heads(query, key, value, padded, grouped)
    rep = kv_replication(padded, key.shape[1], sp.size)
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    q = gather_seq_scatter_heads(query, sp.group)
    k = gather_seq_scatter_heads(key, sp.group)
    v = gather_seq_scatter_heads(value, sp.group)
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, **opts)  # [B, S, H/P, D]
    out = gather_heads_scatter_seq(out.transpose(1, 2), sp.group)  # [B, H, S/P, D]
    if padded != heads:
        out = _unpad_heads(out, heads, kv_heads, grouped)
    return out.transpose(1, 2).contiguous(), None  # as sdpa_attention_forward: models may .view() it


def ulysses_flash_mask(
    batch_size: int,
    q_length: int | None = None,  # transformers < 5.3 passes cache_position (in kwargs) instead
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``"ulysses_flash"``: the 2D padding mask as given (or ``None``).

    Unlike the stock flash mask it never drops an all-ones mask, so that every rank of an SP group
    takes the same path (a shard without padding must not skip a collective its peers run).
    """
    if attention_mask is None or kv_length is None:
        return attention_mask
    return attention_mask[:, -kv_length:]
