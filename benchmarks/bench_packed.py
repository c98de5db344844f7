"""The inner attention on packed sequences: forward + backward time of each kernel against the
number of documents in the sequence, and which kernel the automatic choice takes.

    python benchmarks/bench_packed.py --tokens 65536 --documents 1,4,16,64,256 --json packed.json

Each configuration packs ``tokens`` tokens into ``documents`` documents of random lengths (cut
points drawn uniformly), builds the package's layout from the restarting ``position_ids`` and
times ``forward + backward`` of each kernel on bf16 ``q [1, T, H, D]``, ``k/v [1, T, H_kv, D]``
(the shapes after the all-to-all). ``fresh`` draws new lengths before every timed call, as training
does (any per-shape setup, e.g. cuDNN's graph build, is counted); ``same`` repeats one draw.

``TFLOP/s = 7 * sum(L_i^2) * H * D / time``: causal forward ``2 * sum(L_i^2) * H * D`` (two matmuls
over half of each document's square), backward 2.5x the forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ulysses_attn import kernels

DEV = os.environ.get("BENCH_DEVICE", "cuda")


def random_lengths(tokens: int, documents: int, gen: torch.Generator) -> list[int]:
    cuts = sorted(torch.randperm(tokens - 1, generator=gen)[: documents - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def layout_for(lengths: list[int]) -> kernels.Layout:
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(DEV)
    return kernels.layout_from_positions(pos, None)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_kernel(name: str, q, k, v, do, layouts: list[kernels.Layout]) -> float:
    """Median seconds of forward + backward, one layout per call."""
    fn = kernels.KERNELS[name].fn
    times = []
    for layout in layouts:
        for t in (q, k, v):
            t.grad = None
        sync()
        start = time.perf_counter()
        out = fn(q, k, v, layout, causal=True, scale=q.shape[-1] ** -0.5, dropout=0.0, window=None, softcap=None)
        out.backward(do)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> list[dict]:
    names = [n for n in args.kernels.split(",") if kernels.KERNELS[n].available(torch.device(DEV))]
    results = []
    for tokens in (int(x) for x in args.tokens.split(",")):
        for head_dim in (int(x) for x in args.head_dim.split(",")):
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(1, tokens, args.heads, head_dim, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
            k, v = (torch.randn(1, tokens, args.kv_heads, head_dim, generator=gen).to(DEV, torch.bfloat16)
                    .requires_grad_() for _ in range(2))
            do = torch.randn(q.shape, generator=gen).to(DEV, torch.bfloat16)
            for documents in (int(x) for x in args.documents.split(",")):
                draws = [random_lengths(tokens, documents, gen) for _ in range(args.warmup + args.iters)]
                fresh = [layout_for(d) for d in draws]
                same = [fresh[0]] * (args.warmup + args.iters)
                sq = {"fresh": statistics.mean(sum(n * n for n in d) for d in draws[args.warmup:]),
                      "same": sum(n * n for n in draws[0])}
                auto = kernels.choose_kernel(torch.device(DEV), fresh[0])
                for name in names:
                    row = dict(tokens=tokens, heads=args.heads, kv_heads=args.kv_heads, head_dim=head_dim,
                               documents=documents, rms_length=round((sq["fresh"] / documents) ** 0.5), kernel=name,
                               auto=auto)
                    try:
                        time_kernel(name, q, k, v, do, same[: args.warmup])
                        for label, layouts in (("same", same), ("fresh", fresh)):
                            sec = time_kernel(name, q, k, v, do, layouts[args.warmup:])
                            row[f"ms_{label}"] = round(sec * 1e3, 3)
                            row[f"tflops_{label}"] = round(7 * sq[label] * args.heads * head_dim / sec / 1e12, 1)
                    except Exception as e:  # noqa: BLE001 - one kernel failing is a result, not the end
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    print(json.dumps(row), flush=True)
                    results.append(row)
    return results


def table(results: list[dict]) -> str:
    lines = ["| T | D | docs | rms len | kernel | ms (fresh) | TFLOP/s (fresh) | ms (same) | auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['tokens']} | {r['head_dim']} | {r['documents']} | {r['rms_length']} | {r['kernel']} | "
                     f"{r.get('ms_fresh', r.get('error', ''))} | {r.get('tflops_fresh', '')} | "
                     f"{r.get('ms_same', '')} | {r['auto']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="65536")
    ap.add_argument("--documents", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", default="128")
    ap.add_argument("--kernels", default="sdpa,torch_varlen,flash_attn")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = run(args)
    print(table(results))
    if args.json:
        env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                   cudnn=torch.backends.cudnn.version(), flash_attn=kernels.flash_version(torch.device(DEV)),
                   commit=os.environ.get("BENCH_GIT_COMMIT"))
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
