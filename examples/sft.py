"""Packed (padding-free) SFT with TRL's SFTTrainer -- a plain TRL script.

Without SP:    python examples/sft.py --output_dir out/sft
With Ulysses:  torchrun --nproc_per_node 2 -m ulysses_attn.launch --sp-size 2 \
                   examples/sft.py --attn ulysses_flash --output_dir out/sft_sp

Packing / padding_free puts several documents in one row with position_ids restarting at 0;
ulysses_flash runs varlen attention over the gathered full sequence so documents never see each
other. Defaults: tiny Llama from a config + the bundled prompt/completion pairs (no downloads).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sft_trainer import HERE, char_tokenizer, save_log_history, tiny_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--lora", action="store_true")
    p.add_argument("--max_steps", type=int, default=4)
    args = p.parse_args()

    rows = [json.loads(line) for line in open(os.path.join(HERE, "data", "tiny_preferences.jsonl"))]
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    tokenizer = char_tokenizer([v for r in rows for v in r.values()])
    tokenizer.eos_token = tokenizer.pad_token
    model = tiny_model(args.arch, len(tokenizer), args.attn, seed=0)
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        padding_free=True, completion_only_loss=True, max_length=None, logging_steps=1, save_strategy="no",
        report_to=[], bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if args.lora else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    trainer.train()
    save_log_history(trainer, args.output_dir)


if __name__ == "__main__":
    main()
