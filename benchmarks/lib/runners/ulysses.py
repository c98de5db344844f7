"""``ulysses``: this package, ``attn_implementation="ulysses_flash"`` over the SP group."""

from __future__ import annotations

import torch

from .base import Runner, configure_ours


class UlyssesRunner(Runner):
    def __init__(self, sp) -> None:
        super().__init__("ulysses", "ulysses_flash", sp.size, sp.group)

    def set_kernel(self, forced: str, args) -> None:
        """``ulysses@<kernel>``, else ``--kernel``, else the automatic choice."""
        import ulysses_attn

        ulysses_attn.set_kernel(forced or args.kernel or None)

    def add_memory_features(self, model, args, variant: str) -> None:
        """``MemoryOptions.long_sequence()`` (or the plan) with its chunked loss through the model's forward."""
        self.variant = variant
        configure_ours(model, args, variant, chunked_loss=True)

    def long_sequence_loss(self, model, batch: dict, args) -> torch.Tensor:
        """The user path: the chunked loss inside the model's forward."""
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     shift_labels=batch["shift_labels"]).loss

    def loss_path(self, model, args) -> str:
        """Ours fuses the head and the cross-entropy for a plain head, else chunks."""
        if not (args.long_sequence or self.variant == "auto"):
            return args.loss
        from ulysses_attn.loss import fused_head_applies

        return "fused" if fused_head_applies(model.get_output_embeddings()) else "checkpointed chunks"

    def used_kernels(self) -> list[str]:
        from ulysses_attn import kernels

        return sorted(kernels.used_kernels())
