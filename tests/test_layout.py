"""Which tokens attend to which (``ulysses_attn.layout``): layouts built from position_ids and
padding masks, and the cache that builds them once per forward -- and again after the inputs change."""

from __future__ import annotations

import pytest
import torch
from helpers import packed_positions, parity_batch
from tiny_models import REFERENCE_ATTN, VOCAB, build

from ulysses_attn.layout import layout_from_positions


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
    pos = packed_positions((4, 3, 5), (12,), (6, 6))
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


# ================================================================================================
# the layout cache
# ================================================================================================


def _count_builds(monkeypatch):
    """Count the layouts built without an SP group (the attention calls layout.local_layout)."""
    import ulysses_attn.attention as attention

    calls = []
    local_layout = attention.local_layout
    monkeypatch.setattr(attention, "local_layout", lambda *a: calls.append(1) or local_layout(*a))
    return calls


def test_layout_computed_once_per_mask_per_forward(monkeypatch):
    # Gemma 2 alternates sliding and full layers, which receive two different masks: both layouts
    # stay cached for the forward (a miss costs collectives under SP)
    calls = _count_builds(monkeypatch)
    model = build(
        "gemma2", "ulysses_flash", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2
    )
    batch, _ = parity_batch("right_padded")
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 2


INFERENCE_MODE_BUG = (
    "package bug: inference tensors have no version counter (layout._version returns -1), so an "
    "in-place edit of position_ids under torch.inference_mode() hits the stale layout"
)


@pytest.mark.parametrize(
    "mode",
    ["no_grad", pytest.param("inference_mode", marks=pytest.mark.xfail(strict=True, reason=INFERENCE_MODE_BUG))],
)
def test_layout_cache_is_keyed_on_the_tensor_version(monkeypatch, mode):
    """The cache key is the position_ids object *and* its version counter: editing the tensor in
    place between two forwards (here: a dense row becomes two packed documents, 5 + 11 tokens)
    rebuilds the layout, so the second forward equals a fresh call with the edited positions."""
    calls = _count_builds(monkeypatch)
    model = build("llama", "ulysses_flash")
    ref = build("llama", REFERENCE_ATTN["llama"])  # same seed, same weights
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with getattr(torch, mode)():
        pos = torch.arange(16)[None].clone()
        model(input_ids=ids, position_ids=pos, use_cache=False)  # dense layout, cached
        pos[0, 5:] = torch.arange(11)
        edited = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        fresh = model(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
        # what the stale (dense) layout would give: the edited positions (RoPE) as one document
        one_doc = torch.tensor([0, 16], dtype=torch.int32)
        stale = model(
            input_ids=ids,
            position_ids=pos.clone(),
            cu_seq_lens_q=one_doc,
            cu_seq_lens_k=one_doc,
            max_length_q=16,
            max_length_k=16,
            use_cache=False,
        ).logits
        want = ref(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
    assert not torch.allclose(fresh[:, 5:], stale[:, 5:], atol=1e-4)  # the layout matters here
    torch.testing.assert_close(edited, fresh, rtol=0, atol=0)
    torch.testing.assert_close(fresh, want, rtol=1e-5, atol=1e-5)  # and is the packed result
    assert len(calls) == 4  # dense, edited, fresh, one document: every forward built its own layout
