"""TRL trainers (SFT, DPO) with Ulysses.

TRL >= 1.16 scores sequences through a fused LM head: ``model(..., labels=..., fused_lm_head=True)``
returns per-token log-probabilities (``[B, S-1]``) without materialising logits, and every
per-sequence quantity of its losses and metrics (DPO log-prob sums, completion lengths, ``ld_alpha``
splits, IPO normalisation, SFT token counts, entropy...) is computed from those per-token tensors.

So for TRL the batch stays whole on every rank of an SP group, and the sharding happens inside the
fused forward: it shifts the labels on the full sequence, shards the inputs, runs the backbone and
the fused head on this rank's S/P tokens, and all-gathers the per-token outputs (``[B, S]`` floats,
small next to activations). TRL's code then sees exactly the tensors of a run without SP on every
rank. The all-gather's backward sums the ranks' gradients, so with every rank holding the same loss
a data-parallel mean over all ranks gives the non-SP gradient (the same convention as
``all_reduce_sum`` in ``loss.py``).

The TRL surface touched (patch records ``trl.trainer.{sft,dpo}_trainer.add_fused_lm_head`` and
``trl.fused_lm_head.forward``): ``add_fused_lm_head`` as imported by the trainer modules is
wrapped so that the forward it installs is sequence-parallel while an SP group is active.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from .. import patches
from ..comm import all_gather_seq
from ..data import shard_batch
from ..groups import get_sequence_parallel
from ..labels import shift_labels as full_sequence_shift
from ..models import ATTN_IMPLEMENTATION
from ..state import STATE
from ..transparent import is_transparent

logger = logging.getLogger("ulysses_attn")

__all__ = ["patch_trl", "fused_trainer_classes", "sequence_parallel_fused_forward"]

_MODULES = ("trl.trainer.sft_trainer", "trl.trainer.dpo_trainer")
_PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def trl_supported() -> bool:
    """Whether the installed TRL has the fused LM head this integration wraps (trl >= 1.16)."""
    try:
        import trl
    except ImportError:
        return False
    from packaging.version import Version

    return Version(trl.__version__) >= Version("1.16.0")


def fused_trainer_classes() -> tuple[type, ...]:
    """TRL trainer classes that score through the fused LM head (empty without a supported TRL)."""
    if not trl_supported():
        return ()
    import trl

    return tuple(getattr(trl, name) for name in ("SFTTrainer", "DPOTrainer") if hasattr(trl, name))


def sequence_parallel_fused_forward(model: torch.nn.Module) -> None:
    """Make ``model``'s fused-head forward (installed by TRL's ``add_fused_lm_head``) shard the
    sequence over the SP group and return full-sequence per-token outputs."""
    fused = model.forward

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, **kwargs):
        sp = get_sequence_parallel()
        if sp is None or sp.size == 1 or is_transparent(model):  # transparent: the backbone shards
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        if not fused_lm_head:
            raise NotImplementedError(
                "Under sequence parallelism, TRL trainers are supported through TRL's fused LM head "
                "(per-token log-probs). Options that need the full logits (label smoothing, compute_loss_func, "
                "generation) are not supported with ulysses_flash at SP size > 1."
            )
        if args:
            raise TypeError("pass the inputs of a sequence-parallel fused forward as keyword arguments")
        if kwargs.get("output_router_logits"):
            raise NotImplementedError("MoE router losses are not supported with sequence parallelism yet.")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        seq = kwargs["input_ids"].shape[1]
        keep = seq if shift_labels is not None else seq - 1
        if shift_labels is None:
            shift_labels = full_sequence_shift(labels)
        shard = shard_batch({**kwargs, "shift_labels": shift_labels}, sp)
        out = fused(fused_lm_head=True, **shard)
        for name in list(out.keys()):  # the fields TRL filled; each re-assembled by what it is, never guessed
            if name in _PER_TOKEN_OUTPUTS:
                setattr(out, name, all_gather_seq(out[name], sp.group)[:, :keep])
            elif name != "loss":
                raise NotImplementedError(
                    f"ulysses_attn: TRL's fused LM head returned {name!r}, which this package does not know how to "
                    "combine over the sequence-parallel group (known: loss and the per-token "
                    f"{', '.join(_PER_TOKEN_OUTPUTS)}). Please report it with your TRL version."
                )
        count = out.label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        out.loss = -out.log_probs.sum() / count
        return out

    patches.replace("trl.fused_lm_head.forward", model, "forward", forward)
    STATE.prepared_models.add(model)


def _wrap_add_fused_lm_head(original):
    @functools.wraps(original)
    def add_fused_lm_head(model, *args, **kwargs):
        original(model, *args, **kwargs)
        if getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            sequence_parallel_fused_forward(model)

    return add_fused_lm_head


def patch_trl() -> None:
    """Wrap ``add_fused_lm_head`` in TRL's SFT and DPO trainer modules (no-op without TRL)."""
    try:
        import trl
    except ImportError:
        return
    if not trl_supported():
        logger.info(
            "ulysses_attn: trl %s has no fused LM head; its trainers train in transparent mode under SP "
            "(whole logits on every rank; trl>=1.16 shards SFT / DPO's LM head too).",
            trl.__version__,
        )
        return
    for name in _MODULES:
        module = importlib.import_module(name)
        original = getattr(module, "add_fused_lm_head", None)
        if original is None:
            logger.warning("ulysses_attn: %s has no add_fused_lm_head; its trainer cannot be sequence-parallel.", name)
            continue
        if not patches.is_replaced(module, "add_fused_lm_head"):
            patches.replace(f"{name}.add_fused_lm_head", module, "add_fused_lm_head", _wrap_add_fused_lm_head(original))
