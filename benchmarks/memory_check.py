"""One GPU, no SP: peak memory and step time of a Llama-3.2-1B-shaped model (random init, bf16,
activation checkpointing) with the plain forward vs ulysses_attn's long-sequence memory options,
and their loss / gradient agreement. Writes benchmarks/results/memory_check.json.

    python benchmarks/memory_check.py --seq 32768 65536
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ulysses_attn


def build():
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=1 << 20,
                      tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().train()


def step(model, ids):
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    elapsed, peak = time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, elapsed, peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[32768])
    args = p.parse_args()
    models = {"plain": build(), "long_sequence": build()}
    ulysses_attn.configure_memory(models["long_sequence"], ulysses_attn.MemoryOptions.long_sequence())
    for m in models.values():
        m.gradient_checkpointing_enable()
    rows = []
    for seq in args.seq:
        ids = torch.randint(0, 128256, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seq))
        res = {}
        for name, model in models.items():
            try:
                step(model, ids)  # warm-up
                res[name] = step(model, ids)
            except torch.OutOfMemoryError:
                res[name] = None
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        row = {"seq": seq}
        for name, r in res.items():
            row[name] = None if r is None else {"loss": r[0], "step_s": r[2], "peak_gib": r[3]}
        if res["long_sequence"] is not None:
            row["offloaded_gib"] = models["long_sequence"]._ulysses_offloader.offloaded_bytes / 2**30
        if all(res.values()):
            (l0, g0, *_), (l1, g1, *_) = res["plain"], res["long_sequence"]
            row["loss_rel_diff"] = abs(l1 - l0) / abs(l0)
            row["grad_cosine"] = torch.nn.functional.cosine_similarity(g0, g1, dim=0).item()
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    os.makedirs(os.environ.get("OUT", "benchmarks/results"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "benchmarks/results"), "memory_check.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
