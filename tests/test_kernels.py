"""The inner attention kernels (``ulysses_attn.kernels``): each kernel against exact per-document
attention (packed rows, padding, window, softcap), the SDPA length rounding for cuDNN, and the
automatic choice of kernel on CPU and -- with the device's answers stood in -- on CUDA GPUs.
FlashAttention-4's registered op: tests/test_flash4.py."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_positions

from ulysses_attn import kernels
from ulysses_attn.layout import Layout, layout_from_positions

# The kernel modules, where the kernels look their helpers up (monkeypatch there). Imported by name:
# ``ulysses_attn.kernels.sdpa`` / ``.flash_attn`` as attributes are the kernel functions of the same name.
DEVICE = importlib.import_module("ulysses_attn.kernels.device")
SDPA = importlib.import_module("ulysses_attn.kernels.sdpa")
FLASH_ATTN = importlib.import_module("ulysses_attn.kernels.flash_attn")


def _rand_qkv(b, s, h, hkv, d, seed=0, dtype=torch.float32):  # the reference kernel computes in fp32
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, n, d, generator=g, dtype=dtype) for n in (h, hkv, hkv))


def _run(kernel, q, k, v, layout, causal=True, window=None, softcap=None):
    fn = kernels.KERNELS[kernel].fn
    return fn(q, k, v, layout, causal=causal, scale=q.shape[-1] ** -0.5, dropout=0.0, window=window, softcap=softcap)


def _standalone(q, k, v, causal=True):
    """torch SDPA on one document: [L, H, D] inputs."""
    rep = q.shape[1] // k.shape[1]
    qt, kt, vt = (
        q.transpose(0, 1),
        k.repeat_interleave(rep, 1).transpose(0, 1),
        v.repeat_interleave(rep, 1).transpose(0, 1),
    )
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(0, 1)


def _segments(lens):
    start = 0
    for n in lens:
        yield start, start + n
        start += n


@pytest.mark.parametrize("causal", [True, False])
def test_reference_kernel_equals_per_document_attention(causal):
    rows = ((5, 7, 4), (9, 7))
    q, k, v = _rand_qkv(2, 16, 4, 2, 8)
    out = _run("reference", q, k, v, layout_from_positions(packed_positions(*rows), None, causal), causal)
    for b, lens in enumerate(rows):
        for s, e in _segments(lens):
            torch.testing.assert_close(out[b, s:e], _standalone(q[b, s:e], k[b, s:e], v[b, s:e], causal))


def test_reference_kernel_padding():
    q, k, v = _rand_qkv(2, 10, 4, 1, 8, seed=1)
    pos = torch.arange(10).expand(2, 10)
    left = torch.ones(2, 10, dtype=torch.long)
    left[0, :4] = 0
    out = _run("reference", q, k, v, layout_from_positions(pos, left, True))
    assert out[0, :4].eq(0).all()  # ignored tokens produce zeros, not NaN
    torch.testing.assert_close(out[0, 4:], _standalone(q[0, 4:], k[0, 4:], v[0, 4:]))
    torch.testing.assert_close(out[1], _standalone(q[1], k[1], v[1]))
    right = torch.ones(2, 10, dtype=torch.long)
    right[1, 7:] = 0
    out = _run("reference", q, k, v, layout_from_positions(pos, right, False), causal=False)
    torch.testing.assert_close(out[1, :7], _standalone(q[1, :7], k[1, :7], v[1, :7], causal=False))
    torch.testing.assert_close(out[0], _standalone(q[0], k[0], v[0], causal=False))


def _eager_loops(q, k, v, seg, window, softcap, scale):
    """Hand-written attention, one query at a time: same document, causal, within the window."""
    Bq, Sq, Hq, _ = q.shape
    rep = Hq // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Sq):
                keys = [j for j in range(i + 1) if seg[b][j] == seg[b][i] and (window is None or i - j < window)]
                scores = torch.stack([(q[b, i, h] * k[b, j, h // rep]).sum() * scale for j in keys])
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                p = torch.softmax(scores, 0)
                out[b, i, h] = sum(p[n] * v[b, j, h // rep] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("window,softcap", [(3, None), (None, 2.0), (4, 1.5)])
def test_reference_kernel_window_and_softcap(window, softcap):
    rows = ((6, 5), (11,))
    pos = packed_positions(*rows)
    q, k, v = _rand_qkv(2, 11, 4, 2, 8, seed=2)
    q = q * 3  # large logits so that softcap matters
    layout = layout_from_positions(pos, None)
    out = _run("reference", q, k, v, layout, window=window, softcap=softcap)
    seg = layout.segment_ids.tolist()
    torch.testing.assert_close(out, _eager_loops(q, k, v, seg, window, softcap, 8**-0.5))
    # the options do change the result (the test would notice if they were ignored)
    assert not torch.allclose(out, _run("reference", q, k, v, layout))


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_kernel_runs_segments_like_the_reference(causal):
    # packed rows + left padding: one SDPA call per document, ignored tokens get zeros
    pos = packed_positions((5, 7, 4), (9, 7))
    valid = torch.ones(2, 16, dtype=torch.long)
    valid[1, :3] = 0
    layout = layout_from_positions(pos, valid, causal)
    assert layout.seqlens == [5, 7, 4, 6, 7]
    inputs = _rand_qkv(2, 16, 4, 2, 8, seed=4)
    results = []
    for kernel in ("sdpa", "reference"):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        out = _run(kernel, q, k, v, layout, causal)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert results[0][0][1, :3].eq(0).all()


def test_sdpa_rounds_lengths_up_for_cudnn_and_stays_exact(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(DEVICE, "capability", lambda device: (9, 0))
    assert [SDPA.sdpa_length(cuda, s) for s in (16384, 16448, 16385, 1531, 100, 64)] == [
        16384,
        17408,
        17408,
        1536,
        128,
        64,
    ]  # 16 steps per doubling, at least 64 tokens
    assert all(SDPA.sdpa_length(cuda, s) - s < s / 16 + 64 for s in range(1, 70000, 997))
    assert SDPA.sdpa_length(cpu, 16448) == 16448
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    symbolic = ShapeEnv().create_unbacked_symint()  # a length under torch.compile with dynamic shapes
    assert SDPA.sdpa_length(cuda, symbolic) is symbolic
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)  # cuDNN off: no graphs
    assert SDPA.sdpa_length(cuda, 16448) == 16448
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(DEVICE, "capability", lambda device: (8, 0))  # SDPA runs FA2 there: no graphs
    assert SDPA.sdpa_length(cuda, 16448) == 16448
    # the padded call gives the unpadded result and gradients (causal: appended tokens are never seen)
    layout = Layout()
    inputs = _rand_qkv(2, 13, 4, 2, 8, seed=5)
    results = []
    for extra in (0, 7):
        monkeypatch.setattr(SDPA, "sdpa_length", lambda device, S: S + extra)
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        out = _run("sdpa", q, k, v, layout)
        assert out.shape == q.shape
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_attend_dispatch_on_cpu():
    dense, packed = Layout(), layout_from_positions(packed_positions((3, 5)), None)
    assert kernels.choose_kernel(torch.device("cpu"), dense) == "sdpa"
    assert kernels.choose_kernel(torch.device("cpu"), packed) == "sdpa"  # one call per document
    assert kernels.choose_kernel(torch.device("cpu"), dense, window=4) == "reference"
    assert kernels.choose_kernel(torch.device("cpu"), dense, softcap=30.0) == "reference"
    assert kernels.available_kernels("cpu") == ["sdpa", "reference"]
    q, k, v = _rand_qkv(2, 8, 4, 2, 8, seed=3)
    # sdpa (dense, GQA) equals the reference kernel; a window as long as the sequence is no window
    torch.testing.assert_close(kernels.attend(q, k, v, dense), _run("reference", q, k, v, dense))
    torch.testing.assert_close(kernels.attend(q, k, v, dense, window=8), kernels.attend(q, k, v, dense))
    assert not torch.allclose(kernels.attend(q, k, v, dense, window=7), kernels.attend(q, k, v, dense))


@pytest.mark.parametrize(
    "module,with_dropout", [("flash_attn", "flash_attn"), ("flash_attn_interface", "sdpa"), ("flash_attn.cute", "sdpa")]
)
def test_attention_dropout_skips_flashattention_without_it(monkeypatch, module, with_dropout):
    # FA3/FA4 have no attention dropout: the automatic choice moves on instead of picking a kernel that raises
    import types

    monkeypatch.setattr(FLASH_ATTN, "_module_on", lambda device: types.ModuleType(module))
    monkeypatch.setattr(DEVICE, "capability", lambda device: (8, 0))  # FA2 before sdpa
    cuda = torch.device("cuda")
    assert kernels.choose_kernel(cuda, Layout()) == "flash_attn"
    assert kernels.choose_kernel(cuda, Layout(), dropout=0.1) == with_dropout


@pytest.mark.parametrize(
    "module,capability,dense,packed",
    [
        (None, (9, 0), "sdpa", "torch_varlen"),
        ("flash_attn", (9, 0), "sdpa", "flash_attn"),  # cuDNN before FA2 on Hopper, for dense rows
        ("flash_attn", (8, 0), "flash_attn", "flash_attn"),
        ("flash_attn_interface", (9, 0), "flash_attn", "flash_attn"),
        ("flash_attn.cute", (10, 0), "flash_attn", "flash_attn"),
    ],
)
def test_cuda_dispatch_order(monkeypatch, module, capability, dense, packed):
    import types

    monkeypatch.setattr(FLASH_ATTN, "_module_on", lambda device: module and types.ModuleType(module))
    monkeypatch.setattr(DEVICE, "capability", lambda device: capability)
    monkeypatch.setitem(
        kernels.KERNELS,
        "torch_varlen",
        dataclasses.replace(kernels.KERNELS["torch_varlen"], available=lambda device: True),
    )
    cuda = torch.device("cuda")
    packed_layout = layout_from_positions(packed_positions((9000, 8)), None)
    assert kernels.choose_kernel(cuda, Layout()) == dense
    assert kernels.choose_kernel(cuda, packed_layout) == packed
    if module == "flash_attn" and capability[0] >= 9:  # cuDNN switched off: SDPA would run FA2 itself
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
        assert kernels.choose_kernel(cuda, Layout()) == "flash_attn"
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    # a sliding window never goes to sdpa; without flash_attn and torch_varlen, packed rows go to sdpa
    assert kernels.choose_kernel(cuda, Layout(), window=128) == ("flash_attn" if module else "torch_varlen")
    monkeypatch.setitem(
        kernels.KERNELS,
        "torch_varlen",
        dataclasses.replace(kernels.KERNELS["torch_varlen"], available=lambda device: False),
    )
    assert kernels.choose_kernel(cuda, packed_layout) == ("flash_attn" if module else "sdpa")


def test_flash_module_is_told_apart_by_distribution(tmp_path, monkeypatch):
    # flash-attn-4 installs flash_attn/cute without flash_attn/__init__.py: "import flash_attn" then
    # finds a namespace package without flash_attn_func, which must not pass for FA2
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("flash_attn_func = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    FLASH_ATTN.flash_module.cache_clear()
    FLASH_ATTN._module_on.cache_clear()
    try:
        import importlib.util

        assert importlib.util.find_spec("flash_attn") is not None
        assert FLASH_ATTN.flash_module((9, 0)) is None  # no flash-attn / flash-attn-4 distribution
        assert kernels.flash_version(torch.device("cpu")) is None
    finally:
        FLASH_ATTN.flash_module.cache_clear()
        FLASH_ATTN._module_on.cache_clear()
