"""The bf16 matmul rate this GPU reaches: the denominator of "model TFLOPs as a share of the
machine's matmul rate" in docs/benchmarks.md.

    python benchmarks/matmul_peak.py --json benchmarks/results/matmul_peak.json

Times ``torch.matmul`` (cuBLAS, bf16 in, bf16 out, fp32 accumulation) on square 8192 and 16384
products and on the 8B-shape MLP products (tokens x 4096 x 14336 and back), 2 * M * N * K flops
each, median of ``--iters`` timed calls after warm-up; reports the best shape as the rate.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def rate(m: int, n: int, k: int, iters: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * m * n * k / statistics.median(times) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = {"8192^3": (8192, 8192, 8192), "16384^3": (16384, 16384, 16384),
              "mlp_up 16384x14336x4096": (16384, 14336, 4096), "mlp_down 16384x4096x14336": (16384, 4096, 14336)}
    res = {name: round(rate(*mnk, args.iters), 1) for name, mnk in shapes.items()}
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "tflops_by_shape": res, "bf16_matmul_tflops": max(res.values())}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
