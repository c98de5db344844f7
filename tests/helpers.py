"""Small inputs shared by the unit tests: SP handles without process groups, packed positions
and the batches the single-process parity tests feed tiny models."""

from __future__ import annotations

import torch
from tiny_models import VOCAB
from torch.utils._python_dispatch import TorchDispatchMode

from ulysses_attn import SequenceParallel


def fake_sp(size: int, rank: int, dp_size: int = 1, dp_rank: int = 0) -> SequenceParallel:
    """An SP handle without process groups: enough for code that only reads sizes and ranks
    (sharding, sampling), never for collectives."""
    return SequenceParallel(size=size, rank=rank, group=None, dp_size=dp_size, dp_rank=dp_rank, dp_group=None)


def packed_positions(*rows):
    """``position_ids [len(rows), S]`` of packed documents: each row a tuple of document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


def parity_batch(kind):
    """A model batch and the mask of the tokens whose logits are compared (padding excluded)."""
    g = torch.Generator().manual_seed(5)
    if kind == "plain":
        ids = torch.randint(1, VOCAB, (1, 19), generator=g)
        return {"input_ids": ids}, torch.ones(1, 19, dtype=torch.bool)
    if kind in ("right_padded", "left_padded"):
        ids = torch.randint(1, VOCAB, (3, 17), generator=g)
        mask = torch.zeros(3, 17, dtype=torch.long)
        for i, n in enumerate((17, 12, 5)):
            if kind == "right_padded":
                mask[i, :n] = 1
            else:
                mask[i, 17 - n :] = 1
        return {"input_ids": ids * mask, "attention_mask": mask}, mask.bool()
    if kind == "packed":
        ids = torch.randint(1, VOCAB, (1, 24), generator=g)
        return {"input_ids": ids, "position_ids": packed_positions((9, 4, 11))}, torch.ones(1, 24, dtype=torch.bool)
    raise ValueError(kind)


class CountAttentionKernels(TorchDispatchMode):
    """Counts the forward attention kernel calls (SDPA) made inside it, recomputes included."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))
