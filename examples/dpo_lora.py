"""LoRA (or full) DPO with TRL -- a plain TRL script that knows nothing about sequence parallelism.

Without SP:    python examples/dpo_lora.py --output_dir out/dpo
With Ulysses + DeepSpeed ZeRO-3 (SP size read from the JSON's sequence_parallel_size):
    accelerate launch --config_file examples/accelerate_ds_z3.yaml -m ulysses_attn.launch \
        examples/dpo_lora.py --attn ulysses_flash --output_dir out/dpo_sp

Defaults: a tiny Llama-3-architecture model (--arch qwen2 for Qwen2.5-style bias + GQA) built from a
config, a character tokenizer and the bundled preference pairs, so it runs on CPU with no downloads.
Pass --model_name_or_path for a real checkpoint (e.g. meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from sft_trainer import HERE, char_tokenizer, save_log_history, tiny_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--data", default=os.path.join(HERE, "data", "tiny_preferences.jsonl"))
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--loss_type", nargs="+", default=["sigmoid"])
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--max_length", type=int, default=None)
    args = p.parse_args()

    rows = [json.loads(line) for line in open(args.data)]
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, attn_implementation=args.attn,
                                                     dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    else:
        tokenizer = char_tokenizer([v for r in rows for v in r.values()])
        tokenizer.eos_token = tokenizer.pad_token
        model = tiny_model(args.arch, len(tokenizer), args.attn, seed=0)
    lora = None if args.full else LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    config = DPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2, learning_rate=1e-4,
        loss_type=args.loss_type, beta=0.1, max_length=args.max_length, logging_steps=1, save_strategy="no",
        report_to=[], bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    trainer.train()
    save_log_history(trainer, args.output_dir)


if __name__ == "__main__":
    main()
