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

import logging
import math
import weakref

import torch
import torch.nn.functional as F

from .comm import all_gather_seq, gather_heads_scatter_seq, gather_seq_scatter_heads
from .groups import get_sequence_parallel
from .kernels import Layout, attend, layout_from_positions

__all__ = ["ulysses_flash_attention", "ulysses_flash_mask", "kv_replication", "check_heads", "padded_heads"]

logger = logging.getLogger(__name__)


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


_warned_padding: set[tuple[int, int, int]] = set()


def _warn_head_padding(num_heads: int, num_kv_heads: int, sp_size: int, padded: int, grouped: bool) -> None:
    if (num_heads, num_kv_heads, sp_size) in _warned_padding:
        return
    _warned_padding.add((num_heads, num_kv_heads, sp_size))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # the same on every rank: said once
    kv_sent = num_kv_heads * kv_replication(padded, num_kv_heads, sp_size) if grouped else padded
    even = [p for p in range(1, num_heads + 1) if num_heads % p == 0]
    logger.warning(
        "ulysses_flash: %d query heads do not split over SP size %d; padding to %d heads (%.0f%% more "
        "attention compute) and sending %d KV heads through the all-to-all. SP sizes that need no "
        "padding: %s.", num_heads, sp_size, padded, 100 * (padded - num_heads) / num_heads, kv_sent, even)


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


class _LayoutCache:
    """Holds the layouts of the current forward: the model passes the same ``position_ids`` /
    ``attention_mask`` tensors to every layer, so their identity keys the cache (recomputed
    layers under gradient checkpointing hit it too). Models with sliding-window layers (Gemma 2,
    Qwen2, Mistral) pass two masks in turn, hence a few entries; a miss costs collectives under
    SP, and every rank of a group makes the same calls, so they hit and miss alike."""

    SIZE = 4

    def __init__(self):
        self.entries: list[tuple[tuple, tuple, Layout]] = []  # (weakrefs, meta, layout), newest last

    @staticmethod
    def _refs(tensors):
        return tuple(None if t is None else weakref.ref(t) for t in tensors)

    @staticmethod
    def _same(refs, tensors) -> bool:
        return len(refs) == len(tensors) and all(
            (ref is None) == (t is None) and (ref is None or ref() is t) for ref, t in zip(refs, tensors)
        )

    def get(self, tensors, meta):
        for refs, entry_meta, layout in reversed(self.entries):
            if entry_meta == meta and self._same(refs, tensors):
                return layout
        return None

    def put(self, tensors, meta, layout):
        self.entries = [*self.entries[-(self.SIZE - 1):], (self._refs(tensors), meta, layout)]
        return layout


_cache = _LayoutCache()


