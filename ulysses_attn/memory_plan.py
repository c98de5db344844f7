"""The automatic memory plan: the memory options with the least recompute that fit.

``MemoryOptions.automatic()`` (``enable(sp_size, long_sequence="auto")``, launcher
``--long-sequence auto``) decides at every training forward, for the tokens that forward holds and
the memory the device has left, which decoder layers are checkpointed, whether their attention
outputs are kept (selective checkpointing), whether the checkpoints go to host memory and whether
the MLPs are tiled. The chunked loss stays on (it recomputes nothing for a plain head).

>>> plan = plan_memory(config, tokens=65536, seq=131072, budget_bytes=60 << 30, static_bytes=20 << 30)
>>> plan.choice, plan.predicted_peak_bytes

How: :func:`activation_bytes` is a per-token model of what a Llama-style decoder keeps for the
backward (the tensors autograd saves, by kind, in the activations' dtype) plus the working set of
the layer being differentiated and of the loss. Each candidate (``k`` of ``L`` layers checkpointed,
selective or not, offload, tiled MLP) gets that peak and a cost: the forward FLOPs it recomputes
over the FLOPs of a step (matmuls 6·N·T, causal attention 7·L·T·S·H·D / 2... see
:func:`recompute_share`), plus a flat share for the offload's copies. The plan is the cheapest
candidate whose peak fits the budget (the device's free memory plus what this process has
reserved, less ``headroom``) and whose offload fits the host; the peak of the step that follows is
compared with the prediction (:class:`PlanChecker`), and a step that used more than predicted
raises the estimate of later plans by the measured ratio. Every rank of the world takes the same
plan (the most tokens, the least memory): a checkpointed layer's recompute repeats its collectives.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from .loss import default_loss_chunk_tokens
from .state import active_sp, announce_once, warn_once
from .transparent import is_transparent

__all__ = [
    "Choice",
    "DecoderShape",
    "MemoryPlan",
    "PlanChecker",
    "activation_bytes",
    "agreed_plan",
    "plan_memory",
    "recompute_share",
]

OFFLOAD_SHARE = 0.03  # the offload's PCIe copies run on a side stream: measured 1-2% of a step; charged 3%
HEADROOM = 0.1  # of the budget, for the allocator's fragmentation and the kernels' workspaces


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes the memory model needs of a decoder (its text config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> DecoderShape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        return cls(
            layers=int(c.num_hidden_layers),
            hidden=int(c.hidden_size),
            intermediate=int(getattr(c, "intermediate_size", None) or 4 * c.hidden_size),
            heads=heads,
            kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            vocab=int(c.vocab_size),
        )


@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate: ``checkpointed`` of the decoder layers (the first ones) are checkpointed,
    keeping their attention outputs when ``selective``; ``offload`` (all layers checkpointed only)
    sends the checkpoints to pinned host memory; ``tiled_mlp`` runs the MLPs in chunks."""

    checkpointed: int
    selective: bool
    offload: bool
    tiled_mlp: bool

    def describe(self, layers: int) -> str:
        if self.checkpointed == 0:
            parts = ["no activation checkpointing"]
        else:
            kind = "selective" if self.selective else "full"
            which = "all" if self.checkpointed == layers else f"{self.checkpointed} of {layers}"
            parts = [f"{kind} checkpointing of {which} layers"]
        if self.offload:
            parts.append("checkpoints offloaded to host memory")
        if self.tiled_mlp:
            parts.append("tiled MLP")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    choice: Choice
    tokens: int  # on this rank
    seq: int  # the whole sequence the attention sees
    predicted_peak_bytes: int  # static + activations
    static_bytes: int
    budget_bytes: int | None  # None: no limit known (CPU without memory_budget_bytes)
    host_bytes: int  # what the offload moves to host memory
    recompute_share: float  # extra time over a step without recompute (a model, not a measurement)
    fits: bool

    def describe(self, layers: int) -> str:
        budget = "no limit known" if self.budget_bytes is None else f"budget {_gib(self.budget_bytes)}"
        return (
            f"{self.choice.describe(layers)}; predicted peak {_gib(self.predicted_peak_bytes)} "
            f"(static {_gib(self.static_bytes)}; {budget}) for {self.tokens} tokens on this rank of a "
            f"{self.seq}-token sequence; recompute ~{100 * self.recompute_share:.0f}% of a step"
            + (f"; {_gib(self.host_bytes)} offloaded" if self.host_bytes else "")
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _layer_bytes_per_token(s: DecoderShape, act: int, tiled: bool) -> tuple[float, float, float]:
    """(saved by an uncheckpointed layer, kept by a checkpointed one, kept by a selective one), bytes
    per token. A RMSNorm saves its fp32 input and its normalised output, and its consumer the
    weighted output; attention saves q, k, v, its output (twice: o_proj's input is a reshaped
    copy) and the fp32 log-sum-exp; a gated MLP its gate, up, activation and product."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    norm = 4 * s.hidden + 2 * act * s.hidden
    attention = norm + act * (q + 2 * kv + 2 * q) + 4 * s.heads
    mlp = norm + (0 if tiled else 4 * act * s.intermediate)
    return attention + mlp, act * s.hidden, act * (s.hidden + q) + 4 * s.heads


def _working_bytes_per_token(s: DecoderShape, act: int, tiled: bool) -> float:
    """The layer under differentiation: its recomputed activations, the largest backward temporaries
    (attention: dq/dk/dv and an fp32 dq accumulator; MLP: three intermediate-size gradients), and
    the hidden-state gradient in and out."""
    saved, _, _ = _layer_bytes_per_token(s, act, tiled)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention_grads = act * (q + 2 * kv) + 4 * q
    mlp_grads = 0 if tiled else 3 * act * s.intermediate
    return saved + max(attention_grads, mlp_grads) + 2 * act * s.hidden


def activation_bytes(
    s: DecoderShape,
    choice: Choice,
    tokens: int,
    act: int = 2,
    loss_chunk_tokens: int = 2048,
    mlp_chunk: int = 4096,
    trainable_head: bool = True,
) -> tuple[int, int]:
    """(device bytes, host bytes) of a training step's activations for ``tokens`` on this rank
    (``act``: bytes per activation element; ``trainable_head``: the chunked loss keeps an fp32
    gradient of the output embeddings)."""
    saved, kept_full, kept_selective = _layer_bytes_per_token(s, act, choice.tiled_mlp)
    kept = kept_selective if choice.selective else kept_full
    per_token = (s.layers - choice.checkpointed) * saved
    host = 0.0
    if choice.offload:  # two checkpointed layers in flight (the one replayed and the one prefetched)
        per_token += 2 * kept
        host = s.layers * kept * tokens
    else:
        per_token += choice.checkpointed * kept
    # the final norm, the loss's hidden states and their gradient (computed in the forward), the rotary tables
    per_token += 4 * s.hidden + 4 * act * s.hidden + 4 * act * s.head_dim
    # then the larger of two moments: the loss chunk at the end of the forward (its fp32 logits, their
    # log-softmax and the gradient in the activations' dtype), and the backward of one layer
    working = _working_bytes_per_token(s, act, choice.tiled_mlp) - (0 if choice.checkpointed else saved)
    if choice.tiled_mlp:
        working_bytes = working * tokens + min(tokens, mlp_chunk) * 7 * act * s.intermediate
    else:
        working_bytes = working * tokens
    loss_chunk = min(tokens, loss_chunk_tokens) * s.vocab * (8 + act)
    head_grad = 4 * s.vocab * s.hidden if trainable_head else 0  # the fused loss's fp32 weight gradient
    return int(per_token * tokens + max(working_bytes, loss_chunk) + head_grad), int(host)


def recompute_share(s: DecoderShape, choice: Choice, tokens: int, seq: int) -> float:
    """Forward FLOPs recomputed by ``choice`` over the FLOPs of a step without recompute (a matmul
    costs 3x its forward in a step, causal attention 3.5x: flash backward is ~2.5x its forward)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp = 2 * tokens * 3 * s.hidden * s.intermediate
    layer_mm = 2 * tokens * s.hidden * (2 * q + 2 * kv) + mlp
    attention = 2 * tokens * seq * q  # QK^T and PV over a causal mask, per rank
    step = 3 * (s.layers * layer_mm + 2 * tokens * s.hidden * s.vocab) + 3.5 * s.layers * attention
    extra = choice.checkpointed * (layer_mm + (0 if choice.selective else attention))
    extra += s.layers * mlp if choice.tiled_mlp else 0
    return extra / step + (OFFLOAD_SHARE if choice.offload else 0.0)


def candidates(layers: int, tiling: bool = True) -> list[Choice]:
    out = []
    for tiled in (False, True) if tiling else (False,):
        for selective in (True, False):
            for k in range(0 if selective else 1, layers + 1):
                out.append(Choice(k, selective, False, tiled))
            out.append(Choice(layers, selective, True, tiled))
    return out


def plan_memory(
    config: Any,
    tokens: int,
    seq: int,
    budget_bytes: int | None,
    static_bytes: int = 0,
    host_budget_bytes: int | None = None,
    act_bytes: int = 2,
    scale: float = 1.0,
    tiling: bool = True,
    offload: bool = True,
    loss_chunk_tokens: int = 2048,
    trainable_head: bool = True,
    checkpointing: bool = True,
) -> MemoryPlan:
    """The cheapest candidate whose predicted peak (``static_bytes`` + ``scale`` x activations)
    fits ``budget_bytes`` and whose offload fits ``host_budget_bytes``; if none fits, the one with
    the smallest device peak whose offload fits the host (``fits=False``). ``budget_bytes=None``
    (no limit known) gives the candidate without recompute. ``checkpointing=False``: no candidate
    checkpoints a layer (only tiling)."""
    s = config if isinstance(config, DecoderShape) else DecoderShape.of(config)
    best: MemoryPlan | None = None
    smallest: dict[bool, MemoryPlan] = {}  # the smallest device peak, by whether its offload fits the host
    for choice in candidates(s.layers, tiling):
        if (choice.offload and not offload) or (choice.checkpointed and not checkpointing):
            continue
        device, host = activation_bytes(s, choice, tokens, act_bytes, loss_chunk_tokens, trainable_head=trainable_head)
        peak = static_bytes + int(math.ceil(scale * device))
        on_host = host_budget_bytes is None or host <= host_budget_bytes
        fits = (budget_bytes is None or peak <= budget_bytes) and on_host
        plan = MemoryPlan(choice, tokens, seq, peak, static_bytes, budget_bytes, host,
                          recompute_share(s, choice, tokens, seq), fits)  # fmt: skip
        if fits and (best is None or (plan.recompute_share, peak) < (best.recompute_share, best.predicted_peak_bytes)):
            best = plan
        if on_host not in smallest or peak < smallest[on_host].predicted_peak_bytes:
            smallest[on_host] = plan
    return best or smallest.get(True) or smallest[False]


def cuda_budget(device: torch.device, headroom: float = HEADROOM) -> int:
    """What this process may still allocate on ``device`` at most, less ``headroom``: the device's
    free memory plus this process's reserved memory, capped by ``set_per_process_memory_fraction``."""
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        usable = min(usable, int(fraction(device) * total))
    return int(usable * (1 - headroom))


def host_budget(headroom: float = 0.2) -> int | None:
    """Host memory one rank may fill with offloaded checkpoints: the host's available memory,
    shared by its ranks (``LOCAL_WORLD_SIZE``), less ``headroom``; ``None`` if unknown."""
    try:
        import psutil
    except ImportError:
        return None
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(psutil.virtual_memory().available * (1 - headroom) / ranks)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensor: this rank's shard
    return local.numel() * local.element_size()


def static_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """What a step holds whatever the options: on CUDA, what is allocated now plus the gradients
    still to be allocated (trainable parameters without ``.grad``; DeepSpeed keeps its own
    buffers, allocated already); elsewhere the parameters and their gradients."""
    params = [p for p in model.parameters() if not hasattr(p, "ds_id")]
    grads = sum(_local_bytes(p) for p in params if p.requires_grad and p.grad is None)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) + grads
    return sum(_local_bytes(p) for p in params) + sum(_local_bytes(p) for p in params if p.requires_grad)


