"""What every system shares: the script's loss (tiled, or the model's own with ``--loss hf``),
the batch sharding, and the defaults a system overrides."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(h, lm_head, labels):
    logits = lm_head(h).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def tiled_loss_sum(hidden, lm_head, shift_labels, chunk: int):
    """Sum of the token cross-entropies, in checkpointed chunks (no full logits); the head is
    called as a module so that ZeRO-3 gathers its weight."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[1], chunk):
        total = total + checkpoint(_chunk_ce, hidden[:, i : i + chunk], lm_head, shift_labels[:, i : i + chunk],
                                   use_reentrant=False)
    return total


def configure_ours(model, args, variant: str, chunked_loss: bool) -> None:
    """This package's memory options: ``--long-sequence`` (``chunked_loss`` for ulysses only) and
    the ``+selective[+offload]`` variant; ``+auto``: the memory plan (``MemoryOptions.automatic()``,
    whatever ``--long-sequence`` says); nothing without either."""
    import ulysses_attn

    if variant == "auto":
        ulysses_attn.configure_memory(model, ulysses_attn.MemoryOptions.automatic(chunked_loss=chunked_loss))
        return
    if not (args.long_sequence or variant):
        return
    options = (ulysses_attn.MemoryOptions.long_sequence(chunked_loss=chunked_loss) if args.long_sequence
               else ulysses_attn.MemoryOptions(chunked_loss=False))
    options.selective_checkpointing = variant.startswith("selective")
    options.offload_attention_outputs = variant == "selective+offload"
    ulysses_attn.configure_memory(model, options)


class Runner:
    """One system under test: its attention backend, SP size ``P`` and group, how it changes the
    model and computes the loss. Every rank trains one sample per SP group."""

    def __init__(self, name: str, attn: str, P: int, group) -> None:
        self.name, self.attn, self.P, self.group = name, attn, P, group
        self.variant = ""  # the mode's +variant, set by add_memory_features

    def set_kernel(self, forced: str, args) -> None:
        """The ulysses inner kernel for this configuration: automatic unless a runner forces one."""
        import ulysses_attn

        ulysses_attn.set_kernel(None)

    def add_memory_features(self, model, args, variant: str) -> None:
        """The system's own memory savings (``--long-sequence``, variants); by default ours without
        the chunked loss."""
        self.variant = variant
        configure_ours(model, args, variant, chunked_loss=False)

    def attach(self, model, args, sp, state: dict) -> None:
        """Hook the system into transformers once the model is built (nothing by default)."""

    def mpu(self, state: dict):
        """What ``deepspeed.initialize`` gets as ``mpu`` under ZeRO-3."""
        return None

    def offload(self, args) -> contextlib.AbstractContextManager:
        """A context around forward and backward (the system's activation offload)."""
        return contextlib.nullcontext()

    def shard(self, full: dict, sp) -> dict:
        """This rank's part of the batch (the whole sample at P = 1)."""
        import ulysses_attn

        return ulysses_attn.shard_batch(full, sp=ulysses_attn.SequenceParallel.single() if self.P == 1 else sp)

    def loss(self, model, batch: dict, args) -> torch.Tensor:
        """The token-weighted cross-entropy over the whole sequence (the same on every rank of a group)."""
        if args.loss == "hf":
            return self.hf_loss(model, batch)
        if args.long_sequence or self.variant == "auto":
            return self.long_sequence_loss(model, batch, args)
        return self.tiled_loss(model, batch, args)

    def long_sequence_loss(self, model, batch: dict, args) -> torch.Tensor:
        """``--long-sequence``: the system's own loss; by default the script's tiled loss."""
        return self.tiled_loss(model, batch, args)

    def hf_loss(self, model, batch: dict) -> torch.Tensor:
        """``--loss hf``: the model's forward with ``ulysses_attn.causal_lm_loss`` (full logits)."""
        import ulysses_attn

        if self.P == 1:  # this rank's own sample: the plain (non-SP) loss
            no_sp = ulysses_attn.SequenceParallel.single()
            model.loss_function = functools.partial(ulysses_attn.causal_lm_loss, sp=no_sp)
        else:
            model.loss_function = ulysses_attn.causal_lm_loss
        return model(**batch).loss

    def hidden_and_count(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden states and the group's number of labelled tokens."""
        out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        count = (batch["shift_labels"] != -100).sum().float()
        if self.P > 1:
            dist.all_reduce(count, group=self.group)
        return out.last_hidden_state, count

    def tiled_loss(self, model, batch: dict, args) -> torch.Tensor:
        """:func:`tiled_loss_sum` in chunks of ``--loss-chunk`` tokens, summed over the SP group."""
        from ulysses_attn.comm import all_reduce_sum

        hidden, count = self.hidden_and_count(model, batch)
        local = tiled_loss_sum(hidden, model.lm_head, batch["shift_labels"], args.loss_chunk)
        if self.P > 1:
            local = all_reduce_sum(local, self.group)
        return local / count

    def loss_path(self, model, args) -> str:
        """Which loss ran (``loss_path`` in the results)."""
        return args.loss

    def used_kernels(self) -> list[str]:
        """The ulysses inner kernels that ran (``ulysses_kernel`` in the results)."""
        return []
