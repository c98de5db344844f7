"""FlashAttention-4 as a registered op (``ulysses_attn.kernels.flash4``), on CPU.

FA4 needs a Hopper GPU, so these tests put a stand-in for its internal ``_flash_attn_fwd`` /
``_flash_attn_bwd`` (the exact reference kernel, float64) behind the op. They check the op's
plumbing -- arguments, dense and packed layouts, window, autograd, that selective checkpointing sees
and keeps it -- not FA4 itself; the real kernel is checked on the GPU (tests/gpu/sp_checks.py).
"""

from __future__ import annotations

import importlib
import logging
import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ulysses_attn import selective_checkpoint as sc
from ulysses_attn.kernels import flash4
from ulysses_attn.kernels.flash_attn import flash_attn
from ulysses_attn.kernels.reference import reference as reference_kernel
from ulysses_attn.layout import Layout, layout_from_positions
from ulysses_attn.state import STATE

# the module, not the flash_attn function that ulysses_attn.kernels exports under the same name
FLASH_ATTN = importlib.import_module("ulysses_attn.kernels.flash_attn")


def _layout(cu_seqlens, tokens):
    if cu_seqlens is None:
        return Layout()
    starts = torch.zeros(1, tokens, dtype=torch.long)
    starts[0, cu_seqlens[1:-1].long()] = 1
    return Layout(segment_ids=starts.cumsum(1))


def _stand_in(calls):
    """FA4's internal functions, with their parameter names, computed by the reference kernel."""

    def reference(q, k, v, cu_seqlens_q, scale, causal, softcap, window_left):
        dense = cu_seqlens_q is None
        if not dense:
            q, k, v = (t[None] for t in (q, k, v))
        out = reference_kernel(q, k, v, _layout(cu_seqlens_q, q.shape[1]), causal=causal, scale=scale,
                                 dropout=0.0, window=None if window_left is None else window_left + 1,
                                 softcap=softcap)
        return (out if dense else out[0]).contiguous()  # FA4 allocates a contiguous output

    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, softmax_scale=None, causal=False, softcap=None, window_size_left=None,
                        window_size_right=None, return_lse=False):
        calls.append("fwd")
        out = reference(q, k, v, cu_seqlens_q, softmax_scale, causal, softcap, window_size_left)
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if cu_seqlens_q is None else (q.shape[1], q.shape[0])
        return out, torch.zeros(lse_shape, dtype=torch.float32), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False):
        calls.append("bwd")
        _, vjp = torch.func.vjp(
            lambda q, k, v: reference(q, k, v, cu_seqlens_q, softmax_scale, causal, softcap, window_size_left),
            q, k, v)
        return vjp(dout)

    return types.SimpleNamespace(_flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)


@pytest.fixture
def fa4(monkeypatch):
    """The ``flash_attn`` kernel on CPU as FA4 with the stand-in; yields the list of kernel calls."""
    calls: list[str] = []
    monkeypatch.setattr(flash4, "_load_interface", lambda: _stand_in(calls))
    monkeypatch.setattr(FLASH_ATTN, "_module_on", lambda device: types.SimpleNamespace(__name__="flash_attn.cute"))
    flash4._internals.cache_clear()
    yield calls
    flash4._internals.cache_clear()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 12, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 12, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


LAYOUTS = {
    "dense": lambda: Layout(),
    "packed": lambda: layout_from_positions(torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]), None),
    "left-padded": lambda: layout_from_positions(None, torch.tensor([[0, 0, 0] + [1] * 9])),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 5.0)])
