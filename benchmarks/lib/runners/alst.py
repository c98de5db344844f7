"""``alst``: DeepSpeed ALST's attention (``UlyssesSPAttentionHF`` over ``--alst-attn``) over the
same SP groups, only its attention component, not the DeepSpeed engine; ``--long-sequence``: its
``TiledMLP``, ``TiledFusedLogitsLoss`` and ``CheckpointHiddenStatesOffload``."""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .base import Runner


def alst_tile_mlps(model) -> None:
    """DeepSpeed's TiledMLP in every decoder MLP, as its docstring patches LlamaMLP.forward
    (ceil(seqlen / hidden) shards; the ranks' lengths are equal here, so the MAX all-reduce the
    docstring adds to agree on the count is left out)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_mlp_forward(self, x):
        shards = max(1, -(-x.shape[-2] // x.shape[-1]))
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(mlp_forward, self, x, shards, params)

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(tiled_mlp_forward, layer.mlp)


def alst_loss_sum(hidden, lm_head, shift_labels, scale=1.0):
    """``scale`` times the sum of the token cross-entropies, through DeepSpeed's TiledFusedLogitsLoss.
    Its lm_head gradient is right only where the gradient arriving at its output is 1."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    from ulysses_attn.loss import default_loss_chunk_tokens

    def loss_fn(head, x, y):
        logits = head(x).float()
        return scale * F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100,
                                       reduction="sum")

    # about 1 GiB of fp32 logits per shard, as ArcticTraining sizes them (and as our chunked loss does)
    vocab = getattr(lm_head.weight, "ds_shape", lm_head.weight.shape)[0]
    shards = max(1, -(-hidden.shape[1] // default_loss_chunk_tokens(vocab)))
    return TiledFusedLogitsLoss.apply(loss_fn, lm_head, hidden, shift_labels, None, shards, [lm_head.weight], "sum")


class AlstRunner(Runner):
    def __init__(self, sp, core_attn: str) -> None:
        super().__init__("alst", core_attn, sp.size, None)

    def add_memory_features(self, model, args, variant: str) -> None:
        if args.long_sequence:
            alst_tile_mlps(model)

    def attach(self, model, args, sp, state: dict) -> None:
        """Register ALST with transformers (once per process: it replaces the global attention
        function) and take its SP group, which must be ours; at P = 1 ALST registers nothing."""
        if sp.size == 1:
            return
        if "mpu" not in state:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            state["mpu"] = UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation=args.alst_attn, sequence_parallel_size=sp.size,
                micro_batch_size=1, seq_length_is_variable=True)
        self.group = state["mpu"].get_sequence_parallel_group()
        assert dist.get_process_group_ranks(self.group) == list(sp.ranks), "ALST and ulysses SP groups differ"

    def mpu(self, state: dict):
        return state.get("mpu")

    def offload(self, args) -> contextlib.AbstractContextManager:
        if not args.long_sequence:
            return contextlib.nullcontext()
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        return get_checkpoint_hidden_states_offloading_ctx_manager(min_offload_bytes=2**20)

    def long_sequence_loss(self, model, batch: dict, args) -> torch.Tensor:
        """TiledFusedLogitsLoss computes lm_head's gradient in its forward, for an upstream gradient
        of 1; dividing by the tokens after it (ArcticTraining's recipe) leaves that gradient
        count / P times too large. Scaled inside, the gradient reaching it is exactly 1."""
        from ulysses_attn.comm import all_reduce_sum

        hidden, count = self.hidden_and_count(model, batch)
        local = alst_loss_sum(hidden, model.lm_head, batch["shift_labels"], scale=self.P / count)
        return all_reduce_sum(local, self.group) / self.P if self.P > 1 else local

    def loss_path(self, model, args) -> str:
        return "alst TiledFusedLogitsLoss" if args.long_sequence else args.loss
