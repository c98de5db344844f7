"""Cross-entropy of a linear head, chunk by chunk, with the gradients computed in the forward.

``linear_cross_entropy_sum(hidden, weight, targets, chunks)`` is
``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` without the ``[tokens, vocab]``
logits: each chunk's logits exist once, in the forward, where the chunk's gradients with respect
to ``hidden`` and ``weight`` are computed from them (softmax minus one-hot). The backward only
scales those by the incoming gradient, so nothing is recomputed, and the weight's gradient is
returned through autograd: loss scaling, gradient accumulation, DDP hooks and tied embeddings see
it as they would the plain head's. (DeepSpeed ALST's ``TiledFusedLogitsLoss`` writes the weight
gradient during the forward instead, which is wrong as soon as the loss is scaled afterwards.)

Cost: a ``[vocab, hidden]`` fp32 accumulator for the weight gradient and a hidden-sized buffer for
the input gradient, held from the forward to the backward.
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy_sum", "frozen_linear_log_probs"]


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunks: int, with_grads: bool):
        grad_hidden = torch.empty_like(hidden) if with_grads and hidden.requires_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16/fp16 inputs
        grad_weight = torch.zeros_like(weight, dtype=acc) if with_grads and weight.requires_grad else None
        total = hidden.new_zeros((), dtype=acc)
        grad_chunks = grad_hidden.tensor_split(chunks) if grad_hidden is not None else [None] * chunks
        for h, y, gh in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), grad_chunks):
            logp = (h @ weight.t()).to(acc).log_softmax(-1)
            target_logp = logp.gather(1, y[:, None]).squeeze(1)
            total -= target_logp.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum CE)/d logits = softmax - one-hot, written straight in the input dtype; the
            # target entries are corrected from fp32 (p - 1 loses p's digits once p is rounded)
            g = torch.exp(logp, out=logp if logp.dtype == hidden.dtype else torch.empty_like(logp, dtype=hidden.dtype))
            del logp
            g[torch.arange(len(y), device=y.device), y] = (target_logp.exp() - 1).to(g.dtype)
            if gh is not None:
                torch.mm(g, weight, out=gh)
            if grad_weight is not None:
                grad_weight += g.t() @ h
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunks: int
) -> torch.Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)``; ``hidden`` is
    ``[tokens, hidden]``, every target a valid class (filter ignored tokens first); ``chunks``
    bounds the logits that exist at once to ``ceil(tokens / chunks)`` rows.

    >>> loss = linear_cross_entropy_sum(h, model.lm_head.weight, y, chunks=8) / len(y)
    """
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunks, with_grads)


class _FrozenLinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunks: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = hidden.new_empty(len(targets), dtype=acc)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_chunks = grad_hidden.tensor_split(chunks) if grad_hidden is not None else [None] * chunks
        start = 0
        for h, y, gh in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), grad_chunks):
            logits = h @ weight.t()
            if bias is not None:
                logits = logits + bias
            logp = logits.to(acc).log_softmax(-1)
            out[start : start + len(y)] = logp.gather(1, y[:, None]).squeeze(1)
            start += len(y)
            if gh is not None:  # d log p(y) / d logits = one-hot - softmax
                g = torch.exp(logp).neg_()
                g[torch.arange(len(y), device=y.device), y] += 1
                torch.mm(g.to(hidden.dtype), weight, out=gh)
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out[:, None].to(grad_hidden.dtype)
        return grad_hidden, None, None, None, None


def frozen_linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunks: int
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` per row of ``hidden`` (``[tokens,
    hidden]``), ``chunks`` chunks of logits at a time, for a head that does not train (LoRA): the
    gradient with respect to ``hidden`` is computed with each chunk's logits in the forward, so
    the backward needs neither the logits nor the weight (which ZeRO-3 may have re-partitioned).

    >>> logp = frozen_linear_log_probs(h, model.lm_head.weight, None, y, chunks=8)
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_linear_log_probs is for a head whose parameters do not train")
    return _FrozenLinearLogProbs.apply(hidden, weight, bias, targets, chunks)
