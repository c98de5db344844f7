"""Data for sequence parallelism: every rank of an SP group gets the same sample, sharded.

* :class:`UlyssesSampler` shards a dataset over the data-parallel groups (not over ranks).
* :func:`shard_batch` turns a full batch into this rank's shard: pads the sequence to a multiple
  of P, adds global ``position_ids``, shifts labels on the full sequence (``shift_labels``) and
  slices every per-token tensor.
* :class:`UlyssesCollator` wraps any collator (``DataCollatorForSeq2Seq``,
  ``DataCollatorWithFlattening``, TRL's) and applies :func:`shard_batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from .groups import SequenceParallel, get_sequence_parallel
from .labels import IGNORE_INDEX, shift_labels
from .layout import layout_from_positions

__all__ = ["UlyssesSampler", "UlyssesCollator", "shard_batch", "IGNORE_INDEX"]

# Per-token keys that are not padded with 0 (anything else per-token is padded with 0).
_PAD_VALUES = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX}
# Keys that describe the whole (unsharded) packed batch; the attention derives them from positions.
_WHOLE_BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _sp(sp: SequenceParallel | None) -> SequenceParallel | None:
    return sp if sp is not None else get_sequence_parallel()


class UlyssesSampler(DistributedSampler):
    """A ``DistributedSampler`` over the data-parallel groups: the P ranks of an SP group get the
    same indices in the same order; different groups get disjoint shards. Call ``set_epoch`` each
    epoch; the order depends only on ``seed`` and the epoch (deterministic for resume).

    >>> sampler = UlyssesSampler(dataset, shuffle=True, seed=42)
    >>> loader = DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=UlyssesCollator(base))
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sp: SequenceParallel | None = None,
    ):
        sp = _sp(sp)
        dp_size, dp_rank = (sp.dp_size, sp.dp_rank) if sp is not None else (1, 0)
        super().__init__(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last)


def _sequence_length(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "labels"):
        if key in batch and torch.is_tensor(batch[key]):
            return batch[key].shape[1]
    raise ValueError(f"Cannot find the sequence length of the batch (keys: {sorted(batch)}); expected input_ids.")


def shard_batch(
    batch: Mapping[str, Any],
    sp: SequenceParallel | None = None,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """Return this rank's sequence shard of a full batch (unchanged structure otherwise).

    Per-token tensors are those with ``shape[:2] == (batch, seq)`` (``position_ids`` may be
    ``[1, seq]``). Packed rows (``position_ids`` restarting) also get ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` describing the documents of the full, unsharded sequence. With no SP group
    (or P = 1) the batch only gains ``position_ids`` and
    ``shift_labels``, so the same code runs with and without sequence parallelism.
    """
    sp = _sp(sp)
    size, rank = (sp.size, sp.rank) if sp is not None else (1, 0)
    out = {k: v for k, v in batch.items() if k not in _WHOLE_BATCH_KEYS}
    seq = _sequence_length(out)
    ref = next(out[k] for k in ("input_ids", "inputs_embeds", "labels") if torch.is_tensor(out.get(k)))
    bsz, device = ref.shape[0], ref.device

    if "position_ids" not in out:
        out["position_ids"] = torch.arange(seq, device=device).expand(bsz, seq).clone()
    elif out["position_ids"].shape[0] != bsz:
        out["position_ids"] = out["position_ids"].expand(bsz, seq).clone()
    if "labels" in out and "shift_labels" not in out:
        out["shift_labels"] = shift_labels(out["labels"])

    per_token = [k for k, v in out.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (bsz, seq)]
    pad = (-seq) % size
    if pad:
        for k in per_token:
            v = out[k]
            if k == "position_ids":  # continue the last document: trailing pads cannot affect real tokens
                extra = v[:, -1:] + torch.arange(1, pad + 1, device=v.device)
            else:
                value = pad_token_id if k == "input_ids" else _PAD_VALUES.get(k, 0)
                extra = torch.full((bsz, pad, *v.shape[2:]), value, dtype=v.dtype, device=v.device)
            out[k] = torch.cat([v, extra], dim=1)
    if size == 1:
        return out
    # Packed rows: describe the documents of the full sequence explicitly (HF's flash kwargs), so the
    # attention needs no gather of positions and no guess whether shard positions are global.
    packed = layout_from_positions(out["position_ids"], None)
    if not packed.dense:
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = packed.cu_seqlens
        out["max_length_q"] = out["max_length_k"] = packed.max_seqlen
    local = (seq + pad) // size
    for k in per_token:
        out[k] = out[k][:, rank * local : (rank + 1) * local].contiguous()
    return out


class UlyssesCollator:
    """Wrap a collator so that it returns this rank's shard of each batch (see :func:`shard_batch`).

    >>> collator = UlyssesCollator(DataCollatorForSeq2Seq(tokenizer, padding=True))
    """

    def __init__(
        self,
        base_collator: Callable[[list], Mapping[str, Any]] | None = None,
        pad_token_id: int | None = None,
        sp: SequenceParallel | None = None,
    ):
        if base_collator is None:
            from transformers import default_data_collator

            base_collator = default_data_collator
        self.base_collator = base_collator
        if pad_token_id is None:
            tokenizer = getattr(base_collator, "tokenizer", None) or getattr(base_collator, "processing_class", None)
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(base_collator, "pad_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.sp = sp

    def __call__(self, features: list) -> dict[str, Any]:
        return shard_batch(self.base_collator(features), self.sp, self.pad_token_id)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn/forkserver get a pickled copy. They shard, never
        # communicate, so the copy carries sizes and ranks without the (unpicklable) process groups;
        # sp=None is resolved now, since a fresh worker process has no process-wide handle and would
        # otherwise hand every rank the whole sequence.
        state = dict(self.__dict__)
        sp = _sp(self.sp)
        state["sp"] = None if sp is None else dataclasses.replace(sp, group=None, dp_group=None)
        return state

    def __getattr__(self, name):  # behave like the wrapped collator (tokenizer, padding, ...)
        if name == "base_collator":
            raise AttributeError(name)
        return getattr(self.base_collator, name)
