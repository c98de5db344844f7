"""The ``sdpa`` kernel on sequences whose length changes at every call, as in training on samples
of different lengths: cuDNN builds a graph for every new length (~0.1 s), and the kernel rounds the
length up (``ulysses_attn.kernels.sdpa.sdpa_length``) so that lengths share graphs.

    python benchmarks/bench_lengths.py --json lengths.json

Times forward + backward of the ``sdpa`` kernel on bf16 ``q [1, S, H, D]``, ``k/v [1, S, H_kv, D]``
for ``--calls`` random lengths in ``[--min, --max)``, with the rounding (``rounded``) and without it
(``exact``), each in a fresh process so that neither inherits the other's cached graphs. One call
at 4096 tokens first initialises cuDNN and is not timed.
``useful TFLOP/s = 7 * sum(S^2) * H * D / time`` (the unpadded tokens only, as bench_packed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

DEV = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a dry run of the script (no rounding there)


def run(mode: str, args) -> dict:
    import importlib

    import torch

    from ulysses_attn.kernels import Layout
    from ulysses_attn.kernels.sdpa import sdpa

    # the module, for its sdpa_length (the attribute ulysses_attn.kernels.sdpa is the kernel function)
    sdpa_module = importlib.import_module("ulysses_attn.kernels.sdpa")

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    if mode == "exact":
        sdpa_module.sdpa_length = lambda device, S: S
    rng = random.Random(args.seed)
    lengths = [rng.randrange(args.min, args.max) for _ in range(args.calls)]
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    times = []
    for S in [4096, *lengths]:
        q = torch.randn(1, S, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, S, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        sync()
        start = time.perf_counter()
        out = sdpa(q, k, v, Layout(), causal=True, scale=D**-0.5, dropout=0.0, window=None, softcap=None)
        out.backward(torch.ones_like(out))
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times = times[1:]
    half = len(times) // 2
    return dict(mode=mode, calls=len(lengths), total_ms=round(sum(times), 1),
                first_half_ms=round(sum(times[:half]), 1), second_half_ms=round(sum(times[half:]), 1),
                median_ms=round(statistics.median(times), 2),
                useful_tflops=round(7 * sum(S * S for S in lengths) * H * D / (sum(times) / 1e3) / 1e12, 1),
                lengths_run=len({sdpa_module.sdpa_length(q.device, S) for S in lengths}),
                distinct_lengths=len(set(lengths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--min", type=int, default=8192)
    ap.add_argument("--max", type=int, default=24576)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["exact", "rounded"], help=argparse.SUPPRESS)  # one fresh process per mode
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args)))
        return
    rows = []
    same = [f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in ("calls", "min", "max", "heads", "kv_heads", "head_dim", "seed")]
    for mode in ("exact", "rounded"):
        out = subprocess.run([sys.executable, __file__, *same, "--mode", mode], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if args.json:
        import torch

        env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                   cudnn=torch.backends.cudnn.version(), commit=os.environ.get("BENCH_GIT_COMMIT"))
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
