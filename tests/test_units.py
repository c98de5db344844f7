"""Unit tests: collectives, head bookkeeping, layouts and kernels, batch sharding, collators,
sampler, the evaluation gather, and the transformers compatibility layer (mostly single process;
two 4-process spawns)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ulysses_attn
from distributed import run_distributed
from tiny_models import CONFIGS, REFERENCE_ATTN, VOCAB, build
from ulysses_attn import SequenceParallel, UlyssesCollator, UlyssesSampler, kernels, shard_batch
from ulysses_attn.attention import check_heads, kv_replication, padded_heads
from ulysses_attn.comm import all_gather_seq, all_reduce_sum, gather_heads_scatter_seq, gather_seq_scatter_heads
from ulysses_attn.kernels import Layout, layout_from_positions


def fake_sp(size: int, rank: int, dp_size: int = 1, dp_rank: int = 0) -> SequenceParallel:
    return SequenceParallel(size=size, rank=rank, group=None, dp_size=dp_size, dp_rank=dp_rank, dp_group=None)


# ================================================================================================
# comm: all-to-all round trip and gradients, 4 processes: groups of 4, of 2 (contiguous), of 2 (strided)
# ================================================================================================

B, H, S, D = 2, 8, 12, 3
GROUPS = {"p4": [(0, 1, 2, 3)], "p2": [(0, 1), (2, 3)], "p2_strided": [(0, 2), (1, 3)]}


def _tensor(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _seed(members, tag):  # different data in different groups: mixing groups up cannot go unnoticed
    return 1000 * tag + sum(10**i * m for i, m in enumerate(members))


def _comm_worker(rank, world):
    out = {}
    for name, all_members in GROUPS.items():
        handles = [dist.new_group(list(m)) for m in all_members]  # collective: every rank, same order
        (group, members), = [(g, m) for g, m in zip(handles, all_members) if rank in m]
        P, r = len(members), members.index(rank)
        s, h = S // P, H // P
        X, W = _tensor(_seed(members, 1), B, H, S, D), _tensor(_seed(members, 2), B, H, S, D)
        Y, V = _tensor(_seed(members, 3), B, H, S, D), _tensor(_seed(members, 4), B, H, S, D)

        # before attention: the model hands over a non-contiguous [B, H, S/P, D] view of [B, S/P, H, D]
        x_bshd = X.transpose(1, 2)[:, r * s : (r + 1) * s].clone().requires_grad_()
        y = gather_seq_scatter_heads(x_bshd.transpose(1, 2), group)
        (torch.sin(y) * W[:, r * h : (r + 1) * h]).sum().backward()
        back = gather_heads_scatter_seq(y.detach(), group)

        # after attention: [B, H/P, S, D] -> [B, H, S/P, D]
        y_local = Y[:, r * h : (r + 1) * h].clone().requires_grad_()
        z = gather_heads_scatter_seq(y_local, group)
        (torch.cos(z) * V[:, :, r * s : (r + 1) * s]).sum().backward()

        # differentiable sum and no-grad gather
        a = torch.tensor([float(r + 1)], dtype=torch.float64, requires_grad=True)
        total = all_reduce_sum(a, group)
        (total * (r + 1)).sum().backward()
        gathered = all_gather_seq(X[:, 0, r * s : (r + 1) * s], group)
        # all_gather_seq is differentiable (per-token outputs): each rank's slice gets the sum of
        # every rank's gradient for it
        xg = X[:, 0, r * s : (r + 1) * s].clone().requires_grad_()
        g = all_gather_seq(xg, group)
        (g * _tensor(_seed(members, 5 + r), B, S, D)).sum().backward()
        gather_grad = xg.grad

        out[name] = dict(
            members=members, r=r, y=y.detach(), x_grad=x_bshd.grad.transpose(1, 2), back=back,
            x_local=X[:, :, r * s : (r + 1) * s], z=z.detach(), y_grad=y_local.grad,
            total=total.item(), a_grad=a.grad.item(), gathered=gathered, gather_grad=gather_grad,
        )
    return out


def _reference_comm(members):
    """What every group rank must hold, computed in one process by concatenating the shards."""
    P = len(members)
    s, h = S // P, H // P
    X, W = _tensor(_seed(members, 1), B, H, S, D), _tensor(_seed(members, 2), B, H, S, D)
    Y, V = _tensor(_seed(members, 3), B, H, S, D), _tensor(_seed(members, 4), B, H, S, D)
    x_shards = [X[:, :, j * s : (j + 1) * s].clone().requires_grad_() for j in range(P)]
    full = torch.cat(x_shards, dim=2)
    ys = [full[:, j * h : (j + 1) * h] for j in range(P)]
    sum((torch.sin(y) * W[:, j * h : (j + 1) * h]).sum() for j, y in enumerate(ys)).backward()
    y_shards = [Y[:, j * h : (j + 1) * h].clone().requires_grad_() for j in range(P)]
    full_y = torch.cat(y_shards, dim=1)
    zs = [full_y[:, :, j * s : (j + 1) * s] for j in range(P)]
    sum((torch.cos(z) * V[:, :, j * s : (j + 1) * s]).sum() for j, z in enumerate(zs)).backward()
    return [
        dict(y=ys[j].detach(), x_grad=x_shards[j].grad, z=zs[j].detach(), y_grad=y_shards[j].grad)
        for j in range(P)
    ], X[:, 0]


@pytest.mark.timeout(300)  # a regression into a collective hang fails instead of blocking CI
def test_all_to_all_round_trip_and_gradients():
    results = run_distributed(_comm_worker, 4)
    for name, all_members in GROUPS.items():
        for members in all_members:
            refs, x_row = _reference_comm(members)
            P = len(members)
            for rank in members:
                got = results[rank][name]
                r = got["r"]
                assert got["members"] == members and r == members.index(rank)
                ref = refs[r]
                assert got["y"].shape == (B, H // P, S, D)
                assert torch.equal(got["y"], ref["y"]), (name, rank)  # pure data movement: exact
                assert torch.equal(got["back"], got["x_local"]), (name, rank)  # inverse: exact round trip
                torch.testing.assert_close(got["x_grad"], ref["x_grad"], rtol=0, atol=1e-12)
                assert got["z"].shape == (B, H, S // P, D)
                assert torch.equal(got["z"], ref["z"]), (name, rank)
                torch.testing.assert_close(got["y_grad"], ref["y_grad"], rtol=0, atol=1e-12)
                assert got["total"] == P * (P + 1) / 2  # sum of (r + 1) over the group
                assert got["a_grad"] == P * (P + 1) / 2  # d/da_r sum_j (j + 1) * total = sum_j (j + 1)
                assert torch.equal(got["gathered"], x_row)
                s = S // P
                want = sum(_tensor(_seed(members, 5 + j), B, S, D) for j in range(P))[:, r * s : (r + 1) * s]
                torch.testing.assert_close(got["gather_grad"], want, rtol=0, atol=1e-12)


def _eval_gather_worker(rank, world):
    from accelerate import Accelerator

    from ulysses_attn.integrations.trainer import install_metrics_gather

    sp = ulysses_attn.init_sequence_parallel(2)  # SP groups (0, 1), (2, 3); DP groups (0, 2), (1, 3)
    accelerator = Accelerator(cpu=True)
    install_metrics_gather(accelerator, sp, sharded_inputs=True)
    full = [torch.arange(4), torch.arange(100, 108)][sp.dp_rank]  # DP groups hold different lengths
    shard = full.view(1, -1).chunk(2, dim=1)[sp.rank]
    # what Trainer.evaluation_loop does with per-token tensors: pad over the world, then gather
    labels = accelerator.gather_for_metrics(accelerator.pad_across_processes(shard, dim=1, pad_index=-100))
    losses = accelerator.gather_for_metrics(torch.tensor([10.0 * sp.dp_rank + sp.rank]))
    return labels, losses


@pytest.mark.timeout(300)
def test_eval_gather_pads_whole_sequences_when_dp_groups_differ_in_length():
    want = torch.tensor([[0, 1, 2, 3, -100, -100, -100, -100], list(range(100, 108))])
    for labels, losses in run_distributed(_eval_gather_worker, 4):
        assert torch.equal(labels, want)  # padding after each sequence, never between its shards
        assert torch.equal(losses, torch.tensor([0.5, 10.5]))  # per-sample values: mean over the SP group


# ================================================================================================
# head bookkeeping
# ================================================================================================


@pytest.mark.parametrize(
    "heads,kv_heads,sp,rep",
    [(32, 8, 4, 1), (4, 1, 4, 4), (28, 4, 4, 1), (4, 2, 4, 2), (8, 2, 8, 4), (16, 16, 4, 1), (32, 8, 1, 1), (12, 3, 4, 4)],
)
def test_kv_replication_values(heads, kv_heads, sp, rep):
    check_heads(heads, kv_heads)
    assert kv_replication(heads, kv_heads, sp) == rep


def test_kv_replication_keeps_each_query_with_its_kv_head():
    """For every valid (H, Hkv, P): after repeat_interleave(rep), the replicated KV heads split evenly
    over P ranks and each rank's query heads find their own KV head among the rank's KV heads."""
    checked = 0
    for heads in range(1, 33):
        for kv in (d for d in range(1, heads + 1) if heads % d == 0):
            for p in (d for d in range(1, heads + 1) if heads % d == 0):
                check_heads(heads, kv)
                rep = kv_replication(heads, kv, p)
                kv2 = kv * rep
                assert kv2 % p == 0 and heads % kv2 == 0
                for r in range(p):
                    local_kv = range(r * kv2 // p, (r + 1) * kv2 // p)
                    for qh in range(r * heads // p, (r + 1) * heads // p):
                        # GQA inside the rank: local query head i uses local kv head i // (heads / kv2)
                        i = qh - r * heads // p
                        kv_repl = local_kv[i // (heads // kv2)]
                        assert kv_repl // rep == qh // (heads // kv), (heads, kv, p, qh)
                checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    "heads,kv_heads,sp,padded,grouped",
    [(28, 4, 8, 32, True), (6, 2, 4, 8, True), (5, 1, 2, 6, True), (12, 2, 8, 16, True), (28, 4, 4, 28, True),
     (15, 3, 2, 16, False), (15, 3, 4, 16, False), (32, 8, 8, 32, True)],
)
def test_padded_heads(heads, kv_heads, sp, padded, grouped):
    assert padded_heads(heads, kv_heads, sp) == (padded, grouped)
    assert padded % sp == 0 and padded >= heads
    if grouped:  # a valid GQA shape: every rank's query heads find their KV heads locally
        assert padded % kv_heads == 0
        kv2 = kv_heads * kv_replication(padded, kv_heads, sp)
        assert kv2 % sp == 0 and padded % kv2 == 0


def test_pad_and_unpad_heads_round_trip():
    from ulysses_attn.attention import _pad_heads, _unpad_heads

    q = torch.randn(2, 5, 6, 3).transpose(1, 2)  # [B, H, S, D] as transformers passes it: not contiguous
    k, v = torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3)
    for padded, grouped in ((8, True), (8, False)):
        pq, pk, pv = _pad_heads(q, k, v, padded, grouped)
        assert pq.shape[1] == padded and pk.shape[1] == (2 if grouped else padded)
        torch.testing.assert_close(_unpad_heads(pq, 6, 2, grouped), q)
        if grouped:  # query head i of group j is still paired with KV head j
            assert (pq.view(2, 2, 4, 5, 3)[:, :, 3] == 0).all()


def test_head_padding_warns_once_with_the_sizes_that_need_none(caplog):
    from ulysses_attn.attention import _warn_head_padding

    with caplog.at_level("WARNING", logger="ulysses_attn.attention"):
        _warn_head_padding(28, 4, 8, *padded_heads(28, 4, 8))
        _warn_head_padding(28, 4, 8, *padded_heads(28, 4, 8))
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "28 query heads" in msg and "padding to 32 heads" in msg and "sending 8 KV heads" in msg, msg
    assert "[1, 2, 4, 7, 14, 28]" in msg


# ================================================================================================
# layouts and kernels
# ================================================================================================


def _packed_positions(*rows):
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


def test_layout_dense_cases():
    pos = torch.arange(10).expand(3, 10)
    assert layout_from_positions(pos, None).dense
    assert layout_from_positions(None, None).dense
    assert layout_from_positions(pos + 7, None).dense  # a shard's global positions do not restart
    assert layout_from_positions(pos, torch.ones(3, 10)).dense
    right = torch.ones(3, 10, dtype=torch.long)
    right[1, 6:] = 0
    right[2, 3:] = 0
    assert layout_from_positions(pos, right, causal=True).dense  # trailing pads ignored under causal
    lay = layout_from_positions(pos, right, causal=False)  # but not without causal masking
    assert not lay.dense
    assert lay.segment_ids[1, 6:].eq(-1).all() and lay.segment_ids[2, 3:].eq(-1).all()
    assert lay.cu_seqlens.tolist() == [0, 10, 16, 19] and lay.max_seqlen == 10


def test_layout_left_padding_kept():
    pos = torch.arange(8).expand(2, 8)
    valid = torch.ones(2, 8, dtype=torch.long)
    valid[0, :3] = 0
    lay = layout_from_positions(pos, valid, causal=True)
    assert not lay.dense
    assert lay.segment_ids[0, :3].eq(-1).all() and lay.segment_ids[0, 3:].eq(lay.segment_ids[0, 3]).all()
    assert lay.segment_ids[1].eq(lay.segment_ids[1, 0]).all() and lay.segment_ids[1, 0] != lay.segment_ids[0, 3]
    assert lay.indices.tolist() == list(range(3, 16))
    assert lay.cu_seqlens.tolist() == [0, 5, 13] and lay.max_seqlen == 8


def test_layout_packed_cu_seqlens():
    pos = _packed_positions((4, 3, 5), (12,), (6, 6))
    lay = layout_from_positions(pos, None)
    assert not lay.dense and lay.indices is None  # nothing dropped
    assert lay.cu_seqlens.dtype == torch.int32
    assert lay.cu_seqlens.tolist() == [0, 4, 7, 12, 24, 30, 36]
    assert lay.max_seqlen == 12
    assert lay.segment_ids[0].tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert lay.segment_ids[1].eq(3).all() and lay.segment_ids[2].tolist() == [4] * 6 + [5] * 6
    # packing + left padding: pads dropped, documents kept
    valid = torch.ones_like(pos)
    valid[2, :2] = 0
    lay = layout_from_positions(pos, valid)
    assert lay.cu_seqlens.tolist() == [0, 4, 7, 12, 24, 28, 34]
    assert lay.indices.numel() == 34 and 24 not in lay.indices.tolist() and 25 not in lay.indices.tolist()


def _rand_qkv(b, s, h, hkv, d, seed=0, dtype=torch.float32):  # the reference kernel computes in fp32
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, n, d, generator=g, dtype=dtype) for n in (h, hkv, hkv))


def _run(kernel, q, k, v, layout, causal=True, window=None, softcap=None):
    fn = kernels.KERNELS[kernel].fn
    return fn(q, k, v, layout, causal=causal, scale=q.shape[-1] ** -0.5, dropout=0.0, window=window, softcap=softcap)


def _standalone(q, k, v, causal=True):
    """torch SDPA on one document: [L, H, D] inputs."""
    rep = q.shape[1] // k.shape[1]
    qt, kt, vt = q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1)
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
    out = _run("reference", q, k, v, layout_from_positions(_packed_positions(*rows), None, causal), causal)
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
    pos = _packed_positions(*rows)
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
    pos = _packed_positions((5, 7, 4), (9, 7))
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
    monkeypatch.setattr(kernels, "_capability", lambda device: (9, 0))
    assert [kernels._sdpa_length(cuda, s) for s in (16384, 16448, 16385, 1531, 100, 64)] == [
        16384, 17408, 17408, 1536, 128, 64]  # 16 steps per doubling, at least 64 tokens
    assert all(kernels._sdpa_length(cuda, s) - s < s / 16 + 64 for s in range(1, 70000, 997))
    assert kernels._sdpa_length(cpu, 16448) == 16448
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    symbolic = ShapeEnv().create_unbacked_symint()  # a length under torch.compile with dynamic shapes
    assert kernels._sdpa_length(cuda, symbolic) is symbolic
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)  # cuDNN off: no graphs
    assert kernels._sdpa_length(cuda, 16448) == 16448
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(kernels, "_capability", lambda device: (8, 0))  # SDPA runs FA2 there: no graphs
    assert kernels._sdpa_length(cuda, 16448) == 16448
    # the padded call gives the unpadded result and gradients (causal: appended tokens are never seen)
    layout = Layout()
    inputs = _rand_qkv(2, 13, 4, 2, 8, seed=5)
    results = []
    for extra in (0, 7):
        monkeypatch.setattr(kernels, "_sdpa_length", lambda device, S: S + extra)
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        out = _run("sdpa", q, k, v, layout)
        assert out.shape == q.shape
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_attend_dispatch_on_cpu():
    dense, packed = Layout(), layout_from_positions(_packed_positions((3, 5)), None)
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


@pytest.mark.parametrize("module,with_dropout", [("flash_attn", "flash_attn"), ("flash_attn_interface", "sdpa"),
                                                  ("flash_attn.cute", "sdpa")])
def test_attention_dropout_skips_flashattention_without_it(monkeypatch, module, with_dropout):
    # FA3/FA4 have no attention dropout: the automatic choice moves on instead of picking a kernel that raises
    import types

    monkeypatch.setattr(kernels, "_flash_module_on", lambda device: types.ModuleType(module))
    monkeypatch.setattr(kernels, "_capability", lambda device: (8, 0))  # FA2 before sdpa
    cuda = torch.device("cuda")
    assert kernels.choose_kernel(cuda, Layout()) == "flash_attn"
    assert kernels.choose_kernel(cuda, Layout(), dropout=0.1) == with_dropout


@pytest.mark.parametrize("module,capability,dense,packed", [
    (None, (9, 0), "sdpa", "torch_varlen"),
    ("flash_attn", (9, 0), "sdpa", "flash_attn"),  # cuDNN before FA2 on Hopper, for dense rows
    ("flash_attn", (8, 0), "flash_attn", "flash_attn"),
    ("flash_attn_interface", (9, 0), "flash_attn", "flash_attn"),
    ("flash_attn.cute", (10, 0), "flash_attn", "flash_attn"),
])
def test_cuda_dispatch_order(monkeypatch, module, capability, dense, packed):
    import types

    monkeypatch.setattr(kernels, "_flash_module_on", lambda device: module and types.ModuleType(module))
    monkeypatch.setattr(kernels, "_capability", lambda device: capability)
    monkeypatch.setitem(kernels.KERNELS, "torch_varlen",
                        dataclasses.replace(kernels.KERNELS["torch_varlen"], available=lambda device: True))
    cuda = torch.device("cuda")
    packed_layout = layout_from_positions(_packed_positions((9000, 8)), None)
    assert kernels.choose_kernel(cuda, Layout()) == dense
    assert kernels.choose_kernel(cuda, packed_layout) == packed
    if module == "flash_attn" and capability[0] >= 9:  # cuDNN switched off: SDPA would run FA2 itself
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
        assert kernels.choose_kernel(cuda, Layout()) == "flash_attn"
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    # a sliding window never goes to sdpa; without flash_attn and torch_varlen, packed rows go to sdpa
    assert kernels.choose_kernel(cuda, Layout(), window=128) == ("flash_attn" if module else "torch_varlen")
    monkeypatch.setitem(kernels.KERNELS, "torch_varlen",
                        dataclasses.replace(kernels.KERNELS["torch_varlen"], available=lambda device: False))
    assert kernels.choose_kernel(cuda, packed_layout) == ("flash_attn" if module else "sdpa")


def test_flash_module_is_told_apart_by_distribution(tmp_path, monkeypatch):
    # flash-attn-4 installs flash_attn/cute without flash_attn/__init__.py: "import flash_attn" then
    # finds a namespace package without flash_attn_func, which must not pass for FA2
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("flash_attn_func = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kernels._flash_module.cache_clear()
    kernels._flash_module_on.cache_clear()
    try:
        import importlib.util

        assert importlib.util.find_spec("flash_attn") is not None
        assert kernels._flash_module((9, 0)) is None  # no flash-attn / flash-attn-4 distribution
        assert kernels.flash_version(torch.device("cpu")) is None
    finally:
        kernels._flash_module.cache_clear()
        kernels._flash_module_on.cache_clear()


# ================================================================================================
# shard_batch
# ================================================================================================


def _batch(bsz=2, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


WHOLE_BATCH = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _check_whole_batch_keys(shard, cu, max_len):
    """A shard may carry cu_seq_lens/max_length (all or none); if it does they must describe the
    documents of the full, padded sequence, never the caller's stale values."""
    present = [k for k in WHOLE_BATCH if k in shard]
    assert present in ([], list(WHOLE_BATCH)), present
    if present:
        assert shard["cu_seq_lens_q"].tolist() == cu and shard["cu_seq_lens_k"].tolist() == cu
        assert int(shard["max_length_q"]) == max_len and int(shard["max_length_k"]) == max_len


