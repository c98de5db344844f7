"""What every part of the benchmark shares: the device, rank-0 logging, the stock HF backends."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu": a gloo dry run of the script logic (tiny model)
# the stock HF backends (modes without SP, and ALST's core attention) -> ulysses' kernel label for the same kernel
SAME_KERNEL = {"sdpa": "sdpa", "flash_attention_2": "flash_attn/fa2", "flash_attention_3": "flash_attn/fa3",
               "flash_attention_4": "flash_attn/fa4"}
STOCK = tuple(SAME_KERNEL)


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if rank0():
        print(msg, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
