"""Model shapes (random init, no downloads), the batches, and the FLOPs a step counts."""

from __future__ import annotations

import torch

from .common import DEV

FORMULA = ("model TFLOP/s/GPU = (6*N_matmul*S + 6*L*S^2*H*D) / P / step_time / 1e12 (causal attention; recompute "
           "not counted; packed documents: S^2 = sum of their squared lengths)")

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3.1-8B (does not fit an 80 GB GPU without ZeRO-3: 8B params x 8 bytes of bf16 state)
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    # Qwen2.5-7B (28 query heads, 4 KV heads, q/k/v bias): P = 8 pads the heads to 32
    "qwen7b": dict(arch="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                   rms_norm_eps=1e-6),
    # for a quick check of the script (tiny-qwen: 6 heads, padded at P = 4)
    "tiny-qwen": dict(arch="qwen2", hidden_size=192, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=4096, tie_word_embeddings=False, rope_theta=1000000.0,
                      rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096, tie_word_embeddings=False),
}


def make_config(shape: str, seq: int):
    from transformers import LlamaConfig, Qwen2Config

    spec = {"rms_norm_eps": 1e-5, **SHAPES[shape]}
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch", "llama")]
    theta = spec.pop("rope_theta", 500000.0)
    cfg = config_class(**spec, max_position_embeddings=max(seq, 8192), use_cache=False)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def build_model(shape: str, seq: int, attn: str):
    """bf16, seeded random init on the device, gradient checkpointing (non-reentrant), training mode."""
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape, seq)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def n_matmul(model) -> int:
    """Weights of the matrix products a token goes through (projections, MLP, lm_head), counting a
    tied lm_head once as a matmul; the embedding lookup is not a matmul. ZeRO-3 partitions keep
    the full size in ``ds_numel``."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            total += getattr(mod.weight, "ds_numel", mod.weight.numel())
    return total


def document_lengths(seq: int, documents: int) -> list[int]:
    """``--documents``: equal documents packed into the sequence (the last one takes the remainder)."""
    return [seq // documents] * (documents - 1) + [seq - (documents - 1) * (seq // documents)]


def make_batch(vocab: int, seq: int, seed: int, documents: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(DEV)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if documents > 1:  # packed: positions restart at every document
        batch["position_ids"] = torch.cat([torch.arange(n) for n in document_lengths(seq, documents)])[None].to(DEV)
    return batch


def attention_flops(cfg, lengths: list[int]) -> int:
    """6*L*S^2*H*D of :data:`FORMULA`, S^2 summed over ``lengths`` (the documents of a sequence)."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return 6 * L * sum(n * n for n in lengths) * H * D


def model_flops(cfg, n_matmul: int, seq: int, documents: int) -> int:
    """The FLOPs of one step over the whole sequence (:data:`FORMULA` before the division)."""
    return 6 * n_matmul * seq + attention_flops(cfg, document_lengths(seq, documents))