def _shards(batch, P, **kw):
    return [shard_batch(batch, sp=fake_sp(P, r), **kw) for r in range(P)]


def test_shard_batch_pads_and_shifts_on_full_sequence():
    batch = _batch()
    P, seq, padded = 4, 10, 12
    shards = _shards(batch, P, pad_token_id=7)
    for sh in shards:
        assert set(sh) == {"input_ids", "attention_mask", "labels", "shift_labels", "position_ids"}
        assert all(v.shape == (2, padded // P) for v in sh.values())
        assert all(v.is_contiguous() for v in sh.values())
    full = {k: torch.cat([sh[k] for sh in shards], dim=1) for k in shards[0]}
    assert torch.equal(full["input_ids"][:, :seq], batch["input_ids"]) and full["input_ids"][:, seq:].eq(7).all()
    assert torch.equal(full["attention_mask"][:, :seq], batch["attention_mask"])
    assert full["attention_mask"][:, seq:].eq(0).all()
    assert torch.equal(full["labels"][:, :seq], batch["labels"]) and full["labels"][:, seq:].eq(-100).all()
    assert torch.equal(full["position_ids"], torch.arange(padded).expand(2, padded))  # positions continue
    # shift_labels: token t predicts label t+1 of the FULL sequence, including across shard boundaries
    expect = torch.full((2, padded), -100)
    expect[:, : seq - 1] = batch["labels"][:, 1:]
    assert torch.equal(full["shift_labels"], expect)
    local = padded // P
    for r in range(P - 1):  # the last target of every shard but the last is the next shard's first label
        assert torch.equal(shards[r]["shift_labels"][0, -1], batch["labels"][0, (r + 1) * local])
        assert shards[r]["shift_labels"][0, -1] != -100
    # input is not modified
    assert batch.keys() == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (2, seq)


def test_shard_batch_keeps_given_positions_and_shift_labels():
    pos = _packed_positions((4, 5))  # [1, 9]
    ids = torch.arange(1, 10)[None]
    shift = torch.arange(100, 109)[None]
    embeds = torch.randn(1, 9, 6)
    batch = {"input_ids": ids, "position_ids": pos, "shift_labels": shift, "inputs_embeds": embeds,
             "cu_seq_lens_q": torch.tensor([0, 4, 9]), "cu_seq_lens_k": torch.tensor([0, 4, 9]),
             "max_length_q": 5, "max_length_k": 5, "seq_idx": torch.tensor([[0] * 4 + [1] * 5]),
             "num_items_in_batch": torch.tensor(7), "meta": ["not", "a", "tensor"]}
    shards = _shards(batch, 2)
    for sh in shards:
        # whole-batch keys of the caller's (unpadded) batch are never passed on as they were
        assert "seq_idx" not in sh
        _check_whole_batch_keys(sh, cu=[0, 4, 10], max_len=6)
        assert sh["meta"] == ["not", "a", "tensor"] and sh["num_items_in_batch"].item() == 7
        assert "labels" not in sh
    full = {k: torch.cat([sh[k] for sh in shards], dim=1) for k in ("input_ids", "position_ids", "shift_labels", "inputs_embeds")}
    assert full["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]  # the last document continues
    assert full["shift_labels"].tolist() == [list(range(100, 109)) + [-100]]  # given shift_labels kept as is
    assert torch.equal(full["inputs_embeds"][:, :9], embeds) and full["inputs_embeds"][:, 9:].eq(0).all()
    assert full["input_ids"].tolist() == [list(range(1, 10)) + [0]]


def test_shard_batch_broadcast_positions_and_no_sp():
    batch = _batch(bsz=3, seq=8)
    batch["position_ids"] = torch.arange(8)[None]  # [1, S] for the whole batch
    out = shard_batch(batch)  # no SP initialised: same code path, nothing sharded
    assert out["input_ids"].shape == (3, 8) and out["position_ids"].shape == (3, 8)
    assert torch.equal(out["position_ids"], torch.arange(8).expand(3, 8))
    assert torch.equal(out["shift_labels"][:, :-1], batch["labels"][:, 1:]) and out["shift_labels"][:, -1].eq(-100).all()
    shards = _shards(batch, 2)
    assert [s["position_ids"].tolist() for s in shards] == [[list(range(4))] * 3, [list(range(4, 8))] * 3]
    with pytest.raises(ValueError, match="sequence length"):
        shard_batch({"attention_mask": torch.ones(1, 4)})


# ================================================================================================
# collators
# ================================================================================================


def _features(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lens:
        ids = torch.randint(5, 50, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": list(ids)})
    return feats


def test_collator_with_flattening():
    from transformers import DataCollatorWithFlattening

    base = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    feats = _features((5, 3, 6))
    flat = base(feats)
    assert flat["input_ids"].shape == (1, 14) and "cu_seq_lens_q" in flat
    P = 4
    shards = [UlyssesCollator(base, sp=fake_sp(P, r))(feats) for r in range(P)]
    for sh in shards:
        assert set(sh) - set(WHOLE_BATCH) == {"input_ids", "labels", "position_ids", "shift_labels"}
        _check_whole_batch_keys(sh, cu=[0, 5, 8, 16], max_len=8)  # the last document runs into the padding
        assert sh["input_ids"].shape == (1, 4)
    full = {k: torch.cat([sh[k] for sh in shards], 1) for k in shards[0] if k not in WHOLE_BATCH}
    assert full["input_ids"].tolist() == [flat["input_ids"][0].tolist() + [0, 0]]
    assert full["labels"].tolist() == [flat["labels"][0].tolist() + [-100, -100]]
    assert full["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]]
    shift = full["shift_labels"][0].tolist()
    ids = flat["input_ids"][0].tolist()
    # within a document the target is the next token; at a document's end nothing (-100)
    assert shift[:4] == ids[1:5] and shift[4] == -100 and shift[5:7] == ids[6:8] and shift[7] == -100
    assert shift[8:13] == ids[9:14] and shift[13:] == [-100, -100, -100]


def _tiny_tokenizer(pad_id=3):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(60) if i not in (0, pad_id)}
    vocab.update({"[UNK]": 0, "[PAD]": pad_id})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_collator_with_seq2seq_collator():
    from transformers import DataCollatorForSeq2Seq

    tok = _tiny_tokenizer(pad_id=3)
    assert tok.pad_token_id == 3
    base = DataCollatorForSeq2Seq(tok, padding=True)
    feats = _features((5, 3))
    ref = base(feats)
    P = 2
    collators = [UlyssesCollator(base, sp=fake_sp(P, r)) for r in range(P)]
    assert collators[0].pad_token_id == 3  # taken from the wrapped collator's tokenizer
    assert collators[0].tokenizer is tok and collators[0].padding is True  # behaves like the wrapped collator
    shards = [c(feats) for c in collators]
    full = {k: torch.cat([sh[k] for sh in shards], 1) for k in shards[0]}
    assert full["input_ids"].shape == (2, 6)
    assert torch.equal(full["input_ids"][:, :5], ref["input_ids"]) and full["input_ids"][:, 5].eq(3).all()
    assert full["input_ids"][1, 3:].eq(3).all()
    assert full["attention_mask"].tolist() == [[1] * 5 + [0], [1] * 3 + [0] * 3]
    assert full["labels"][1, 3:].eq(-100).all() and full["labels"][:, 5].eq(-100).all()
    assert torch.equal(full["shift_labels"][:, :4], ref["labels"][:, 1:])
    assert full["position_ids"].tolist() == [list(range(6))] * 2
    # explicit pad id wins; pickling works (DataLoader workers) and keeps the behaviour
    assert UlyssesCollator(base, pad_token_id=9).pad_token_id == 9
    clone = pickle.loads(pickle.dumps(collators[1]))
    assert torch.equal(clone(feats)["input_ids"], shards[1]["input_ids"])
    with pytest.raises(AttributeError):
        collators[0].no_such_attribute


def test_collator_default_base():
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}] * 2
    shards = [UlyssesCollator(sp=fake_sp(2, r))(feats) for r in range(2)]
    assert shards[0]["input_ids"].tolist() == [[1, 2, 3]] * 2 and shards[1]["input_ids"].tolist() == [[4, 5, 0]] * 2
    assert shards[0]["shift_labels"].tolist() == [[2, 3, 4]] * 2 and shards[1]["shift_labels"].tolist() == [[5, -100, -100]] * 2


# ================================================================================================
# sampler
# ================================================================================================


def test_sampler_groups():
    data = list(range(20))
    orders = {
        (dp, sp): list(UlyssesSampler(data, seed=3, sp=fake_sp(2, sp, dp_size=2, dp_rank=dp))) for dp in (0, 1) for sp in (0, 1)
    }
    assert orders[0, 0] == orders[0, 1] and orders[1, 0] == orders[1, 1]  # one SP group: same samples, same order
    assert len(orders[0, 0]) == 10 and not set(orders[0, 0]) & set(orders[1, 0])  # groups disjoint
    assert sorted(orders[0, 0] + orders[1, 0]) == data
    assert orders[0, 0] != sorted(orders[0, 0])  # shuffled


def test_sampler_epochs_are_deterministic():
    data = list(range(50))

    def order(epoch, dp_rank=0, seed=3):
        s = UlyssesSampler(data, seed=seed, sp=fake_sp(4, 1, dp_size=2, dp_rank=dp_rank))
        s.set_epoch(epoch)
        return list(s)

    assert order(0) == order(0) and order(1) == order(1)  # same epoch, fresh sampler: same order (resume)
    assert order(0) != order(1)
    assert order(0, seed=4) != order(0)
    assert not set(order(1, 0)) & set(order(1, 1))
    unshuffled = UlyssesSampler(data, shuffle=False, sp=fake_sp(4, 1, dp_size=2, dp_rank=1))
    assert list(unshuffled) == list(range(1, 50, 2))


def test_sampler_uses_process_wide_handle():
    assert list(UlyssesSampler(list(range(6)), shuffle=False)) == list(range(6))  # no SP: one replica
    ulysses_attn.init_sequence_parallel(1)
    s = UlyssesSampler(list(range(6)), shuffle=False)
    assert (s.num_replicas, s.rank) == (1, 0) and list(s) == list(range(6))


# ================================================================================================
# compatibility layer and single-process parity
# ================================================================================================


def test_from_config_registers_backend():
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ulysses_attn.attention import ulysses_flash_attention, ulysses_flash_mask

    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="ulysses_flash")
    assert model.config._attn_implementation == "ulysses_flash"
    assert ALL_ATTENTION_FUNCTIONS["ulysses_flash"] is ulysses_flash_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["ulysses_flash"] is ulysses_flash_mask
    sdpa = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")
    sdpa.set_attn_implementation("ulysses_flash")  # switching an existing model works too
    assert sdpa.config._attn_implementation == "ulysses_flash"


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)


def test_flash_shim_leaves_other_names_alone(monkeypatch):
    import transformers.modeling_flash_attention_utils as fau
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    shim = mu.lazy_import_flash_attention
    assert getattr(shim, "_ulysses_shim", False) and shim.__wrapped__ is fau.lazy_import_flash_attention
    assert shim("ulysses_flash") is None
    ulysses_attn.register()  # idempotent: not wrapped twice
    assert mu.lazy_import_flash_attention is shim

    other = _outcome(lambda: shim("flash_attention_2"))
    assert other == _outcome(lambda: fau.lazy_import_flash_attention("flash_attention_2"))
    # model construction with a real flash-attn request behaves exactly as without the shim
    with_shim = _outcome(lambda: AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="flash_attention_2"))
    monkeypatch.setattr(mu, "lazy_import_flash_attention", fau.lazy_import_flash_attention)
    without = _outcome(lambda: AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="flash_attention_2"))
    if with_shim[0] == "ok":
        assert without[0] == "ok"
    else:
        assert with_shim == without
    # without the shim the ulysses_flash name is what breaks (the reason the shim exists)
    assert _outcome(lambda: fau.lazy_import_flash_attention("ulysses_flash"))[0] != "ok"


