"""The one label shift: the target of token ``t`` is token ``t + 1`` of the full sequence.

Under SP the shift must happen before the sequence is sharded (a shard's last token's target is
the next shard's first token), so the collator, the losses and TRL's fused forward all call
:func:`shift_labels` on full sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "shift_labels"]

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[:, 1:]`` with ``ignore_index`` appended: same shape as ``labels``, the last token
    has no target.

    >>> shift_labels(torch.tensor([[1, 2, 3]]))
    tensor([[   2,    3, -100]])
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)
