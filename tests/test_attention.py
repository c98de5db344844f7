"""The ``ulysses_flash`` attention function (``ulysses_attn.attention``): head bookkeeping under SP
(KV replication, zero-head padding) and, without SP, tiny real models whose logits, gradients and
generations equal those of transformers' own attention."""

from __future__ import annotations

import pytest
import torch
from helpers import parity_batch
from tiny_models import REFERENCE_ATTN, build

from ulysses_attn.attention import check_heads, kv_replication, padded_heads


@pytest.mark.parametrize(
    "heads,kv_heads,sp,rep",
    [
        (32, 8, 4, 1),
        (4, 1, 4, 4),
        (28, 4, 4, 1),
        (4, 2, 4, 2),
        (8, 2, 8, 4),
        (16, 16, 4, 1),
        (32, 8, 1, 1),
        (12, 3, 4, 4),
    ],
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
    [
        (28, 4, 8, 32, True),
        (6, 2, 4, 8, True),
        (5, 1, 2, 6, True),
        (12, 2, 8, 16, True),
        (28, 4, 4, 28, True),
        (15, 3, 2, 16, False),
        (15, 3, 4, 16, False),
        (32, 8, 8, 32, True),
    ],
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

    with caplog.at_level("WARNING", logger="ulysses_attn"):
        _warn_head_padding(28, 4, 8, *padded_heads(28, 4, 8))
        _warn_head_padding(28, 4, 8, *padded_heads(28, 4, 8))
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "28 query heads" in msg and "padding to 32 heads" in msg and "sending 8 KV heads" in msg, msg
    assert "[1, 2, 4, 7, 14, 28]" in msg


# ================================================================================================
# single process (no SP group): a plain attention backend
# ================================================================================================


@pytest.mark.parametrize("model_name", ["llama", "qwen2", "mistral", "gemma2"])
def test_single_process_logits_match_reference_attention(model_name):
    ref = build(model_name, REFERENCE_ATTN[model_name])
    model = build(model_name, "ulysses_flash")
    for kind in ("plain", "right_padded", "left_padded", "packed"):
        batch, keep = parity_batch(kind)
        with torch.no_grad():
            want = ref(**batch, use_cache=False).logits
            got = model(**batch, use_cache=False).logits
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind}: {m}")
    # and the packed rows really are independent documents (differs from treating the row as one sequence)
    batch, _ = parity_batch("packed")
    with torch.no_grad():
        one_seq = model(input_ids=batch["input_ids"], use_cache=False).logits
        packed = model(**batch, use_cache=False).logits
    assert torch.allclose(one_seq[:, :9], packed[:, :9], atol=1e-5) and not torch.allclose(
        one_seq[:, 9:], packed[:, 9:]
    )


def test_single_process_backward_matches_sdpa():
    ref, model = build("llama", "sdpa"), build("llama", "ulysses_flash")
    batch, _ = parity_batch("packed")
    batch["labels"] = batch["input_ids"]
    for m in (ref, model):
        m(**batch, use_cache=False).loss.backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_single_process_generation_matches_sdpa():
    ref, model = build("llama", "sdpa"), build("llama", "ulysses_flash")
    batch, _ = parity_batch("left_padded")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want = ref.generate(**batch, **kw)
    got = model.generate(**batch, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