class PlanChecker:
    """Compares each plan's predicted peak with the peak the step reached (CUDA: the allocator's
    high-water mark, read at the next forward, so it includes the optimizer step) and keeps the
    ratio by which later plans scale their activation estimate when a step used more."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.last: MemoryPlan | None = None  # the plan of the latest training forward
        self.pending: tuple[MemoryPlan, int] | None = None

    def observe(self, device: torch.device) -> None:
        if device.type != "cuda" or self.pending is None:
            return
        plan, before = self.pending
        self.pending = None
        peak = torch.cuda.max_memory_allocated(device)
        if peak <= before:  # this step's peak stayed below an earlier one: nothing to compare
            return
        predicted = plan.predicted_peak_bytes - plan.static_bytes
        measured = peak - plan.static_bytes
        message = (
            f"ulysses_attn: memory plan check: predicted peak {_gib(plan.predicted_peak_bytes)}, measured "
            f"{_gib(peak)} ({peak / plan.predicted_peak_bytes:.2f}x)"
        )
        announce_once(("plan check", plan.choice), message + ".")
        if predicted > 0 and measured > 1.1 * predicted:
            self.scale = max(self.scale, self.scale * measured / predicted)
            note = f"; later plans scale activations by {self.scale:.2f}."
            warn_once(("plan scale", round(self.scale, 1)), message + note)

    def expect(self, plan: MemoryPlan, device: torch.device) -> None:
        self.last = plan
        if device.type == "cuda":
            self.pending = (plan, torch.cuda.max_memory_allocated(device))


_UNLIMITED = 1 << 62


def _agree(values: list[int], device: torch.device) -> list[int]:
    """The maximum of each value over the world (one all-reduce), so that every rank takes the same
    plan: a checkpointed layer's recompute repeats its collectives (all-to-alls, ZeRO-3 gathers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    on = device if device.type == "cuda" and "nccl" in str(dist.get_backend()) else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def agreed_plan(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    budget_bytes: int | None,
    checker: PlanChecker,
    tiling: bool,
    checkpointing: bool,
    loss_chunk_tokens: int | None,
) -> MemoryPlan:
    """The plan for a training forward of ``model`` on ``x`` (``input_ids`` or ``inputs_embeds``),
    the same on every rank: the most tokens and static memory and the least budget of the world."""
    sp = active_sp()
    P = sp.size if sp is not None else 1
    batch, length = x.shape[0], x.shape[1]
    tokens, seq = (batch * length // P, length) if is_transparent(model) else (batch * length, length * P)
    device = x.device
    checker.observe(device)
    if budget_bytes is None and device.type == "cuda":
        budget_bytes = cuda_budget(device)
    host = host_budget()
    agreed = _agree(
        [tokens, seq, static_bytes(model, device), -(budget_bytes or _UNLIMITED), -(host or _UNLIMITED)], device
    )
    tokens, seq, static = agreed[:3]
    budget, host = -agreed[3], -agreed[4]
    hf: Any = model  # a transformers model
    weight = getattr(hf.get_output_embeddings(), "weight", None)
    plan = plan_memory(
        hf.config,
        tokens,
        seq,
        None if budget == _UNLIMITED else budget,
        static,
        None if host == _UNLIMITED else host,
        act_bytes=torch.finfo(_activation_dtype(model)).bits // 8,
        scale=checker.scale,
        tiling=tiling,
        offload=checkpointing,
        loss_chunk_tokens=loss_chunk_tokens or default_loss_chunk_tokens(DecoderShape.of(hf.config).vocab),
        trainable_head=bool(weight is not None and weight.requires_grad),
        checkpointing=checkpointing,
    )
    checker.expect(plan, device)
    return plan


def _activation_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else p.dtype
    return torch.float32
