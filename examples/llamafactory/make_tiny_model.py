"""Write a tiny Llama-3- or Qwen2.5-shaped model and its tokenizer to a folder LLaMA-Factory loads.

    python examples/llamafactory/make_tiny_model.py --arch llama3 --out /tmp/tiny-llama3
    python examples/llamafactory/make_tiny_model.py --arch qwen2.5 --out /tmp/tiny-qwen2.5

Nothing is downloaded: the weights are a seeded random initialisation of a small config (2 layers,
GQA 4/2 heads, fp32) and the tokenizer is character-level over printable ASCII and the bundled
data, with the chat template's special tokens (LLaMA-Factory's ``template: llama3`` / ``qwen``) as
single tokens, so LLaMA-Factory's templates, masking and collators run as they do on the real
models.
"""

from __future__ import annotations

import argparse
import json
import os
import string

import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

# special tokens of each chat template; the first is the end-of-turn token LLaMA-Factory stops on
SPECIALS = {
    "llama3": ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    "qwen2.5": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
}


def bundled_text() -> str:
    texts = []
    for name in ("tiny_corpus.jsonl", "tiny_preferences.jsonl"):
        with open(os.path.join(DATA, name)) as f:
            texts += [v for line in f for v in json.loads(line).values()]
    return "".join(texts)


def tokenizer_for(arch: str):
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) | set(bundled_text()))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    specials = SPECIALS[arch]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    kwargs = {"eos_token": specials[0], "unk_token": "<unk>"}
    if arch == "llama3":
        kwargs["bos_token"] = "<|begin_of_text|>"
    else:
        kwargs["pad_token"] = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def model_for(arch: str, vocab_size: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    if arch == "llama3":
        config = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
    else:
        config = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(SPECIALS), default="llama3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = tokenizer_for(args.arch)
    model = model_for(args.arch, len(tokenizer), args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a tiny {args.arch} model ({sum(p.numel() for p in model.parameters())} parameters) to {args.out}")


if __name__ == "__main__":
    main()
