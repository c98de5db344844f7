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
    sinks are applied (the model zoo checks them under SP; here one process equals eager)."""
    cfg = tiny_config("gpt_oss")
    model = build(cfg, "ulysses_flash")
    assert model.config._attn_implementation == "ulysses_flash"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0, generator=torch.Generator().manual_seed(3))  # sinks that matter
    eager = build(cfg, "eager")
    eager.load_state_dict(model.state_dict())
    batch = {**make_batch("plain"), "use_cache": False}
    torch.testing.assert_close(model(**batch).logits, eager(**batch).logits, rtol=1e-5, atol=1e-6)


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


def _qwen2_vl_config():
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=150, video_token_id=151,
                         vision_start_token_id=152)


def _vlm_worker(rank, world):
    from transformers import Qwen2VLForConditionalGeneration

    from ulysses_attn.models import decoder_layers
    from ulysses_attn.transparent import make_transparent

    sp = ulysses_attn.enable(sp_size=world, select_backend=False)
    torch.manual_seed(0)  # the same weights on every rank
    ref = Qwen2VLForConditionalGeneration._from_config(_qwen2_vl_config(), attn_implementation="sdpa",
                                                       dtype=torch.float32)
    model = Qwen2VLForConditionalGeneration._from_config(_qwen2_vl_config(), attn_implementation="ulysses_flash",
                                                         dtype=torch.float32)
    model.load_state_dict(ref.state_dict())
    make_transparent(model, sp)
    seen = []
    first_layer = decoder_layers(model.model.language_model)[0]
    first_layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                          with_kwargs=True)
    ids = torch.randint(0, 140, (2, 19), generator=torch.Generator().manual_seed(1))
    text = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    images = ids.clone()
    images[:, 3:7] = 150  # two 2x2-patch images, 4 tokens each
    with pytest.raises(NotImplementedError, match="multimodal inputs are not supported under SP") as info:
        model(input_ids=images, pixel_values=torch.randn(16, 12), image_grid_thw=torch.tensor([[1, 2, 2]] * 2))
    return text, seen, str(info.value)


def test_a_vision_language_model_is_exact_on_text_and_refuses_images_under_sp():
    """Qwen2-VL (M-RoPE): text-only batches are exact in transparent mode at SP 2 (the decoder
    layers see S/P tokens); a batch with images is refused with the package's message -- image
    features are merged into the sequence inside the model, after sharding (a foreign shape error
    from the model before)."""
    for text, seen, message in run_distributed(_vlm_worker, 2):
        assert text < 1e-5 and seen == [10], (text, seen)
        assert "image_grid_thw, pixel_values" in message
