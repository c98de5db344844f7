"""Which tokens attend to which: the shard layout, its cache and the cross-rank agreement check.

A :class:`Layout` describes a full ``[B, S]`` sequence (after the all-to-all every rank holds all
S tokens of its heads):

* dense: every row is one causal sequence (right padding needs no mask under causal attention:
  real tokens never look at the pad tokens after them);
* segmented: rows hold several documents (packed, ``position_ids`` restarting) and/or tokens that
  must be ignored (left padding), flattened to ``cu_seqlens`` for varlen kernels.

It is built once per forward from the *global* ``position_ids`` (gathered over the SP group) or
from ``cu_seq_lens_q`` when the caller gives them (:func:`sequence_layout`), after checking that
every rank of the group got the same kind of input (:func:`check_agreement`), and cached for the
remaining layers (:class:`LayoutCache`).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from .comm import all_gather_seq
from .groups import SequenceParallel
from .state import STATE

__all__ = [
    "Layout",
    "LayoutCache",
    "layout_from_positions",
    "layout_from_cu_seqlens",
    "sequence_layout",
    "check_agreement",
    "cached_layout",
]


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
        assert self.cu_seqlens is not None
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def flatten(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, S, H, D]`` tensors as the ``[kept tokens, H, D]`` rows a varlen kernel takes."""
        out = []
        for t in tensors:
            t = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
            out.append(t if self.indices is None else t.index_select(0, self.indices))
        return tuple(out)

    def unflatten(self, out: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """Inverse of :meth:`flatten` for a kernel's output (ignored tokens get zeros)."""
        if self.indices is not None:
            full = out.new_zeros(batch * seq, *out.shape[1:])
            out = full.index_copy(0, self.indices, out)
        return out.view(batch, seq, *out.shape[1:])


def layout_from_positions(position_ids: torch.Tensor | None, valid: torch.Tensor | None, causal: bool = True) -> Layout:
    """Build the layout of a full sequence from its ``position_ids [B, S]`` (documents start where
    positions do not continue by +1) and an optional padding mask ``valid [B, S]``."""
    if valid is not None:
        valid = valid.bool()
        right_padded = not bool((valid[:, 1:] & ~valid[:, :-1]).any())
        if (causal and right_padded) or bool(valid.all()):
            valid = None  # trailing pads cannot influence earlier tokens under causal attention
    starts = None
    if position_ids is not None:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if not bool(starts[:, 1:].any()):
            starts = None
    if starts is None and valid is None:
        return Layout()
    ref = valid if valid is not None else starts
    assert ref is not None
    B, S = ref.shape
    if starts is None:
        starts = torch.zeros(B, S, dtype=torch.bool, device=ref.device)
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


def layout_from_cu_seqlens(cu: torch.Tensor, max_len: int | None, batch: int, seq: int) -> Layout:
    """The layout of ``batch x seq`` tokens that HF's flash kwargs ``cu_seq_lens_q`` describe."""
    cu = cu.to(torch.int32)
    if int(cu[-1]) != batch * seq:
        raise ValueError(
            f"cu_seq_lens_q ends at {int(cu[-1])} but the (gathered) batch holds {batch}x{seq} tokens: "
            "under sequence parallelism cu_seq_lens must describe the full, unsharded sequence."
        )
    lengths = (cu[1:] - cu[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths).view(batch, seq)
    return Layout(seg, cu, int(max_len) if max_len is not None else int(lengths.max()), None)


def local_layout(position_ids, attention_mask, cu, max_len, q_len: int, k_len: int, causal: bool) -> Layout:
    """The layout without an SP group (P = 1), decoding with a KV cache included."""
    if q_len != k_len:
        if attention_mask is not None and not bool(attention_mask.all()):
            return Layout(key_valid=attention_mask[:, -k_len:])
        return Layout()
    if cu is not None:
        return layout_from_cu_seqlens(cu, max_len, max(int(cu[-1]) // q_len, 1), q_len)
    return layout_from_positions(position_ids, attention_mask, causal)


_AGREEMENT_FIELDS = (
    "batch",
    "local_seq",
    "heads",
    "kv_heads",
    "has_position_ids",
    "has_attention_mask",
    "has_cu_seq_lens",
)


def check_agreement(
    values: list[int], sp: SequenceParallel, device: torch.device, names: tuple[str, ...] = _AGREEMENT_FIELDS
) -> None:
    """Raise on every rank, naming each rank's values, unless all ranks of the SP group passed the
    same ``values`` (one all-gather of ``len(values)`` integers on ``device``)."""
    meta = torch.tensor(values, dtype=torch.int64, device=device)
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


def sequence_layout(
    sp: SequenceParallel,
    position_ids,
    attention_mask,
    cu,
    max_len,
    batch: int,
    seq_local: int,
    heads: tuple[int, int],
    causal: bool,
    device: torch.device,
) -> Layout:
    """The layout of the full sequence whose shards the SP group holds (collective over the group)."""
    flags = [position_ids is not None, attention_mask is not None, cu is not None]
    check_agreement([batch, seq_local, *heads, *flags], sp, device)
    seq = seq_local * sp.size
    pos = all_gather_seq(position_ids, sp.group) if position_ids is not None else None
    layout = layout_from_cu_seqlens(cu, max_len, batch, seq) if cu is not None else None
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
    assert layout.segment_ids is not None
    seg = layout.segment_ids.view(batch, sp_size, seq_local)
    starts_documents = seg[:, 1:, 0] != seg[:, :-1, -1]
    return not bool(starts_documents.all())


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


class LayoutCache:
    """The layouts of the current forward. The model passes the same ``position_ids`` /
    ``attention_mask`` tensors to every layer, so their identity -- with their version counter, so
    that an in-place edit is a miss -- keys the cache (recomputed layers under gradient
    checkpointing hit it too). Models with sliding-window layers (Gemma 2, Qwen2, Mistral) pass two
    masks in turn, hence a few entries; a miss costs collectives under SP, and every rank of a group
    makes the same calls, so they hit and miss alike."""

    SIZE = 4

    def __init__(self) -> None:
        self.entries: list[tuple[tuple, tuple, Layout]] = []  # (keys, meta, layout), newest last

    @staticmethod
    def _keys(tensors) -> tuple:
        return tuple(None if t is None else (weakref.ref(t), _version(t)) for t in tensors)

    @staticmethod
    def _same(keys, tensors) -> bool:
        return len(keys) == len(tensors) and all(
            (key is None) == (t is None) and (key is None or (key[0]() is t and key[1] == _version(t)))
            for key, t in zip(keys, tensors)
        )

    def get(self, tensors, meta) -> Layout | None:
        for keys, entry_meta, layout in reversed(self.entries):
            if entry_meta == meta and self._same(keys, tensors):
                return layout
        return None

    def put(self, tensors, meta, layout: Layout) -> Layout:
        self.entries = [*self.entries[-(self.SIZE - 1) :], (self._keys(tensors), meta, layout)]
        return layout


def cached_layout(tensors: tuple, meta: tuple, build) -> Layout:
    """The cached layout for these input tensors and shapes, else ``build()`` (and cache it)."""
    if STATE.layouts is None:
        STATE.layouts = LayoutCache()
    cache: LayoutCache = STATE.layouts
    return cache.get(tensors, meta) or cache.put(tensors, meta, build())
