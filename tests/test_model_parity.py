"""SP forward/backward of real models equals the same model in one process (fp32, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from tiny_models import REFERENCE_ATTN, build
from zoo import KINDS, make_batch, rel_err

import ulysses_attn
from ulysses_attn import shard_batch
from ulysses_attn.loss import causal_lm_loss

RTOL = 1e-5


def _parity_worker(rank, world, model_name):
    ulysses_attn.init_sequence_parallel(world)
    return {kind: _parity_case(world, model_name, kind) for kind in KINDS}


def _parity_case(world, model_name, kind, checkpointing=None, **overrides):
    sp = ulysses_attn.get_sequence_parallel()
    # use_cache=False: with a cache, transformers' own masks ignore packed position_ids
    batch = {**make_batch(kind), "use_cache": False}
    ref = build(model_name, REFERENCE_ATTN[model_name], **overrides)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    model = build(model_name, "ulysses_flash", **overrides)
    model.loss_function = causal_lm_loss
    if checkpointing is not None:  # gradient checkpointing: the all-to-alls run again in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.train()
    seen, attention_calls = [], []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, a, kw, out: seen.append(kw.get("hidden_states", a[0] if a else None).shape[1]), with_kwargs=True)
        layer.self_attn.register_forward_hook(lambda *_: attention_calls.append(1))  # inside a checkpoint too
    shard = shard_batch(batch)
    out = model(**shard)
    out.loss.backward()

    seq = batch["input_ids"].shape[1]
    full_logits = ulysses_attn.comm.all_gather_seq(out.logits.detach(), sp.group)[:, :seq]
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[n] = g / world  # what DDP's mean hands the optimizer
    keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    return {
        "local_seq": set(seen),
        "attention_calls": (len(attention_calls), len(model.model.layers)),
        "shard_seq": shard["input_ids"].shape[1],
        "loss": (out.loss.item(), ref_out.loss.item()),
        "logits": rel_err(full_logits[keep], ref_out.logits.detach()[keep]),
        "grads": {n: rel_err(grads[n], p.grad) for n, p in ref.named_parameters()},
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model_name", ["llama", "qwen2", "mistral", "gemma2"])
def test_forward_backward_parity(model_name, world):
    results = run_distributed(_parity_worker, world, model_name)
    for kind in KINDS:
        _check(kind, world, [r[kind] for r in results])


def _checkpointing_worker(rank, world, use_reentrant):
    ulysses_attn.init_sequence_parallel(world)
    return {kind: _parity_case(world, "llama", kind, checkpointing={"use_reentrant": use_reentrant})
            for kind in ("plain", "packed")}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_parity_with_gradient_checkpointing(use_reentrant):
    results = run_distributed(_checkpointing_worker, 2, use_reentrant)
    for kind in ("plain", "packed"):
        _check(kind, 2, [r[kind] for r in results])
        for r in results:  # every layer's attention ran twice: forward, then recomputed in the backward
            calls, layers = r[kind]["attention_calls"]
            assert calls == 2 * layers, (calls, layers)


def _padded_heads_worker(rank, world, model_name, heads, kv_heads):
    import ulysses_attn.attention as attention

    ulysses_attn.init_sequence_parallel(world)
    kernel_heads = []
    attend = attention.attend

    def counting_attend(q, k, v, *args, **kwargs):  # [B, S, heads on this rank, D]
        kernel_heads.append((q.shape[2], k.shape[2]))
        return attend(q, k, v, *args, **kwargs)

    attention.attend = counting_attend
    try:
        results = {kind: _parity_case(world, model_name, kind, num_attention_heads=heads, num_key_value_heads=kv_heads)
                   for kind in KINDS}
    finally:
        attention.attend = attend
    return results, sorted(set(kernel_heads))


@pytest.mark.parametrize("model_name,world,heads,kv_heads,per_rank", [
    ("llama", 4, 6, 2, (2, 1)),  # each KV group padded 3 -> 4: 8 q heads, 2 KV heads replicated to 4
    ("qwen2", 2, 15, 3, (8, 8)),  # group padding would need 18 heads: KV expanded to 15, all padded to 16
])
def test_forward_backward_parity_with_padded_heads(model_name, world, heads, kv_heads, per_rank):
    """Query heads that P does not divide are padded with zero heads: same logits, loss and
    gradients as the model without SP, and each rank's kernel ran the padded (q, kv) heads."""
    results = run_distributed(_padded_heads_worker, world, model_name, heads, kv_heads)
    for parity, kernel_heads in results:
        assert kernel_heads == [per_rank]
    for kind in KINDS:
        _check(kind, world, [r[0][kind] for r in results])


def _check(kind, world, results):
    seq = make_batch(kind)["input_ids"].shape[1]
    for r in results:
        assert r["shard_seq"] == -(-seq // world)  # padded to a multiple of P, then split P ways
        assert r["local_seq"] == {r["shard_seq"]}, "decoder layers must see only the local shard"
        sp_loss, ref_loss = r["loss"]
        assert sp_loss == pytest.approx(ref_loss, rel=RTOL)
        assert r["logits"] < RTOL
        bad = {n: e for n, e in r["grads"].items() if not e < RTOL}
        assert not bad, bad
