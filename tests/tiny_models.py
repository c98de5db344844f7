"""Tiny real transformers models built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256)

CONFIGS = {
    # GQA: 4 query heads, 2 KV heads (KV heads < P at P=4)
    "llama": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    # q/k/v bias, MQA: 1 KV head
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    # sliding window shorter than the test sequences
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=7),
    # attention logit softcap, alternating sliding/full layers, final logit softcap
    "gemma2": lambda: Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8),
}
REFERENCE_ATTN = {"llama": "sdpa", "qwen2": "sdpa", "mistral": "sdpa", "gemma2": "eager"}


def build(name: str, attn: str, seed: int = 0, **overrides):
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model
