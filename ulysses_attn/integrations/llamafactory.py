"""LLaMA-Factory (0.9.x) trainers under sequence parallelism (docs/llamafactory.md).

Every LLaMA-Factory trainer computes its loss from ``model(**batch).logits`` and so trains in
transparent mode. Its DPO trainer (``CustomDPOTrainer``) only needs sums over tokens from those
logits: ``concatenated_forward`` stacks chosen and rejected rows, and ``get_batch_logps`` sums
``log p(label)`` per row. For it the package replaces ``concatenated_forward`` on the trainer
instance (patch record ``llamafactory.CustomDPOTrainer.concatenated_forward``) by the same
computation from sharded hidden states: the backbone's output stays sharded
(:func:`~ulysses_attn.transparent.sharded_hidden_states`), each rank scores its ``S/P`` tokens
through the LM head chunk by chunk (:func:`~ulysses_attn.loss.chunked_row_log_probs`), and the row
sums are added over the SP group. No rank ever holds the ``[2B, S, vocab]`` logits. The loss types,
the reference log-probs (adapter disabled or a reference model), ``pref_ftx`` and every metric stay
LLaMA-Factory's own code; ``logits/chosen`` / ``logits/rejected`` are computed over the same
positions as LLaMA-Factory's (every position of the padded rows) without a gradient. Logit scaling
and soft-capping (Cohere, Granite, Gemma 2/3) are applied after the head; a model whose logits are
something else (``head.checked_logit_transform`` checks each model once) keeps LLaMA-Factory's own
forward (transparent, exact, with full logits), as does LD-DPO (``ld_alpha``), which needs
per-position masks of the whole sequence.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from .. import patches
from ..data import shard_batch
from ..groups import SequenceParallel
from ..head import checked_logit_transform
from ..labels import IGNORE_INDEX
from ..labels import shift_labels as full_sequence_shift
from ..loss import chunked_logit_sums, chunked_row_log_probs, sp_sum
from ..transparent import sharded_hidden_states

__all__ = ["is_llamafactory_dpo", "sp_aware_dpo_log_probs"]

_RECORD = "llamafactory.CustomDPOTrainer.concatenated_forward"
_AVERAGED = ("ipo", "orpo", "simpo")  # loss types that average the log-probs over the tokens


def is_llamafactory_dpo(trainer) -> bool:
    """Whether ``trainer`` is (a subclass of) LLaMA-Factory's ``CustomDPOTrainer``."""
    return any(
        c.__name__ == "CustomDPOTrainer" and c.__module__.startswith("llamafactory") for c in type(trainer).__mro__
    )


def sp_aware_dpo_log_probs(trainer, sp: SequenceParallel) -> None:
    """Make the trainer's ``concatenated_forward`` compute its log-probs from sharded hidden states
    (see the module docstring). The trainer's models must be transparent (``attach`` does it)."""
    original = trainer.concatenated_forward

    @functools.wraps(original)
    def concatenated_forward(model, batch, is_ref_model=False):
        if not is_ref_model and getattr(trainer, "ld_alpha", None) is not None:
            return original(model, batch, is_ref_model)
        transform = checked_logit_transform(_causal_lm(model))
        if transform is None:  # logits the head alone does not give (warned): LLaMA-Factory's own forward
            return original(model, batch, is_ref_model)
        transform = None if transform.identity else transform
        batch = dict(batch)
        labels = batch.pop("labels")
        half = batch["input_ids"].size(0) // 2
        head = _causal_lm(model).get_output_embeddings()
        shift = shard_batch({"input_ids": batch["input_ids"], "shift_labels": full_sequence_shift(labels)}, sp)[
            "shift_labels"
        ]

        def score(hidden, shard, seq):  # inside the model's forward (see sharded_hidden_states)
            logits = None if is_ref_model else _mean_logits(hidden, head, seq, sp, half, transform)
            return chunked_row_log_probs(hidden, head, shift, transform=transform), logits

        no_logits = torch.empty(0, dtype=torch.long, device=labels.device)
        with sharded_hidden_states(score) as out:
            model(**batch, return_dict=True, use_cache=False, logits_to_keep=no_logits)
        if out.scored is None:
            raise RuntimeError(
                "ulysses_attn: LLaMA-Factory's DPO forward did not reach a transparent model under sequence "
                "parallelism; run it with --transparent on, or report this."
            )
        local_logps, logits = out.scored
        all_logps = sp_sum(local_logps, sp)
        valid_length = (shift != IGNORE_INDEX).sum(-1)
        dist.all_reduce(valid_length, group=sp.group)
        if trainer.loss_type in _AVERAGED:
            all_logps = all_logps / valid_length
        chosen_logps, rejected_logps = all_logps.split(half, dim=0)
        chosen_length = valid_length[:half]
        chosen_logits, rejected_logits = logits if logits is not None else (None, None)
        return {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_logits": chosen_logits,
            "rejected_logits": rejected_logits,
            "chosen_logps_avg": chosen_logps if trainer.loss_type in _AVERAGED else chosen_logps / chosen_length,
        }

    patches.replace(_RECORD, trainer, "concatenated_forward", concatenated_forward)


def _causal_lm(model) -> Any:
    """The transformers ``*ForCausalLM`` inside DeepSpeed / DDP wrappers and a PEFT model."""
    inner: Any = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):  # DeepSpeed / DDP wrappers
        inner = inner.module
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    if inner.get_output_embeddings() is None:
        raise RuntimeError(f"ulysses_attn: {type(inner).__name__} has no output embeddings to score with.")
    return inner


def _mean_logits(hidden: torch.Tensor, head: torch.nn.Module, seq: int, sp: SequenceParallel, half: int, transform):
    """LLaMA-Factory's ``logits/chosen`` and ``logits/rejected``: the mean logit over every position
    of the chosen / rejected rows (the SP padding past ``seq`` left out), as 1-element tensors."""
    rows, local = hidden.shape[:2]
    keep = (torch.arange(local, device=hidden.device) + sp.rank * local) < seq
    kept = int(keep.sum())
    sums = chunked_logit_sums(hidden.detach()[:, keep].reshape(-1, hidden.shape[-1]), head, transform=transform)
    per_row = sums.reshape(rows, kept).sum(-1) if kept else sums.new_zeros(rows)
    dist.all_reduce(per_row, group=sp.group)
    weight: Any = head.weight
    scale = half * seq * getattr(weight, "ds_shape", weight.shape)[0]
    return (per_row[:half].sum() / scale).reshape(1), (per_row[half:].sum() / scale).reshape(1)