def test_flash_attn4_op_equals_the_reference_kernel(fa4, layout, window, softcap):
    layout = LAYOUTS[layout]()
    opts = dict(causal=True, scale=0.3, dropout=0.0, window=window, softcap=softcap)
    q, k, v = _inputs()
    out = flash_attn(q, k, v, layout, **opts)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_kernel(q, k, v, layout, **opts)
    if layout.indices is not None:  # ignored (left-pad) rows: the varlen output is zero there
        ref = ref * (layout.segment_ids >= 0)[..., None, None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fa4 == ["fwd", "bwd"]


def test_selective_checkpointing_keeps_the_flash_attn4_output(fa4):
    assert sc.is_attention_op(torch.ops.ulysses_attn.flash_attn4.default)
    assert not sc.is_attention_op(torch.ops.ulysses_attn.flash_attn4_backward.default)
    opts = dict(causal=True, scale=0.3, dropout=0.0, window=None, softcap=None)

    def layer(q, k, v):
        return (flash_attn(q.sin(), k, v, Layout(), **opts) * q).sum()

    q, k, v = _inputs()
    checkpoint(layer, q, k, v, use_reentrant=False).backward()
    assert fa4 == ["fwd", "fwd", "bwd"]  # full checkpointing runs the forward kernel again
    recomputed = [t.grad.clone() for t in (q, k, v)]
    fa4.clear()
    before = sc.replayed_attention_outputs()
    for t in (q, k, v):
        t.grad = None
    checkpoint(layer, q, k, v, use_reentrant=False, context_fn=sc._context).backward()
    assert fa4 == ["fwd", "bwd"] and sc.replayed_attention_outputs() == before + 1
    for got, want in zip((q.grad, k.grad, v.grad), recomputed):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_fa4_with_other_internals_goes_through_its_public_function(monkeypatch, caplog):
    calls: list[str] = []
    changed = _stand_in(calls)
    changed._flash_attn_bwd = lambda q, k, v, out, dout, lse: None  # lost its keyword parameters
    monkeypatch.setattr(flash4, "_load_interface", lambda: changed)
    flash4._internals.cache_clear()
    public = []
    fa = types.SimpleNamespace(__name__="flash_attn.cute",
                               flash_attn_func=lambda q, k, v, **kw: public.append(kw) or (q, None))
    monkeypatch.setattr(FLASH_ATTN, "_module_on", lambda device: fa)
    try:
        with caplog.at_level(logging.WARNING, logger="ulysses_attn"):
            assert not flash4.supported()
        assert "internal forward/backward differ" in caplog.text
        q, k, v = _inputs()
        flash_attn(q, k, v, Layout(), causal=True, scale=0.3, dropout=0.0, window=4, softcap=None)
        assert public == [{"softmax_scale": 0.3, "causal": True, "window_size": (3, 0)}] and calls == []
        # under selective checkpointing this FA4 cannot be kept: recomputed, and a warning says so
        monkeypatch.setattr(STATE, "said", set())  # warn_once: say it again
        attend = lambda q: flash_attn(q, k, v, Layout(), causal=True, scale=0.3, dropout=0.0, window=None,
                                                softcap=None).sum()
        with caplog.at_level(logging.WARNING, logger="ulysses_attn"):
            checkpoint(attend, q, use_reentrant=False, context_fn=sc._context).backward()
        assert "cannot keep the outputs of this FlashAttention-4 version" in caplog.text
    finally:
        flash4._internals.cache_clear()


def test_flash_attn4_op_registration(fa4):
    q, k, v = (t.detach().float() for t in _inputs())
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, None, 0.3, True, 3, 0, 0.0)
    torch.library.opcheck(torch.ops.ulysses_attn.flash_attn4.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _causal_scores(q, k, scale, softcap):
    """``(raw, soft-capped and causally masked)`` scores ``[B, H, S, S]`` of ``q [B, S, H, D]``, GQA ``k``."""
    raw = q.transpose(1, 2) @ k.repeat_interleave(q.shape[2] // k.shape[2], 2).permute(0, 2, 3, 1) * scale
    capped = softcap * torch.tanh(raw / softcap) if softcap else raw
    causal = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    return raw, capped.masked_fill(~causal, float("-inf"))


def _flash_style_stand_in():
    """FA4's internals for dense causal attention, written as the flash kernels compute: a real
    log-sum-exp, and a backward that recomputes P from (q, k, lse) and takes D = rowsum(dO * O)
    from the ``out`` it is given (what the lse gradient relies on)."""
    scores = _causal_scores

    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, softmax_scale=None, causal=False, softcap=None, window_size_left=None,
                        window_size_right=None, return_lse=False):
        _, s = scores(q, k, softmax_scale, softcap)
        lse = s.logsumexp(-1)
        p = (s - lse[..., None]).exp()
        out = (p @ v.repeat_interleave(q.shape[2] // v.shape[2], 2).transpose(1, 2)).transpose(1, 2)
        return out.contiguous(), lse, None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False):
        groups = q.shape[2] // k.shape[2]
        raw, s = scores(q, k, softmax_scale, softcap)
        p = (s - lse[..., None]).exp()
        do, o = dout.transpose(1, 2), out.transpose(1, 2)
        vh, kh = (t.repeat_interleave(groups, 2).transpose(1, 2) for t in (v, k))
        ds = p * (do @ vh.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
        if softcap:
            ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
        dq = (ds @ kh * softmax_scale).transpose(1, 2)
        fold = lambda t: t.transpose(1, 2).unflatten(2, (k.shape[2], groups)).sum(3)  # noqa: E731
        return dq, fold(ds.transpose(-1, -2) @ q.transpose(1, 2) * softmax_scale), fold(p.transpose(-1, -2) @ do)

    return types.SimpleNamespace(_flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("uses_out", [True, False])
def test_flash_attn4_op_gradient_of_its_lse(monkeypatch, softcap, uses_out):
    """A loss of the op's lse (as when attention outputs are merged, or an attention sink rescales
    them) gets its gradient; it used to be dropped without a word."""
    monkeypatch.setattr(flash4, "_load_interface", _flash_style_stand_in)
    flash4._internals.cache_clear()
    try:
        q, k, v = _inputs(1)
        out, lse = torch.ops.ulysses_attn.flash_attn4(q, k, v, None, None, 0.3, True, None, None, softcap)
        g = torch.Generator().manual_seed(2)
        w_out, w_lse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g,
                                                                                        dtype=lse.dtype)
        loss = (lse * w_lse).sum() + ((out * w_out).sum() if uses_out else 0)
        grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)

        _, s = _causal_scores(q, k, 0.3, softcap)
        ref_lse = s.logsumexp(-1)
        ref_out = (s.softmax(-1) @ v.repeat_interleave(2, 2).transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
        ref_loss = (ref_lse * w_lse).sum() + ((ref_out * w_out).sum() if uses_out else 0)
        for got, want in zip(grads, torch.autograd.grad(ref_loss, (q, k, v), allow_unused=True)):
            if want is None or not want.abs().max() > 0:
                assert got is None or got.abs().max() == 0
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    finally:
        flash4._internals.cache_clear()


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_flash_attn_kernel_applies_attention_sinks_through_the_fa4_lse(monkeypatch, softcap):
    """With sinks (gpt-oss) the FA4 path rescales the output by sigmoid(lse - sink): equal to the
    reference kernel's softmax over [scores, sink], gradients of q, k, v and the sinks included."""
    monkeypatch.setattr(flash4, "_load_interface", _flash_style_stand_in)
    monkeypatch.setattr(FLASH_ATTN, "_module_on", lambda device: types.SimpleNamespace(__name__="flash_attn.cute"))
    flash4._internals.cache_clear()
    try:
        q, k, v = _inputs(4)
        sinks = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
        opts = dict(causal=True, scale=0.3, dropout=0.0, window=None, softcap=softcap or None, sinks=sinks)
        out = flash_attn(q, k, v, Layout(), **opts)
        ref = reference_kernel(q, k, v, Layout(), **opts)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert (out - reference_kernel(q, k, v, Layout(), **{**opts, "sinks": None})).abs().max() > 1e-3
        dout = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (q, k, v, sinks), dout),
                             torch.autograd.grad(ref, (q, k, v, sinks), dout)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    finally:
        flash4._internals.cache_clear()
