"""FlashAttention-4 as a registered PyTorch operator: ``torch.ops.ulysses_attn.flash_attn4``.

FA4 (``flash_attn.cute``) launches its CuTe kernels from Python, outside the PyTorch dispatcher,
so a dispatch mode cannot see its attention: selective checkpointing could not keep FA4's output
and recomputed it. Here FA4's forward and backward are two custom ops joined by an autograd
formula -- the same kernels, now visible to the dispatcher -- so selective checkpointing keeps the
forward's ``(out, lse)`` and the recompute skips the kernel, as it does for SDPA and FA2/FA3.

The ops call FA4's internal ``_flash_attn_fwd``/``_flash_attn_bwd``, the functions its own
autograd Function calls (flash-attn-4 4.0.0b36). Their parameters are checked at first use; if a
FA4 version changes them, :func:`supported` is ``False`` and the ``flash_attn`` kernel calls FA4's
public ``flash_attn_func`` instead (with a warning where selective checkpointing then recomputes).
(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations as types.)
"""

import functools
import importlib
import inspect
import logging
from typing import Optional

import torch

logger = logging.getLogger("ulysses_attn")

__all__ = ["flash_attn4", "supported"]

_FWD_KEYWORDS = {
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "softmax_scale",
    "causal",
    "softcap",
    "window_size_left",
    "window_size_right",
    "return_lse",
}
_BWD_POSITIONAL = ["q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "softcap"]
_BWD_KEYWORDS = {
    "window_size_left",
    "window_size_right",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
}


def _load_interface():
    return importlib.import_module("flash_attn.cute.interface")


@functools.cache
def _internals():
    """FA4's ``(_flash_attn_fwd, _flash_attn_bwd)``, or ``None`` where they are missing or changed."""
    try:
        interface = _load_interface()
    except ImportError:
        return None
    fwd, bwd = getattr(interface, "_flash_attn_fwd", None), getattr(interface, "_flash_attn_bwd", None)
    if fwd is not None and bwd is not None:
        fwd_params, bwd_params = inspect.signature(fwd).parameters, list(inspect.signature(bwd).parameters)
        if (
            _FWD_KEYWORDS <= set(fwd_params)
            and bwd_params[: len(_BWD_POSITIONAL)] == _BWD_POSITIONAL
            and _BWD_KEYWORDS <= set(bwd_params)
        ):
            return fwd, bwd
    logger.warning(
        "ulysses_flash: this FlashAttention-4 version's internal forward/backward differ from the "
        "ones ulysses_attn wraps (flash-attn-4 4.0.0b36); using its public function, so selective "
        "checkpointing recomputes FA4's attention."
    )
    return None


def supported() -> bool:
    """Whether the installed FA4 can run as :func:`flash_attn4`."""
    return _internals() is not None


def _shared_keywords(cu_seqlens, max_seqlen, window_left, window_right) -> dict:
    """The keywords FA4's internal forward and backward both take, for one self-attention call."""
    return dict(
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        window_size_left=window_left,
        window_size_right=window_right,
    )


# one line per group of parameters: torch.library.custom_op reads the annotations
# fmt: off
@torch.library.custom_op("ulysses_attn::flash_attn4", mutates_args=())
def flash_attn4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                max_seqlen: Optional[int], scale: float, causal: bool, window_left: Optional[int],
                window_right: Optional[int], softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 attention: ``q [B, S, H, D]`` (or ``[tokens, H, D]`` with ``cu_seqlens``) -> ``(out, lse)``.
    ``window_left/right`` as FA4 counts them (``None``: unbounded)."""
    fwd, _ = _internals()
    shared = _shared_keywords(cu_seqlens, max_seqlen, window_left, window_right)
    out, lse = fwd(q, k, v, softmax_scale=scale, causal=causal, softcap=softcap, return_lse=True, **shared)[:2]
    return out, lse
# fmt: on


@flash_attn4.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, window_right, softcap):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if cu_seqlens is None else (q.shape[1], q.shape[0])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


# one line per group of parameters: torch.library.custom_op reads the annotations
# fmt: off
@torch.library.custom_op("ulysses_attn::flash_attn4_backward", mutates_args=())
def flash_attn4_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                         max_seqlen: Optional[int], scale: float, causal: bool, window_left: Optional[int],
                         window_right: Optional[int], softcap: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _internals()
    shared = _shared_keywords(cu_seqlens, max_seqlen, window_left, window_right)
    dq, dk, dv = bwd(q, k, v, out, dout, lse, scale, causal, softcap, **shared)[:3]
    return dq, dk, dv
# fmt: on


@flash_attn4_backward.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *ctx.options = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.set_materialize_grads(False)  # an unused lse (the usual case) comes back as None: no extra kernel


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout  # only the lse was used
    dq, dk, dv = flash_attn4_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.options)
    if dlse is not None:  # the lse was used too (e.g. to merge with other attention): its share
        dq_lse, dk_lse = _lse_gradient(dlse, q, k, v, out, lse, cu_seqlens, ctx.options)
        dq, dk = dq + dq_lse, dk + dk_lse
    return dq, dk, dv, None, None, None, None, None, None, None


def _lse_gradient(dlse, q, k, v, out, lse, cu_seqlens, options):
    """The gradient that ``dlse`` adds to ``q`` and ``k``, from FA4's own backward kernel.

    ``d lse_i / d s_ij = P_ij``, so the lse adds ``dS_ij = P_ij * dlse_i`` to the scores' gradient.
    The flash backward computes ``dS = P * (dO V^T - D)`` with ``D_i = rowsum(dO_i * O_i)``: called
    with ``V = 0`` and an ``(O, dO)`` pair whose row sums are ``-dlse`` it returns exactly that share
    (window and soft-cap handled by the kernel as for the output). ``-dlse`` is carried in two
    columns, a high and a low part, so that a bf16 ``O`` keeps it to about fp32 precision."""
    rows = -(dlse.transpose(1, 2) if cu_seqlens is None else dlse.t())  # lse's layout -> out's [..., H]
    high = rows.to(out.dtype)
    fake_out = torch.zeros_like(out)
    fake_out[..., 0], fake_out[..., 1] = high, (rows - high.to(rows.dtype)).to(out.dtype)
    fake_dout = torch.zeros_like(out)
    fake_dout[..., :2] = 1
    dq, dk, _ = flash_attn4_backward(fake_dout, q, k, torch.zeros_like(v), fake_out, lse, cu_seqlens, *options)
    return dq, dk


flash_attn4.register_autograd(_backward, setup_context=_setup_context)