def _rows(x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    return None if x is None else x.expand(batch, -1)


def _layout_from_cu(cu: torch.Tensor, max_len, batch: int, seq: int) -> Layout:
    cu = cu.to(torch.int32)
    if int(cu[-1]) != batch * seq:
        raise ValueError(
            f"cu_seq_lens_q ends at {int(cu[-1])} but the (gathered) batch holds {batch}x{seq} tokens: "
            "under sequence parallelism cu_seq_lens must describe the full, unsharded sequence."
        )
    lengths = (cu[1:] - cu[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths).view(batch, seq)
    max_len = int(max_len) if max_len is not None else int(lengths.max())
    return Layout(seg, cu, max_len, None)


def _local_layout(position_ids, attention_mask, cu, max_len, q_len, k_len, causal) -> Layout:
    if q_len != k_len:  # decoding with a KV cache
        if attention_mask is not None and not bool(attention_mask.all()):
            return Layout(key_valid=attention_mask[:, -k_len:])
        return Layout()
    if cu is not None:
        return _layout_from_cu(cu, max_len, max(int(cu[-1]) // q_len, 1), q_len)
    return layout_from_positions(position_ids, attention_mask, causal)


def _check_agreement(meta: torch.Tensor, sp, names: tuple[str, ...]) -> None:
    everyone = all_gather_seq(meta[None], sp.group, dim=0)  # [P, n], no gradient
    if bool((everyone != everyone[0]).any()):
        rows = "; ".join(
            f"SP rank {r}: " + ", ".join(f"{n}={int(v)}" for n, v in zip(names, everyone[r].tolist()))
            for r in range(everyone.shape[0])
        )
        raise ValueError(
            "The ranks of a sequence-parallel group disagree on the attention inputs "
            f"({rows}). Every rank of a group must get the same sample, padded to a multiple of the SP "
            "size and sharded along the sequence: use ulysses_attn.UlyssesSampler / UlyssesCollator "
            "(or ulysses_attn.shard_batch)."
        )


def _global_layout(sp, position_ids, attention_mask, cu, max_len, batch, seq_local, heads, causal) -> Layout:
    names = ("batch", "local_seq", "heads", "kv_heads", "has_position_ids", "has_attention_mask", "has_cu_seq_lens")
    meta = torch.tensor(
        [batch, seq_local, *heads, position_ids is not None, attention_mask is not None, cu is not None],
        dtype=torch.int64,
        device=_device(position_ids, attention_mask, cu),
    )
    _check_agreement(meta, sp, names)
    seq = seq_local * sp.size
    pos = all_gather_seq(position_ids, sp.group) if position_ids is not None else None
    layout = _layout_from_cu(cu, max_len, batch, seq) if cu is not None else None
    if pos is not None and seq_local > 1 and _positions_look_local(pos, sp.size, seq_local, layout):
        raise ValueError(
            "position_ids restart at 0 on every sequence-parallel shard: the model got shard-local "
            "positions, so RoPE and the causal structure would be wrong. Pass the global position_ids "
            "of each token (ulysses_attn.UlyssesCollator / shard_batch add them). If these are packed "
            "documents that each fill exactly one shard, also pass cu_seq_lens_q/cu_seq_lens_k (shard_batch "
            "does), which tell them apart."
        )
    if layout is not None:
        return layout
    mask = all_gather_seq(attention_mask, sp.group) if attention_mask is not None else None
    return layout_from_positions(pos, mask, causal)


def _positions_look_local(pos: torch.Tensor, sp_size: int, seq_local: int, layout: Layout | None) -> bool:
    """Every shard holds positions ``0..S/P-1`` (what a model makes up when it gets no position_ids),
    unless the given documents really start at every shard boundary."""
    batch = pos.shape[0]
    local = torch.arange(seq_local, device=pos.device, dtype=pos.dtype)
    if not bool((pos.view(batch, sp_size, seq_local) == local).all()):
        return False
    if layout is None:
        return True
    seg = layout.segment_ids.view(batch, sp_size, seq_local)
    starts_documents = seg[:, 1:, 0] != seg[:, :-1, -1]
    return not bool(starts_documents.all())


def _device(*tensors):
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


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
    if s_aux is not None:
        raise NotImplementedError("ulysses_flash does not support attention sinks (s_aux) yet.")
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
    sp = get_sequence_parallel()
    opts = dict(causal=causal, scale=scaling, dropout=dropout, window=sliding_window, softcap=softcap)
    tensors = (position_ids, attention_mask, cu_seq_lens_q)  # the objects every layer receives: cache key
    position_ids = _rows(position_ids, batch)
    meta = (batch, seq_local, key.shape[2], causal, None if sp is None else sp.size)

    if sp is None or sp.size == 1:
        layout = _cache.get(tensors, meta) or _cache.put(
            tensors,
            meta,
            _local_layout(position_ids, attention_mask, cu_seq_lens_q, max_length_q, seq_local, key.shape[2], causal),
        )
        out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, **opts)
        return out, None

    if key.shape[2] != seq_local:
        raise NotImplementedError(
            "ulysses_flash with a sequence-parallel group cannot decode with a KV cache (key length "
            f"{key.shape[2]} != query length {seq_local}). Generate with one process / P = 1, or pass use_cache=False."
        )
    check_heads(heads, kv_heads)
    layout = _cache.get(tensors, meta) or _cache.put(
        tensors,
        meta,
        _global_layout(
            sp, position_ids, attention_mask, cu_seq_lens_q, max_length_q, batch, seq_local, (heads, kv_heads), causal
        ),
    )
    padded, grouped = padded_heads(heads, kv_heads, sp.size)
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
    return out.transpose(1, 2), None


def ulysses_flash_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
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
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]
