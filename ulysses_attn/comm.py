"""Autograd-aware collectives over the sequence-parallel group.

Tensors use the HF attention layout ``[batch, heads, seq, head_dim]``.

* :func:`gather_seq_scatter_heads`: ``[B, H, S/P, D] -> [B, H/P, S, D]`` (before attention)
* :func:`gather_heads_scatter_seq`: ``[B, H/P, S, D] -> [B, H, S/P, D]`` (after attention)
* :func:`all_gather_seq`: ``[B, S/P, ...] -> [B, S, ...]`` (positions, masks, per-token outputs)
* :func:`all_reduce_sum`: differentiable sum over the group (losses, per-sequence log-probs)
* :func:`chunk_count`: how many chunks a tiled computation runs (the same on every rank under ZeRO-3)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_seq_scatter_heads", "gather_heads_scatter_seq", "all_gather_seq", "all_reduce_sum", "chunk_count"]


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk i to rank i, concatenate what
    arrives along ``gather_dim`` (in rank order)."""
    world = dist.get_world_size(group)
    chunks = x.shape[scatter_dim] // world
    # [..., P, chunk, ...] with the rank axis moved to the front so all_to_all_single splits on dim 0
    send = x.unflatten(scatter_dim, (world, chunks)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] holds rank i's part of the gather dim: move the rank axis in front of it and merge
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def gather_seq_scatter_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H, S_local, D] -> [B, H/P, S_local*P, D]``: every rank ends with all tokens of H/P heads."""
    return _AllToAll.apply(x, 1, 2, group)


def gather_heads_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H/P, S, D] -> [B, H, S/P, D]``: the inverse of :func:`gather_seq_scatter_heads`."""
    return _AllToAll.apply(x, 2, 1, group)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds (and differentiates) its own copy of the gathered tensor: the gradient of
        # this rank's slice is the sum over ranks of their gradients for it.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None


def all_gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order (equal shapes). Differentiable:
    the gradient of each rank's part is the sum of all ranks' gradients for it."""
    if x.requires_grad:
        return _AllGather.apply(x, group, dim)
    return _all_gather(x, group, dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        # d(sum_j x_j)/dx_i = 1 for every rank's output: the gradient of x_i is the sum of all
        # ranks' upstream gradients.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable ``sum`` of ``x`` over the group; every rank gets the total."""
    return _AllReduceSum.apply(x, group)


def chunk_count(rows: int, chunk: int, device: torch.device) -> int:
    """``ceil(rows / chunk)`` (at least 1), raised to the largest value over all ranks under
    DeepSpeed ZeRO-3: there each call of a module gathers its parameters with a collective, so
    every rank must call a chunked module the same number of times."""
    if chunk < 1:
        raise ValueError(f"chunk size must be a positive number of tokens; got {chunk}.")
    count = max(1, -(-rows // chunk))
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if dist.is_initialized() and is_deepspeed_zero3_enabled():
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t.item())
    return count


def split_chunks(x: torch.Tensor, count: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """``x.tensor_split(count, dim)`` (the same sizes) as one ``split``: its backward concatenates
    the chunks' gradients once, where ``tensor_split``'s slices each build a zero-filled gradient
    of the whole of ``x`` and add them up -- ``count`` full-size fills and adds per call."""
    rows, extra = divmod(x.shape[dim], count)
    return x.split([rows + (i < extra) for i in range(count)], dim)
