"""ulysses_attn/guards.py: what the attention backend cannot see is made exact or refused, never wrong."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from zoo import build, check_case, make_batch, tiny_config, verdict

import ulysses_attn
from ulysses_attn import guards, patches, shard_batch


def _refusal_worker(rank, world, model_type):
    ulysses_attn.init_sequence_parallel(world)
    model = build(tiny_config(model_type), "ulysses_flash")
    shard = shard_batch({**make_batch("plain"), "use_cache": False})
    messages = []
    for _ in range(2):  # a forward that was refused is checked again, not waved through
        with pytest.raises(guards.TokenMixingOutsideAttention) as info:
            model(**shard)
        messages.append(str(info.value))
    return messages


@pytest.mark.parametrize("model_type,where", [
    ("olmo_hybrid", "linear_attn"),  # a gated delta-net the package has not made exact: a conv and a decay
    ("minimax", "MiniMaxDecoderLayer ran without calling the attention function"),  # lightning attention
])
def test_token_mixing_outside_attention_is_refused(model_type, where):
    for messages in run_distributed(_refusal_worker, 2, model_type):
        assert len(messages) == 2
        for m in messages:
            assert where in m and "sp_size=1" in m, m


def test_token_mixing_models_run_without_sequence_parallelism():
    model = build(tiny_config("qwen3_next"), "ulysses_flash")
    ref = build(tiny_config("qwen3_next"), "sdpa")
    batch = {**make_batch("plain"), "use_cache": False}
    assert torch.allclose(model(**batch).logits, ref(**batch).logits, atol=1e-6)
    assert guards.token_mixing_modules(model)  # found, but nothing is refused at P = 1


ROPE_VARIANTS = {
    "llama dynamic": ("llama", {"max_position_embeddings": 16,
                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "phimoe longrope": ("phimoe", {"max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [3.0, 4.0, 5.0, 6.0],
        "original_max_position_embeddings": 16, "short_mscale": 1.0, "long_mscale": 1.3}}),
}


def _rope_worker(rank, world, variant, fixed):
    model_type, overrides = ROPE_VARIANTS[variant]
    ulysses_attn.init_sequence_parallel(world)
    if not fixed:  # what the model computed before guards.global_rope_lengths
        guards.global_rope_lengths = lambda model, group: 0
    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return {kind: verdict(check_case(cfg, kind, world)) for kind in ("plain", "packed")}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_length_dependent_rope_sees_the_whole_sequence(variant):
    """RoPE whose frequencies follow max(position_ids): the 30-token sequence crosses the original
    length (16) on one shard only. With the fix the model equals one process; without, it does not."""
    assert run_distributed(_rope_worker, 2, variant, True)[0] == {"plain": "exact", "packed": "exact"}
    broken = run_distributed(_rope_worker, 2, variant, False)[0]
    assert broken["plain"].startswith("wrong"), broken


def _rope_undo_worker(rank, world):
    ulysses_attn.init_sequence_parallel(world)
    model_type, overrides = ROPE_VARIANTS["llama dynamic"]
    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = build(cfg, "ulysses_flash")
    model(**shard_batch({**make_batch("plain"), "use_cache": False}))
    rotary = model.model.rotary_emb
    before = patches.is_replaced(rotary, "forward")
    ulysses_attn.disable()
    return before, patches.is_replaced(rotary, "forward"), "forward" in vars(rotary)


def test_rope_fix_is_undone_by_disable():
    assert run_distributed(_rope_undo_worker, 2) == [(True, False, False)] * 2


def test_models_with_their_own_flash_kernel_keep_ulysses_flash():
    """gpt-oss lists its own flash kernels; transformers would swap "ulysses_flash" for one of them
    with only a warning (the model would run without SP). It keeps ulysses_flash, and its attention
    sinks are refused with the package's message."""
    model = build(tiny_config("gpt_oss"), "ulysses_flash")
    assert model.config._attn_implementation == "ulysses_flash"
    with pytest.raises(NotImplementedError, match="attention sinks"):
        model(**make_batch("plain"), use_cache=False)


def test_unregister_removes_the_watch():
    from ulysses_attn import registration

    model = build(tiny_config("llama"), "ulysses_flash")
    assert any(h is guards._first_sp_forward for h in model._forward_pre_hooks.values())
    ulysses_attn.disable(unregister=True)
    try:
        assert not any(h is guards._first_sp_forward for h in model._forward_pre_hooks.values())
        assert "_ulysses_attn_watched" not in vars(model)
    finally:
        registration.register()
