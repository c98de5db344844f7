"""The memory plan's predicted peak against the measured one, one GPU, P = 1 (no downloads).

    python benchmarks/memory_plan_check.py --model 1b --seq 16384,65536,131072 \
        --json benchmarks/results/memory_plan_<gpu>.json

For each model shape (bf16, random init, AdamW with bf16 states as in bench_train.py, non-reentrant
checkpointing enabled for the plan to switch) and each length: ``auto`` trains with
``MemoryOptions.automatic()`` (the plan picks the options for the device's free memory); each
``--choices`` entry forces one candidate of the plan through the same switch
(:func:`ulysses_attn.memory.apply_choice`), to check the memory model beyond what ``auto`` picks.
A configuration runs ``--warmup`` steps, then one measured step (forward, backward, optimizer
step); ``measured`` is the allocator's peak of that step, ``predicted`` the plan's (its static
part measured at the forward: what is allocated plus the gradients still to come). Step time and
tokens/s come with it (model TFLOP/s with bench_train.py's formula).
Choices: ``none`` (no checkpointing), ``full``, ``selective``, ``full+offload``,
``selective+offload``, each optionally ``+tiled``; ``half`` checkpoints half the layers, selective.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from lib.measure import cap_gpu_memory  # noqa: E402
from lib.shapes import FORMULA, build_model, make_batch, model_flops, n_matmul  # noqa: E402

from ulysses_attn import memory as memory_module  # noqa: E402
from ulysses_attn.loss import default_loss_chunk_tokens  # noqa: E402
from ulysses_attn.memory import MemoryOptions, apply_choice, configure_memory  # noqa: E402
from ulysses_attn.memory_plan import (  # noqa: E402
    Choice,
    DecoderShape,
    MemoryPlan,
    activation_bytes,
    recompute_share,
    static_bytes,
)

DEV = os.environ.get("BENCH_DEVICE", "cuda")


def parse_choice(name: str, layers: int) -> Choice:
    parts = set(name.split("+"))
    kind = (parts & {"none", "full", "selective", "half"}).pop()
    k = {"none": 0, "half": layers // 2}.get(kind, layers)
    return Choice(k, kind != "full", "offload" in parts, "tiled" in parts)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def run(model, opt, batch, mode: str, warmup: int) -> dict:
    shape = DecoderShape.of(model.config)
    choice = None if mode == "auto" else parse_choice(mode, shape.layers)
    original = memory_module._plan
    seen: dict = {}
    if choice is not None:
        memory_module._plan = lambda m, options, layers, args, kwargs: apply_choice(m, choice)
    try:
        for i in range(warmup + 1):
            if i == warmup:
                gc.collect()
                sync()
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seen["static"] = static_bytes(model, torch.device(DEV))
                start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
    finally:
        memory_module._plan = original
    tokens = batch["input_ids"].numel()
    if choice is None:
        plan = model._ulysses_plan_checker.last
    else:
        device, host = activation_bytes(shape, choice, tokens, loss_chunk_tokens=default_loss_chunk_tokens(shape.vocab))
        plan = MemoryPlan(choice, tokens, tokens, seen["static"] + device, seen["static"], None, host,
                          recompute_share(shape, choice, tokens, tokens), True)
    measured = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    return {
        "mode": mode,
        "choice": plan.choice.describe(shape.layers),
        "predicted_gib": round(plan.predicted_peak_bytes / 2**30, 2),
        "measured_gib": round(measured / 2**30, 2),
        "ratio": round(measured / plan.predicted_peak_bytes, 3),
        "static_gib": round(seen["static"] / 2**30, 2),
        "activations_predicted_gib": round((plan.predicted_peak_bytes - seen["static"]) / 2**30, 2),
        "activations_measured_gib": round((measured - seen["static"]) / 2**30, 2),
        "host_gib": round(plan.host_bytes / 2**30, 2),
        "recompute_share_model": round(plan.recompute_share, 3),
        "step_s": round(elapsed, 3),
        "loss": round(loss.item(), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1b", help="comma-separated shapes of benchmarks/lib/shapes.py")
    ap.add_argument("--seq", default="16384,65536")
    ap.add_argument("--modes", default="auto", help="auto and/or choices (see the docstring), comma-separated")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gpu-memory-gib", type=float, default=0,
                    help="emulate a smaller GPU of the same kind (bench_train.py's option; the plan sees the cap)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.gpu_memory_gib and DEV == "cuda":
        torch.cuda.init()
        cap_gpu_memory(args.gpu_memory_gib)
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "formula": FORMULA,
            "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
            "gpu_memory_cap_gib": args.gpu_memory_gib or None}
    results = []
    for shape in args.model.split(","):
        seqs = [int(s) for s in args.seq.split(",")]
        model = build_model(shape, max(seqs), "sdpa")
        configure_memory(model, MemoryOptions.automatic())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEV == "cuda")
        n = n_matmul(model)
        for seq in seqs:
            batch = make_batch(model.config.vocab_size, seq, 1234)
            for mode in args.modes.split(","):
                try:
                    r = run(model, opt, batch, mode, args.warmup)
                    flops = model_flops(model.config, n, seq, 1)
                    r.update(tokens_per_s=round(seq / r["step_s"], 1),
                             model_tflops=round(flops / r["step_s"] / 1e12, 1))
                except torch.OutOfMemoryError as e:
                    r = {"mode": mode, "error": "OOM: " + str(e).split("\n")[0][:160]}
                    opt.zero_grad(set_to_none=True)
                r = {"model": shape, "seq": seq, **r}
                print(json.dumps(r), flush=True)
                results.append(r)
                gc.collect()
                if DEV == "cuda":
                    torch.cuda.empty_cache()
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({**info, "results": results}, f, indent=1)
        del model, opt
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