def _parity_batch(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "plain":
        ids = torch.randint(1, VOCAB, (1, 19), generator=g)
        return {"input_ids": ids}, torch.ones(1, 19, dtype=torch.bool)
    if kind in ("right_padded", "left_padded"):
        ids = torch.randint(1, VOCAB, (3, 17), generator=g)
        mask = torch.zeros(3, 17, dtype=torch.long)
        for i, n in enumerate((17, 12, 5)):
            if kind == "right_padded":
                mask[i, :n] = 1
            else:
                mask[i, 17 - n :] = 1
        return {"input_ids": ids * mask, "attention_mask": mask}, mask.bool()
    if kind == "packed":
        ids = torch.randint(1, VOCAB, (1, 24), generator=g)
        return {"input_ids": ids, "position_ids": _packed_positions((9, 4, 11))}, torch.ones(1, 24, dtype=torch.bool)
    raise ValueError(kind)


@pytest.mark.parametrize("model_name", ["llama", "qwen2", "mistral", "gemma2"])
def test_single_process_logits_match_reference_attention(model_name):
    ref = build(model_name, REFERENCE_ATTN[model_name])
    model = build(model_name, "ulysses_flash")
    for kind in ("plain", "right_padded", "left_padded", "packed"):
        batch, keep = _parity_batch(kind)
        with torch.no_grad():
            want = ref(**batch, use_cache=False).logits
            got = model(**batch, use_cache=False).logits
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind}: {m}")
    # and the packed rows really are independent documents (differs from treating the row as one sequence)
    batch, _ = _parity_batch("packed")
    with torch.no_grad():
        one_seq = model(input_ids=batch["input_ids"], use_cache=False).logits
        packed = model(**batch, use_cache=False).logits
    assert torch.allclose(one_seq[:, :9], packed[:, :9], atol=1e-5) and not torch.allclose(one_seq[:, 9:], packed[:, 9:])


def test_single_process_backward_matches_sdpa():
    ref, model = build("llama", "sdpa"), build("llama", "ulysses_flash")
    batch, _ = _parity_batch("packed")
    batch["labels"] = batch["input_ids"]
    for m in (ref, model):
        m(**batch, use_cache=False).loss.backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_single_process_generation_matches_sdpa():
    ref, model = build("llama", "sdpa"), build("llama", "ulysses_flash")
    batch, _ = _parity_batch("left_padded")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want = ref.generate(**batch, **kw)
    got = model.generate(**batch, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layout_computed_once_per_mask_per_forward(monkeypatch):
    # Gemma 2 alternates sliding and full layers, which receive two different masks: both layouts
    # stay cached for the forward (a miss costs collectives under SP)
    import ulysses_attn.attention as attention

    calls = []
    local_layout = attention._local_layout
    monkeypatch.setattr(attention, "_local_layout", lambda *a: calls.append(1) or local_layout(*a))
    model = build("gemma2", "ulysses_flash", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    batch, _ = _parity_batch("right_padded")
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 2
